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
    /// A folder where the API may create, read, convert, attach, move, export to and
    /// delete files (repeatable; also `storage_roots` in host.json). The data dir is
    /// always one. Paths outside every root, or leaving one through `..` or a
    /// symlink, are refused with `Forbidden`.
    #[arg(long = "storage-root", value_name = "PATH")]
    pub storage_roots: Vec<PathBuf>,
    /// Group that may read the service's files: new files are made 0640 and folders
    /// 0750 with this group (the data dir and storage roots get it, set-group-ID);
    /// without it files are 0600 and folders 0700.
    #[arg(long, value_name = "GROUP")]
    pub file_group: Option<String>,
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
    /// Checkpoints of running VMs: auto saves their memory while the guest runs
    /// (QEMU's background snapshot; the guest stops only for the switch-over)
    /// where the host, QEMU and the VM allow it, and otherwise pauses the guest
    /// while its memory is saved; off always pauses it. Each job's result says
    /// which way was used and why.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    pub background_checkpoints: String,
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
    /// Most TCP connections open at once (from all clients together); more are closed
    /// at once, before the TLS handshake. Lowered at start when the file-descriptor
    /// limit cannot hold it.
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most TCP connections open at once from one client address.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: u32,
    /// Connections kept for the unix socket apart from TCP's, so a TCP flood never
    /// locks the local administrator out.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unix_connections: u32,
    /// Seconds a TCP client gets to finish the TLS handshake.
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_handshake_timeout: u64,
    /// Seconds a client gets to send a whole request body; a slower one is answered 408.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout: u64,
    /// Most jobs running at once (from all clients together); more are answered 429.
    #[arg(long, default_value_t = 4096, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running_jobs: u32,
    /// Most jobs running at once submitted by one client (a TCP address; every unix
    /// socket client together counts as one local client).
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running_jobs_per_client: u32,
    /// Most `GET /v1/events` listeners at once; more are answered 429.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_event_listeners: u32,
    /// Longest `GET /v1/jobs/{id}/wait` in seconds; a longer `timeout` is shortened to it.
    #[arg(long, default_value_t = api::jobs::DEFAULT_MAX_WAIT_SECONDS, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_wait: u64,
    /// Serve the diagnostic endpoints (`/v1/diagnostics/...`) over TCP too; they are
    /// always served on the unix socket.
    #[arg(long)]
    pub enable_diagnostics: bool,
}
