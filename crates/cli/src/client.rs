//! A small HTTP/1.1 client for viridiand: unix socket, or TCP with TLS and a token.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::failure::Failure;

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp {
        host: String,
        token: String,
        ca_cert: PathBuf,
    },
}

pub struct Client {
    endpoint: Endpoint,
    runtime: tokio::runtime::Runtime,
}

pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Result<Client, Failure> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::Other(format!("cannot start the async runtime: {e}")))?;
        Ok(Client { endpoint, runtime })
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp { host, .. } => format!("https://{host}"),
        }
    }

    /// Sends one request and returns the raw answer.
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, Failure> {
        self.runtime.block_on(self.send_async(method, path, body))
    }

    async fn send_async(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, Failure> {
        let connect = |reason: String| Failure::Connect {
            endpoint: self.describe(),
            reason,
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "viridiand");
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let stream = UnixStream::connect(p).await.map_err(|e| {
                    connect(format!("{e}; is viridiand running? (`--socket` or VIRIDIAN_SOCKET names another socket)"))
                })?;
                let req = builder
                    .body(Full::new(Bytes::from(body.unwrap_or_default())))
                    .map_err(|e| connect(e.to_string()))?;
                exchange(stream, req).await.map_err(connect)
            }
            Endpoint::Tcp {
                host,
                token,
                ca_cert,
            } => {
                let tls = tls_connector(ca_cert).map_err(connect)?;
                let tcp = TcpStream::connect(host)
                    .await
                    .map_err(|e| connect(e.to_string()))?;
                let name = host
                    .rsplit_once(':')
                    .map(|(h, _)| h)
                    .unwrap_or(host)
                    .trim_matches(['[', ']'])
                    .to_string();
                let server_name = rustls::pki_types::ServerName::try_from(name)
                    .map_err(|e| connect(format!("{host} is not a valid host name: {e}")))?;
                let stream = tls
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| connect(format!("TLS: {e}")))?;
                let req = builder
                    .header("authorization", format!("Bearer {token}"))
                    .body(Full::new(Bytes::from(body.unwrap_or_default())))
                    .map_err(|e| connect(e.to_string()))?;
                exchange(stream, req).await.map_err(connect)
            }
        }
    }

    /// Sends a request and decodes a JSON answer; a 4xx/5xx becomes `Failure::Api`.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(T, Answer), Failure> {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let answer = self.send(method, path, bytes)?;
        let value = decode(&answer)?;
        Ok((value, answer))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        Ok(self.call::<T>(Method::GET, path, None::<&()>)?.0)
    }

    /// Sends a request whose success has no body (204).
    pub fn call_empty(&self, method: Method, path: &str) -> Result<(), Failure> {
        let answer = self.send(method, path, None)?;
        if answer.status >= 400 {
            return Err(api_failure(&answer));
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(answer: &Answer) -> Result<T, Failure> {
    if answer.status >= 400 {
        return Err(api_failure(answer));
    }
    serde_json::from_slice(&answer.body).map_err(|e| Failure::Protocol {
        status: answer.status,
        body: format!("{e}: {}", String::from_utf8_lossy(&answer.body)),
    })
}

fn api_failure(answer: &Answer) -> Failure {
    match serde_json::from_slice(&answer.body) {
        Ok(body) => Failure::Api(body),
        Err(_) => Failure::Protocol {
            status: answer.status,
            body: String::from_utf8_lossy(&answer.body).into_owned(),
        },
    }
}

async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer { status, body })
}

fn tls_connector(ca_cert: &PathBuf) -> Result<tokio_rustls::TlsConnector, String> {
    let pem = std::fs::read(ca_cert)
        .map_err(|e| format!("cannot read the CA certificate {}: {e}", ca_cert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert =
            cert.map_err(|e| format!("{} is not a PEM certificate: {e}", ca_cert.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{} cannot be trusted: {e}", ca_cert.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Percent-encodes one path segment (a VM name may hold spaces and such).
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
