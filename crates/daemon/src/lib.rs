//! `viridiand`, Viridian's management service: VM definitions in folders, jobs,
//! the REST API on a unix socket (and optionally TCP with TLS and a token).

pub mod admission;
pub mod checkpoints;
pub mod config;
pub mod convert;
pub mod disk_jobs;
pub mod error;
pub mod events;
pub mod fd_limit;
pub mod file_modes;
pub mod handlers;
pub mod host;
pub mod host_settings;
pub mod http;
pub mod job_quota;
pub mod mac_pool;
pub mod metering;
pub mod run;
pub mod running_jobs;
pub mod service;
pub mod storage_roots;
pub mod switches;
pub mod tls;
pub mod transfer;
pub mod vms;
