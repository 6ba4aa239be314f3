//! `viridian vhd ...`: offline commands on disk files.

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct VhdArgs {
    #[command(subcommand)]
    command: VhdCommand,
}

#[derive(Subcommand)]
enum VhdCommand {}

pub fn run(args: VhdArgs) -> anyhow::Result<ExitCode> {
    match args.command {}
}
