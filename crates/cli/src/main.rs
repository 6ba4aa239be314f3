//! `viridian`: the command-line tool. `viridian vhd ...` works on disk files
//! directly, with no daemon; every other command talks to `viridiand`.

mod vhd_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "viridian", version, about = "Viridian: virtual machines on Linux, Hyper-V style")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work on VHD/VHDX files directly (offline; no daemon needed).
    Vhd(vhd_cmd::VhdArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vhd(args) => vhd_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}
