//! Writes viridiand(8) from the service's own command line definition:
//! `cargo run --release -p man_pages --example viridiand -- DIR`.

use std::process::ExitCode;

use clap::CommandFactory;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: viridiand DIR (the folder to write viridiand.8 to)");
        return ExitCode::from(2);
    };
    let cmd = daemon::config::DaemonConfig::command();
    match man_pages::write_pages(cmd, "8", std::path::Path::new(&dir)) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            if let Some(cause) = std::error::Error::source(&err) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}
