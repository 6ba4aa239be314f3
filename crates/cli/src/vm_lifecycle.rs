//! `viridian vm start|stop|shutdown|save|pause|resume|restart NAME` (jobs, followed to
//! their end unless `--no-wait`) and `viridian vm console NAME [--log]`.
//!
//! The interactive console connects to the VM worker's control socket on this host
//! (under the daemon's data dir) and passes bytes both ways with the terminal in raw
//! mode. Detach with Ctrl-] (the VM keeps running).

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use api::host::HostInfo;
use api::vms::Vm;
use hyper::Method;

use crate::client::segment;
use crate::connection::Connection;
use crate::failure::Failure;
use crate::job_cmd;

/// The detach key of `viridian vm console`: Ctrl-] (0x1d), as in telnet and virsh.
pub const DETACH_KEY: u8 = 0x1d;

/// Starts the lifecycle `action` on `vm` as a job and follows it.
pub fn action(conn: &Connection, vm: &str, action: &str) -> Result<(), Failure> {
    let client = conn.client()?;
    job_cmd::start(
        &client,
        conn,
        &format!("/v1/vms/{}/{action}", segment(vm)),
        &serde_json::json!({}),
    )
}

/// `viridian vm shutdown NAME [--timeout SECONDS]`.
pub fn shutdown(conn: &Connection, vm: &str, timeout: Option<u64>) -> Result<(), Failure> {
    let client = conn.client()?;
    job_cmd::start(
        &client,
        conn,
        &format!("/v1/vms/{}/shutdown", segment(vm)),
        &api::vms::VmActionRequest {
            timeout_seconds: timeout,
        },
    )
}

/// `viridian vm console NAME [--log]`.
pub fn console(conn: &Connection, vm: &str, log: bool) -> Result<(), Failure> {
    let client = conn.client()?;
    if log {
        let answer = client.send(
            Method::GET,
            &format!("/v1/vms/{}/console/log", segment(vm)),
            None,
        )?;
        if answer.status >= 400 {
            // Let the client's usual error decoding speak.
            let _: serde_json::Value = client.get(&format!("/v1/vms/{}", segment(vm)))?;
            return Err(Failure::Other(format!(
                "the console log of VM {vm} cannot be read (HTTP {})",
                answer.status
            )));
        }
        let mut out = std::io::stdout();
        out.write_all(&answer.body)
            .and_then(|_| out.flush())
            .map_err(|e| Failure::Other(format!("cannot write the log: {e}")))?;
        return Ok(());
    }
    if conn.host.is_some() {
        return Err(Failure::Usage(
            "the interactive console works on the VM's own host only; over --host use `viridian vm console NAME --log`".into(),
        ));
    }
    let host: HostInfo = client.get("/v1/host")?;
    let info: Vm = client.get(&format!("/v1/vms/{}", segment(vm)))?;
    let socket = PathBuf::from(host.data_dir)
        .join("vms")
        .join(info.id.to_string())
        .join("runtime")
        .join("control.sock");
    let stream = UnixStream::connect(&socket).map_err(|e| {
        Failure::Other(format!(
            "cannot reach the worker of VM {} at {} ({e}); is the VM running? (`viridian vm show {}`)",
            info.name,
            socket.display(),
            info.name
        ))
    })?;
    let mut writer = stream
        .try_clone()
        .map_err(|e| Failure::Other(format!("cannot use the console socket: {e}")))?;
    writer
        .write_all(b"{\"op\":\"console\"}\n")
        .map_err(|e| Failure::Other(format!("cannot attach to the console: {e}")))?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .map_err(|e| Failure::Other(format!("cannot attach to the console: {e}")))?;
    if !answer.contains("\"result\":\"ok\"") {
        return Err(Failure::Other(format!(
            "the worker of VM {} refused the console: {}",
            info.name,
            answer.trim()
        )));
    }
    eprintln!(
        "Connected to the serial console of VM {}. Detach with Ctrl-]",
        info.name
    );
    let raw = RawTerminal::enter();
    // Guest output to the terminal, on its own thread.
    let output = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut input = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(pos) = chunk.iter().position(|&b| b == DETACH_KEY) {
            let _ = writer.write_all(&chunk[..pos]);
            break;
        }
        if writer.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = writer.shutdown(std::net::Shutdown::Both);
    drop(raw);
    let _ = output.join();
    eprintln!("\r\nDetached from VM {} (it keeps running).", info.name);
    Ok(())
}

/// Puts the terminal in raw mode while it lives (when stdin is a terminal).
struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    fn enter() -> Self {
        if !std::io::stdin().is_terminal() {
            return Self { saved: None };
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0, which is open.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal (checked above) and `t` is a valid termios.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: fd 0 is a terminal and `t` is a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        Self { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the attributes read from fd 0 in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}
