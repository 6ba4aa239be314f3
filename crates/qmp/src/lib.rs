//! A small async QMP client.
//!
//! [`Client::connect`] opens QEMU's QMP unix socket, reads the greeting and leaves
//! capability negotiation, after which commands can be executed concurrently: each
//! carries its own `id` and the reply is routed back to its caller. Asynchronous
//! events (`SHUTDOWN`, `STOP`, `MIGRATION`, ...) go to every [`Client::events`]
//! subscriber. When QEMU closes the socket every pending and later command fails
//! with [`Error::Disconnected`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// Faults talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to QEMU's QMP socket {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on QEMU's QMP socket {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU sent something on its QMP socket {} that is not QMP: {detail}", socket.display())]
    Protocol { socket: PathBuf, detail: String },
    #[error("QEMU refused QMP command {command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU closed its QMP socket {} (the QEMU process has probably exited)", socket.display())]
    Disconnected { socket: PathBuf },
    #[error("timed out after {:.1} s waiting for {what} from QEMU", after.as_secs_f64())]
    Timeout { what: String, after: Duration },
    #[error("QEMU's reply to {command} has an unexpected shape")]
    Reply {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Event {
    /// Event name, e.g. `SHUTDOWN`.
    pub event: String,
    /// Event data; `Null` when QEMU sent none.
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it (host wall clock); absent in events that had none.
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

/// A QMP event's `timestamp`: seconds and microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    /// Microseconds since the Unix epoch.
    pub fn micros(&self) -> i64 {
        self.seconds
            .saturating_mul(1_000_000)
            .saturating_add(self.microseconds)
    }
}

/// QEMU's version as announced in the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// The result of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StatusInfo {
    pub running: bool,
    /// QEMU's run state: `running`, `paused`, `prelaunch`, `inmigrate`, `postmigrate`,
    /// `shutdown`, `guest-panicked`, ...
    pub status: String,
}

/// The result of `query-migrate` (the fields the worker uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, `cancelled`, ...; absent before any migration.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
}

type Reply = std::result::Result<Value, Error>;

struct Shared {
    socket: PathBuf,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, (String, oneshot::Sender<Reply>)>,
    closed: bool,
}

/// A connected QMP client. Cheap to share behind an `Arc`.
pub struct Client {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    version: QemuVersion,
}

impl Client {
    /// Connects to the QMP socket at `socket`, reads the greeting and negotiates
    /// capabilities (none are requested).
    pub async fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| Error::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Self::from_stream(stream, socket).await
    }

    /// Connects, retrying until `timeout` while the socket does not exist yet or
    /// refuses connections (QEMU creating it).
    pub async fn connect_with_retry(socket: &Path, timeout: Duration) -> Result<Self> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => return Self::from_stream(stream, socket).await,
                Err(source) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Connect {
                            socket: socket.to_path_buf(),
                            source,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Runs the QMP handshake over an already connected stream.
    pub async fn from_stream(stream: UnixStream, socket: &Path) -> Result<Self> {
        let socket = socket.to_path_buf();
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting =
            read_message(&mut lines, &socket)
                .await?
                .ok_or_else(|| Error::Disconnected {
                    socket: socket.clone(),
                })?;
        let version = parse_greeting(&greeting).ok_or_else(|| Error::Protocol {
            socket: socket.clone(),
            detail: format!("expected a greeting, got {greeting}"),
        })?;
        let shared = Arc::new(Shared {
            socket,
            pending: Mutex::new(Pending::default()),
        });
        let (events, _) = broadcast::channel(256);
        tokio::spawn(read_loop(lines, shared.clone(), events.clone()));
        let client = Self {
            shared,
            writer: tokio::sync::Mutex::new(write),
            next_id: AtomicU64::new(1),
            events,
            version,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// A new subscription to QEMU's events, from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether QEMU has closed the socket.
    pub fn is_closed(&self) -> bool {
        self.lock_pending().closed
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A poisoned lock only means another task panicked while holding it; the map
        // itself stays consistent (each operation is a single insert or remove).
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Executes `command` with optional `arguments` and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.lock_pending();
            if pending.closed {
                return Err(self.disconnected());
            }
            pending.waiting.insert(id, (command.to_string(), tx));
        }
        let mut line = message.to_string();
        line.push('\n');
        let written = {
            let mut writer = self.writer.lock().await;
            writer.write_all(line.as_bytes()).await
        };
        if let Err(source) = written {
            self.lock_pending().waiting.remove(&id);
            return Err(if is_disconnect(&source) {
                self.disconnected()
            } else {
                Error::Io {
                    socket: self.shared.socket.clone(),
                    source,
                }
            });
        }
        match rx.await {
            Ok(reply) => reply,
            Err(_) => Err(self.disconnected()),
        }
    }

    fn disconnected(&self) -> Error {
        Error::Disconnected {
            socket: self.shared.socket.clone(),
        }
    }

    async fn execute_typed<T: for<'de> Deserialize<'de>>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T> {
        let value = self.execute(command, arguments).await?;
        serde_json::from_value(value).map_err(|source| Error::Reply {
            command: command.to_string(),
            source,
        })
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute_typed("query-status", None).await
    }

    /// `cont`: resumes vCPUs.
    pub async fn cont(&self) -> Result<()> {
        self.execute("cont", None).await.map(drop)
    }

    /// `stop`: pauses vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.execute("stop", None).await.map(drop)
    }

    /// `system_powerdown`: presses the ACPI power button.
    pub async fn system_powerdown(&self) -> Result<()> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: resets the machine.
    pub async fn system_reset(&self) -> Result<()> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once. The socket may close before the reply arrives,
    /// which counts as success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute("quit", None).await {
            Ok(_) | Err(Error::Disconnected { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `migrate` to `uri` (e.g. `unix:/path`), returning once QEMU has started it.
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Turns the migration capability `name` (e.g. `background-snapshot`) on or
    /// off for the next migration.
    pub async fn set_migration_capability(&self, name: &str, on: bool) -> Result<()> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": name, "state": on }] })),
        )
        .await
        .map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo> {
        self.execute_typed("query-migrate", None).await
    }

    /// Polls `query-migrate` until the migration completes, fails, or `timeout` passes.
    pub async fn wait_migration(&self, timeout: Duration) -> Result<MigrationInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.query_migrate().await?;
            match info.status.as_deref() {
                Some("completed") | Some("failed") | Some("cancelled") => return Ok(info),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the migration to finish".into(),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the event named `name` on `events` (subscribe before causing it).
    pub async fn wait_event(
        events: &mut broadcast::Receiver<Event>,
        name: &str,
        timeout: Duration,
    ) -> Result<Event> {
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(event) if event.event == name => return Some(event),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(Error::Timeout {
                what: format!("event {name} (the QMP connection closed first)"),
                after: timeout,
            }),
            Err(_) => Err(Error::Timeout {
                what: format!("event {name}"),
                after: timeout,
            }),
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
    )
}

fn parse_greeting(greeting: &Value) -> Option<QemuVersion> {
    let qemu = greeting.get("QMP")?.get("version")?.get("qemu")?;
    serde_json::from_value(qemu.clone()).ok()
}

async fn read_message(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    socket: &Path,
) -> Result<Option<Value>> {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(None),
            Err(source) if is_disconnect(&source) => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    socket: socket.to_path_buf(),
                    source,
                })
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        return serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| Error::Protocol {
                socket: socket.to_path_buf(),
                detail: format!("invalid JSON ({e}): {line}"),
            });
    }
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
) {
    loop {
        let message = match read_message(&mut lines, &shared.socket).await {
            Ok(Some(message)) => message,
            // End of stream, or garbage on the stream: either way the connection is
            // unusable, and every waiter learns that it is disconnected.
            Ok(None) | Err(_) => break,
        };
        if message.get("event").is_some() {
            if let Ok(event) = serde_json::from_value::<Event>(message) {
                // No subscribers is fine: nobody is interested right now.
                let _ = events.send(event);
            }
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let waiter = shared
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .waiting
            .remove(&id);
        let Some((command, tx)) = waiter else {
            continue;
        };
        let reply = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else if let Some(error) = message.get("error") {
            Err(Error::Command {
                command,
                class: error
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("GenericError")
                    .to_string(),
                desc: error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("(no description)")
                    .to_string(),
            })
        } else {
            Err(Error::Protocol {
                socket: shared.socket.clone(),
                detail: format!("reply without return or error: {message}"),
            })
        };
        // The caller may have given up waiting; that is fine.
        let _ = tx.send(reply);
    }
    let waiting = {
        let mut pending = shared
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.closed = true;
        std::mem::take(&mut pending.waiting)
    };
    for (_, (_, tx)) in waiting {
        let _ = tx.send(Err(Error::Disconnected {
            socket: shared.socket.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    /// A scripted fake QEMU: sends the greeting, then answers each command with the
    /// reply `respond` gives (None = close the socket).
    async fn fake_qemu<F>(dir: &Path, respond: F) -> PathBuf
    where
        F: Fn(&Value) -> Vec<String> + Send + 'static,
    {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            write
                .write_all(format!("{GREETING}\r\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).unwrap();
                let replies = respond(&request);
                if replies.is_empty() {
                    return;
                }
                for reply in replies {
                    write
                        .write_all(format!("{reply}\r\n").as_bytes())
                        .await
                        .unwrap();
                }
            }
        });
        path
    }

    fn ok(request: &Value, value: Value) -> String {
        json!({ "return": value, "id": request["id"] }).to_string()
    }

    #[tokio::test]
    async fn handshake_reads_version_and_commands_get_their_own_replies() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(dir.path(), |req| match req["execute"].as_str().unwrap() {
            "query-status" => vec![
                // An event arrives in between; the reply must still find its caller.
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#
                    .to_string(),
                ok(
                    req,
                    json!({"running": true, "singlestep": false, "status": "running"}),
                ),
            ],
            _ => vec![ok(req, json!({}))],
        })
        .await;
        let client = Client::connect(&path).await.unwrap();
        assert_eq!(
            client.version(),
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 0
            }
        );
        let mut events = client.events();
        let status = client.query_status().await.unwrap();
        assert_eq!(
            status,
            StatusInfo {
                running: true,
                status: "running".into()
            }
        );
        let event = Client::wait_event(&mut events, "RESUME", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(event.event, "RESUME");
        assert_eq!(event.timestamp.map(|t| t.micros()), Some(1_000_002));
    }

    #[tokio::test]
    async fn command_error_carries_class_and_description() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(dir.path(), |req| match req["execute"].as_str().unwrap() {
            "cont" => vec![json!({"error": {"class": "GenericError", "desc": "Migration is not finished"}, "id": req["id"]}).to_string()],
            _ => vec![ok(req, json!({}))],
        })
        .await;
        let client = Client::connect(&path).await.unwrap();
        let err = client.cont().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "QEMU refused QMP command cont: Migration is not finished (GenericError)"
        );
    }

    #[tokio::test]
    async fn closed_socket_fails_pending_and_later_commands_and_quit_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(dir.path(), |req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => vec![ok(req, json!({}))],
            _ => vec![],
        })
        .await;
        let client = Client::connect(&path).await.unwrap();
        assert!(client.quit().await.is_ok());
        let err = client.query_status().await.unwrap_err();
        assert!(matches!(err, Error::Disconnected { .. }), "{err}");
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn garbage_greeting_is_a_protocol_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"SSH-2.0-OpenSSH\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let err = match Client::connect(&path).await {
            Err(e) => e,
            Ok(_) => panic!("connected to something that is not QMP"),
        };
        let text = err.to_string();
        assert!(text.contains("not QMP"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_qemu_reports_status_and_stop_cont_and_quit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let mut child = tokio::process::Command::new("qemu-system-x86_64")
            .args([
                "-nodefaults",
                "-S",
                "-display",
                "none",
                "-accel",
                "tcg",
                "-m",
                "32",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-system-x86_64 runs (scripts/setup.sh installs it)");
        let client = Client::connect_with_retry(&sock, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(client.version().major, 7);
        assert_eq!(client.query_status().await.unwrap().status, "prelaunch");
        let mut events = client.events();
        client.cont().await.unwrap();
        Client::wait_event(&mut events, "RESUME", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(client.query_status().await.unwrap().running);
        client.stop().await.unwrap();
        assert_eq!(client.query_status().await.unwrap().status, "paused");
        let err = client.execute("no-such-command", None).await.unwrap_err();
        assert!(
            matches!(err, Error::Command { ref class, .. } if class == "CommandNotFound"),
            "{err}"
        );
        client.quit().await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
    }
}
