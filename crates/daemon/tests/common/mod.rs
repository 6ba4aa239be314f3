//! Runs a real `viridiand` on a temporary data dir and socket, and talks raw
//! HTTP/1.1 to it (so tests can also send what a well-behaved client never would).
#![allow(dead_code)]

pub mod disk_data;
pub mod guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    /// Extra environment for every `launch` from now on.
    pub env: Vec<(String, String)>,
    /// The daemon runs in a network namespace of the test's own, held by this
    /// process (`unshare --net sleep`): the daemon, its workers and QEMU make their
    /// bridges and taps there, never on the host's. It stays across restarts;
    /// [`Daemon::reboot_netns`] replaces it with an empty one.
    pub netns: Option<Child>,
}

/// A process in a new, empty network namespace, once it is there.
fn netns_holder() -> Child {
    let child = Command::new("unshare")
        .args(["--net", "--", "sleep", "infinity"])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare runs");
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = format!("/proc/{}/ns/net", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until unshare has run, the child is still in our namespace: never join that.
    while std::fs::read_link(&theirs).map_or(true, |ns| ns == ours) {
        assert!(
            Instant::now() < deadline,
            "unshare --net did not take effect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Loopback up, as on any host: TCP listeners on 127.0.0.1 work inside.
    let up = Command::new("nsenter")
        .arg(format!("--net={theirs}"))
        .args(["--", "ip", "link", "set", "lo", "up"])
        .status()
        .expect("nsenter runs");
    assert!(
        up.success(),
        "cannot bring loopback up in the test's namespace"
    );
    child
}

pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Value,
    pub raw: String,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

impl Daemon {
    /// A daemon whose storage roots are its data dir and the test's whole temporary
    /// folder (where tests keep their disks), plus `extra`'s.
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, true, false)
    }

    /// A daemon with only its data dir as storage root (and what `extra` adds).
    pub fn start_confined(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, false, false)
    }

    /// A daemon in a network namespace of its own (see [`Daemon::netns`]).
    pub fn start_in_netns(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, true, true)
    }

    fn start_with(extra: &[&str], test_root: bool, netns: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let socket = dir.path().join("viridian.sock");
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if test_root {
            extra.push("--storage-root".into());
            extra.push(dir.path().display().to_string());
        }
        let mut d = Daemon {
            dir,
            data,
            socket,
            child: None,
            extra,
            env: Vec::new(),
            netns: netns.then(netns_holder),
        };
        d.launch();
        d
    }

    pub fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("viridiand.log")).unwrap();
        // `nsenter` execs the daemon: the child's pid is the daemon's.
        let mut command = if let Some(holder) = &self.netns {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/proc/{}/ns/net", holder.id()))
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_viridiand"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_viridiand"))
        };
        let child = command
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra)
            .env("VIRIDIAN_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "viridiand did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `program args` in the daemon's network namespace (its host side);
    /// returns whether it succeeded and its output.
    pub fn in_netns(&self, program: &str, args: &[&str]) -> (bool, String) {
        let pid = self
            .netns
            .as_ref()
            .expect("this daemon runs in the host's namespace")
            .id();
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .arg("--")
            .arg(program)
            .args(args)
            .output()
            .expect("nsenter runs");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Replaces the daemon's network namespace with an empty one (as a host
    /// reboot leaves it: no bridges, no taps); takes effect at the next launch.
    pub fn reboot_netns(&mut self) {
        let mut old = self
            .netns
            .take()
            .expect("a daemon in a namespace of its own");
        let _ = old.kill();
        let _ = old.wait();
        self.netns = Some(netns_holder());
    }

    /// The log of the current launch (each launch starts a new one).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("viridiand.log")).unwrap_or_default()
    }

    /// SIGKILL: the daemon gets no chance to finish anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "viridiand exited with {status}; log:\n{}",
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "viridiand did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn raw(&self, request: &[u8]) -> Reply {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The daemon may answer (413) and close before the whole request is sent;
        // its answer is still there to read.
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        parse_reply(&out)
    }

    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.raw(&build(method, path, body, &[]))
    }

    pub fn get(&self, path: &str) -> Reply {
        self.req("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.req("POST", path, Some(&body.to_string()))
    }

    pub fn create_vm(&self, name: &str) -> Value {
        let r = self.post(
            "/v1/vms",
            serde_json::json!({"name": name, "processor_count": 1, "memory_mib": 256}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        r.body
    }

    /// Every file under the data dir with its bytes: to prove a request changed nothing.
    pub fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        walk(&self.data.join("vms"), &mut out);
        out.sort();
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push((p.clone(), Vec::new()));
            walk(&p, out);
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for mut c in [self.child.take(), self.netns.take()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn build(method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

pub fn parse_reply(out: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body_value = serde_json::from_str(body).unwrap_or(Value::Null);
    Reply {
        status,
        headers: head.to_string(),
        body: body_value,
        raw: text.clone(),
    }
}

/// Waits (via the API) until job `id` has finished and returns it.
pub fn wait_job(d: &Daemon, id: &str) -> Value {
    let r = d.get(&format!("/v1/jobs/{id}/wait?timeout=30"));
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body
}
