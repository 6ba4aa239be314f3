//! `viridian vhd serve PATH --socket SOCK [--read-only]`: exports a disk, or a
//! differencing chain, over NBD on a unix socket until SIGINT or SIGTERM, so that
//! qemu-img, qemu-io, qemu-nbd clients and QEMU itself can read and write it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Args)]
pub struct ServeArgs {
    /// The disk to export: a VHD or VHDX (with its parents, for a differencing
    /// disk), or a raw image.
    path: PathBuf,
    /// Unix socket to listen on (created; removed again on exit).
    #[arg(long)]
    socket: PathBuf,
    /// Export read-only: clients' writes are refused, and the file is opened with
    /// a shared lock so other readers may open it too.
    #[arg(long)]
    read_only: bool,
    /// Export name clients ask for; any client asking for the empty name gets it too.
    #[arg(long, default_value = "")]
    name: String,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.socket.exists() {
        anyhow::bail!(
            "{} already exists; remove it if no server is using it, or choose another --socket",
            args.socket.display()
        );
    }
    let disk: Arc<dyn vhd::Disk> = Arc::from(
        vhd::open(&args.path, args.read_only)
            .with_context(|| format!("cannot open {} to serve it", args.path.display()))?,
    );
    // Install the handlers before announcing the socket, so a signal sent as soon
    // as the socket appears is not lost.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    let size = disk.size();
    let server = nbd_server::Server::start(&args.socket, vec![(args.name.clone(), disk)])
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    eprintln!(
        "serving {} ({size} bytes{}) on nbd+unix:///{}?socket={}; stop with Ctrl-C",
        args.path.display(),
        if args.read_only { ", read-only" } else { "" },
        args.name,
        args.socket.display()
    );
    let _ = signals.forever().next();
    server.stop();
    Ok(ExitCode::SUCCESS)
}
