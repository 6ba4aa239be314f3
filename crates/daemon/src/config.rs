//! `viridiand`'s command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// viridiand: Viridian's management service (VM definitions, jobs, the REST API).
#[derive(Debug, Clone, Parser)]
#[command(name = "viridiand", version)]
pub struct DaemonConfig {
    /// Where VM folders, the API token and the TLS certificate live.
    #[arg(long, default_value = "/var/lib/viridian", env = "VIRIDIAN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Unix socket to serve the API on (created with mode 0660).
    #[arg(long, default_value = "/run/viridian/viridian.sock")]
    pub socket: PathBuf,
    /// Also serve the API on TCP at this address, with TLS and the bearer token.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// TLS certificate (PEM) for --listen; a self-signed one is made in the data dir when absent.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Make the self-signed certificate in <data-dir>/tls again at start (clients must
    /// trust the new one). It is also made again by itself when it ends within 30 days.
    #[arg(long, requires = "listen", conflicts_with = "tls_cert")]
    pub renew_certificate: bool,
    /// Seconds a finished job is kept in full.
    #[arg(long, default_value_t = 300)]
    pub job_retention: u64,
    /// How many finished jobs are kept in full at most.
    #[arg(long, default_value_t = 4096)]
    pub job_limit: usize,
    /// Accelerator for VMs: auto (KVM when the host really has hardware
    /// virtualization, else TCG), kvm, or tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// SeaBIOS for generation 1 VMs: auto (Viridian's build with ATA DMA when
    /// scripts/setup.sh installed it, else QEMU's own), qemu, or an image's path.
    #[arg(long, default_value = "auto", value_name = "auto|qemu|PATH", value_parser = worker::firmware::BiosChoice::parse)]
    pub bios: worker::firmware::BiosChoice,
    /// Most checkpoints a VM may have.
    #[arg(long, default_value_t = crate::checkpoints::DEFAULT_LIMIT)]
    pub checkpoint_limit: usize,
    /// Logical processors admission control counts (default: the host's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub host_processors: Option<u32>,
    /// Processor capacity kept for the host, in % of one logical processor: running
    /// VMs may reserve at most logical processors × 100 minus this.
    #[arg(long, default_value_t = 0, value_name = "PERCENT")]
    pub host_reserve_percent: u32,
    /// Memory kept for the host: running VMs may hold at most the host's memory minus this.
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub memory_headroom_mib: u64,
}
