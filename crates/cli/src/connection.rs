//! Options every daemon command shares: where the daemon is, and how to print.

use std::path::PathBuf;

use clap::Args;

use crate::client::{Client, Endpoint};
use crate::failure::Failure;

#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// viridiand's unix socket.
    #[arg(
        long,
        global = true,
        env = "VIRIDIAN_SOCKET",
        default_value = "/run/viridian/viridian.sock"
    )]
    pub socket: PathBuf,
    /// Manage a remote host over TCP with TLS: HOST:PORT (needs --token and --ca-cert).
    #[arg(long, global = true, env = "VIRIDIAN_HOST")]
    pub host: Option<String>,
    /// The remote host's bearer token (its <data-dir>/token).
    #[arg(long, global = true, env = "VIRIDIAN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The remote host's certificate to trust (its <data-dir>/tls/cert.pem).
    #[arg(long, global = true, env = "VIRIDIAN_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// For commands that start a job: print the job and return at once.
    #[arg(long, global = true)]
    pub no_wait: bool,
}

impl Connection {
    /// Local relative paths are made absolute from the current directory; over
    /// `--host` paths are the remote host's and pass as given (relative ones then
    /// name files in the host's `Virtual Hard Disks` folder).
    pub fn host_path(&self, path: String) -> String {
        if self.host.is_some() || path.starts_with('/') {
            return path;
        }
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(path).display().to_string(),
            Err(_) => path,
        }
    }

    pub fn client(&self) -> Result<Client, Failure> {
        let endpoint = match &self.host {
            None => Endpoint::Unix(self.socket.clone()),
            Some(host) => {
                let token = self.token.clone().ok_or_else(|| {
                    Failure::Usage("--host needs --token (or VIRIDIAN_TOKEN): the remote host's <data-dir>/token".into())
                })?;
                let ca_cert = self.ca_cert.clone().ok_or_else(|| {
                    Failure::Usage(
                        "--host needs --ca-cert (or VIRIDIAN_CA_CERT): the remote host's <data-dir>/tls/cert.pem".into(),
                    )
                })?;
                Endpoint::Tcp {
                    host: host.clone(),
                    token,
                    ca_cert,
                }
            }
        };
        Client::new(endpoint)
    }
}
