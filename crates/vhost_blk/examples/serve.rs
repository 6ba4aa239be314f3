//! Serves one disk image over vhost-user-blk until killed, as the worker serves a
//! synthetic disk: for benchmarks that put our backend and qemu-storage-daemon side
//! by side in one guest (`crates/worker/bench/paired.sh`).
//!
//! ```sh
//! cargo run --release -p vhost_blk --example serve -- IMAGE SOCKET [QUEUES]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (image, socket) = match (args.first(), args.get(1)) {
        (Some(i), Some(s)) => (PathBuf::from(i), PathBuf::from(s)),
        _ => {
            eprintln!("usage: serve IMAGE SOCKET [QUEUES]");
            return ExitCode::from(2);
        }
    };
    let num_queues = match args.get(2).map(|q| q.parse::<u16>()) {
        None => 1,
        Some(Ok(q)) if q >= 1 => q,
        Some(_) => {
            eprintln!("serve: QUEUES must be a number from 1 to 65535");
            return ExitCode::from(2);
        }
    };
    let disk: Arc<dyn vhd::Disk> = match vhd::open(&image, false) {
        Ok(d) => Arc::from(d),
        Err(e) => {
            eprintln!("serve: cannot open {}: {e}", image.display());
            return ExitCode::FAILURE;
        }
    };
    let opts = vhost_blk::BlkOptions {
        num_queues,
        ..Default::default()
    };
    let _server = match vhost_blk::Server::start(disk, &socket, opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Serves on its own threads until the process is killed.
    loop {
        std::thread::park();
    }
}
