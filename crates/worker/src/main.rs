//! `viridian-worker --spec PATH`: runs one VM until it ends. Started by `viridiand`.
//!
//! Exit status: 0 when the VM ended Off or Saved, 1 when it ended Critical or could
//! not start (the reason is in `<runtime_dir>/status.json` and on stderr), 2 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use worker::{WorkerSpec, WorkerState};

fn usage() -> ExitCode {
    eprintln!(
        "usage: viridian-worker --spec PATH   (started by viridiand; see `viridian vm start`)"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec_path = match args.as_slice() {
        [flag, path] if flag == "--spec" => PathBuf::from(path),
        _ => return usage(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIRIDIAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let spec: WorkerSpec = match std::fs::read(&spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!(
                "viridian-worker: cannot read the VM spec {}: {e}",
                spec_path.display()
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("viridian-worker: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(worker::runtime::run(spec)) {
        Ok(status) if status.state != WorkerState::Critical => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!(
                "viridian-worker: the VM ended Critical: {}",
                status.reason.unwrap_or_default()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("viridian-worker: {}", worker::runtime::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
