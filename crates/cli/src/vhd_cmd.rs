//! `viridian vhd ...`: offline commands on disk files.

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct VhdArgs {
    #[command(subcommand)]
    command: VhdCommand,
}

#[derive(Subcommand)]
enum VhdCommand {
    /// Export a disk or chain over NBD on a unix socket until Ctrl-C or SIGTERM.
    Serve(crate::vhd_serve::ServeArgs),
}

pub fn run(args: VhdArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        VhdCommand::Serve(args) => crate::vhd_serve::run(args),
    }
}
