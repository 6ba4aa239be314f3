//! Serving the API: the unix socket, and optionally TCP with TLS.

pub mod body;
pub mod limits;
pub mod router;
pub mod sse;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::job_quota::Client;
use crate::service::Service;
use limits::{ConnectionLimits, Refused};
use router::Transport;

/// How long in-flight requests get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

/// How long a client may take to send a request's headers (a stalled client cannot
/// hold a connection open forever).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another viridiand already serves {0}; stop it first")]
    InUse(String),
    #[error("cannot create the socket {path}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on TCP {addr}")]
    Tcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the unix socket with mode 0660, replacing a stale socket file.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ListenError> {
    let err = |source| ListenError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        // The socket's own mode (0660) decides who may connect; the folder made for
        // it is open for the path lookup whatever the service's umask.
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Tcp {
            addr: addr.to_string(),
            source,
        })
}

async fn serve_connection<S>(
    svc: Arc<Service>,
    io: S,
    transport: Transport,
    client: Client,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_shutdown = shutdown.clone();
    let service = service_fn(move |req| {
        let svc = svc.clone();
        let shutdown = conn_shutdown.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                router::handle(svc, req, transport, client, shutdown).await,
            )
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

/// Resolves once shutdown has been asked for.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Accepts on the unix socket until shutdown; a connection over the unix socket's
/// own cap is closed at once.
pub async fn serve_unix(
    svc: Arc<Service>,
    listener: UnixListener,
    limits: Arc<ConnectionLimits>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(place) = limits.try_unix() else {
                        tracing::debug!(cap = limits.caps().unix, "unix socket connection refused: at the cap");
                        drop(stream);
                        continue;
                    };
                    let svc = svc.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        let _place = place;
                        serve_connection(svc, stream, Transport::Unix, Client::Local, shutdown).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the unix socket failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Accepts TLS connections on TCP until shutdown; every request needs the token.
/// A connection over the caps (in all, or from its address) is closed at once,
/// before the TLS handshake; the handshake itself has `handshake_timeout`.
pub async fn serve_tcp(
    svc: Arc<Service>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Arc<ConnectionLimits>,
    handshake_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let place = match limits.try_tcp(peer.ip()) {
                        Ok(place) => place,
                        Err(why) => {
                            let caps = limits.caps();
                            match why {
                                Refused::Total => tracing::debug!(%peer, cap = caps.tcp_total, "TCP connection refused: all connections at the cap"),
                                Refused::PerClient => tracing::debug!(%peer, cap = caps.tcp_per_client, "TCP connection refused: this address is at its cap"),
                            }
                            // Dropped unread: no TLS, no buffers, the descriptor back at once.
                            drop(stream);
                            continue;
                        }
                    };
                    // Small answers go out at once instead of waiting on the peer's
                    // delayed ACK (about 40 ms per new TLS connection otherwise).
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let acceptor = acceptor.clone();
                    let svc = svc.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        let _place = place;
                        let client = Client::Remote(peer.ip());
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => serve_connection(svc, tls, Transport::Tcp, client, shutdown).await,
                            Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on TCP failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}
