//! Start-up and shutdown of the service.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::DaemonConfig;
use crate::service::Service;
use crate::vms::store::error_chain;

/// Runs the service until SIGTERM or SIGINT, then shuts down cleanly.
pub async fn run(config: DaemonConfig) -> Result<(), String> {
    // First, before workers' sockets and disk files are opened.
    let nofile = crate::fd_limit::raise_nofile();
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        format!(
            "cannot create the data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    crate::file_modes::apply(&config)?;
    let settings = crate::host_settings::load(&config.data_dir).unwrap_or_else(|e| {
        tracing::warn!("{e}; using the built-in processor defaults and no storage roots from it");
        Default::default()
    });
    let roots = crate::storage_roots::StorageRoots::new(
        &std::iter::once(config.data_dir.clone())
            .chain(settings.storage_roots.iter().cloned())
            .chain(config.storage_roots.iter().cloned())
            .collect::<Vec<_>>(),
    )?;
    tracing::info!(roots = ?roots.paths(), "storage roots");
    let token = crate::tls::load_or_create_token(&config.data_dir).map_err(|e| error_chain(&e))?;
    let mut svc =
        Service::new(config.clone(), Some(token), settings, roots).map_err(|e| error_chain(&e))?;
    // Jobs an earlier run left unfinished: Killed, their temporary files gone.
    crate::running_jobs::recover_at_start(&config.data_dir, &svc.jobs);
    let supervisor = crate::vms::workers::install(&mut svc, &config)?;
    let svc = Arc::new(svc);
    // Bridges first (missing after a reboot; kept as they are otherwise), then
    // the VMs still running, then taps nobody uses any more.
    svc.switches.rebuild().await;
    crate::vms::workers::attach_and_reattach(&supervisor, &svc).await;
    let vms: Vec<vm_config::VmSettings> = svc
        .store()
        .entries()
        .filter_map(|e| e.settings.clone())
        .collect();
    svc.switches.remove_stale_taps(&vms).await;
    crate::vms::delete::resume_at_start(&svc);
    crate::vms::move_storage::resume_at_start(&svc).await;
    crate::checkpoints::resume_at_start(&svc);
    let (stop_tx, stop_rx) = watch::channel(false);

    let caps = crate::fd_limit::connection_caps(
        crate::fd_limit::ConnectionCaps {
            tcp_total: config.max_connections,
            tcp_per_client: config.max_connections_per_client,
            unix: config.max_unix_connections,
        },
        nofile,
    );
    tracing::info!(
        file_descriptors = nofile,
        max_connections = caps.tcp_total,
        max_connections_per_client = caps.tcp_per_client,
        max_unix_connections = caps.unix,
        "connection caps"
    );
    if caps.tcp_total < config.max_connections || caps.unix < config.max_unix_connections {
        tracing::warn!(
            file_descriptors = nofile,
            "the file-descriptor limit cannot hold the connections asked for; the caps were lowered to fit (raise the hard limit, e.g. LimitNOFILE=, to keep them)"
        );
    }
    let limits = crate::http::limits::ConnectionLimits::new(caps);
    crate::http::body::set_body_timeout(std::time::Duration::from_secs(config.body_timeout));

    let unix = crate::http::bind_unix(&config.socket).map_err(|e| error_chain(&e))?;
    let mut tasks = vec![tokio::spawn(crate::http::serve_unix(
        svc.clone(),
        unix,
        limits.clone(),
        stop_rx.clone(),
    ))];
    tracing::info!(socket = %config.socket.display(), data_dir = %config.data_dir.display(), "viridiand serving");

    if let Some(addr) = config.listen {
        let configured = config.tls_cert.clone().zip(config.tls_key.clone());
        let (cert, key) =
            crate::tls::certificate_paths(&config.data_dir, configured, config.renew_certificate)
                .map_err(|e| error_chain(&e))?;
        let tls = crate::tls::server_config(&cert, &key).map_err(|e| error_chain(&e))?;
        let listener = crate::http::bind_tcp(addr)
            .await
            .map_err(|e| error_chain(&e))?;
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(address = %local, certificate = %cert.display(), "serving TCP with TLS; requests need the token");
        tasks.push(tokio::spawn(crate::http::serve_tcp(
            svc.clone(),
            listener,
            TlsAcceptor::from(tls),
            limits.clone(),
            std::time::Duration::from_secs(config.tls_handshake_timeout),
            stop_rx.clone(),
        )));
    }

    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&config.socket);
    // Give open connections their drain time to answer in-flight requests.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
