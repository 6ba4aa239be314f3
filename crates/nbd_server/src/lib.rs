//! NBD (fixed newstyle) server over any `vhd::Disk`, on a unix socket.
//!
//! Used by `viridian vhd serve` and by the worker, whose emulated IDE disks QEMU's
//! PIIX IDE model reads through QEMU's NBD client. QEMU never opens a disk file.
//!
//! What it speaks: the fixed-newstyle handshake with `NBD_OPT_GO`, `NBD_OPT_INFO`
//! (`NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE`), `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`
//! and `NBD_OPT_ABORT`; simple replies only (structured replies are refused with
//! `NBD_REP_ERR_UNSUP`, which clients handle by falling back); commands READ, WRITE
//! (with FUA), FLUSH, TRIM, WRITE_ZEROES (with or without `NO_HOLE`), CACHE and DISC.
//! Each connection is served on its own thread with blocking I/O; requests on one
//! connection are answered in order. An export whose disk is writable advertises
//! `CAN_MULTI_CONN`: every connection shares one `Disk`, so a flush on any connection
//! covers the writes of all of them.
//!
//! A client that breaks the protocol (bad magic, unknown client flags, oversized
//! request or option) is disconnected; it cannot make the server panic or
//! allocate without bound. Errors follow proto.md: a read or trim beyond the end
//! is EINVAL, a write or write-zeroes beyond it ENOSPC, any write to a read-only
//! export EPERM, an unknown command or a flag the command does not take EINVAL;
//! the connection stays usable after each. `tests/protocol.rs` checks all of
//! this with a raw client, and FUA/FLUSH durability with the crash harness.
//!
//! Every export has its [`DriveCounters`] (bytes and operations of the requests
//! that completed, over all its connections), read through [`Server::counters`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use drive_counters::{DriveCounters, DriveIo};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_FUA: u16 = 8;
const TFLAG_SEND_TRIM: u16 = 32;
const TFLAG_SEND_WRITE_ZEROES: u16 = 64;
const TFLAG_CAN_MULTI_CONN: u16 = 256;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;

/// The command flags each command may carry; any other flag is answered
/// with EINVAL, as proto.md asks.
fn allowed_flags(kind: u16) -> u16 {
    match kind {
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => 0,
    }
}

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Largest request payload accepted (QEMU sends at most 32 MiB).
const MAX_REQUEST: u32 = 32 << 20;

/// One export: its disk and the counters of what its clients did.
struct Export {
    /// Switchable while served ([`Server::switch`]).
    disk: vhd::DiskCell,
    counters: Arc<DriveCounters>,
}

type Exports = Arc<HashMap<String, Export>>;

/// Why [`Server::switch`] did not switch (the export keeps its disk).
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("the NBD server has no export named {0:?}")]
    NoExport(String),
    #[error(transparent)]
    Disk(#[from] vhd::SwitchError),
}

/// A running NBD server on a unix socket.
pub struct Server {
    socket: PathBuf,
    /// The listening socket, shared with the acceptor thread.
    listener: Arc<UnixListener>,
    exports: Exports,
    stopping: Arc<AtomicBool>,
    /// Ends with the connections still open when the server stopped.
    acceptor: Option<std::thread::JoinHandle<Vec<Connection>>>,
}

/// A connection's thread and a handle on its socket (to end it at stop).
type Connection = (std::thread::JoinHandle<()>, UnixStream);

impl Server {
    /// Listens on `socket` and serves `exports` (name, disk) until [`Server::stop`].
    pub fn start(socket: &Path, exports: Vec<(String, Arc<dyn vhd::Disk>)>) -> io::Result<Self> {
        let listener = Arc::new(UnixListener::bind(socket)?);
        let exports: Exports = Arc::new(
            exports
                .into_iter()
                .map(|(name, disk)| {
                    let counters = Arc::new(DriveCounters::new());
                    (
                        name,
                        Export {
                            disk: vhd::DiskCell::new(disk),
                            counters,
                        },
                    )
                })
                .collect(),
        );
        let served = exports.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let listening = listener.clone();
        let acceptor = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                let mut open: Vec<Connection> = Vec::new();
                for stream in listening.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let Ok(handle) = stream.try_clone() else {
                        continue;
                    };
                    let exports = exports.clone();
                    let thread =
                        std::thread::Builder::new()
                            .name("nbd-conn".into())
                            .spawn(move || {
                                let closer = stream.try_clone();
                                if let Err(e) = serve(stream, &exports) {
                                    if e.kind() != io::ErrorKind::UnexpectedEof {
                                        tracing::warn!("NBD connection ended with an error: {e}");
                                    }
                                }
                                // The acceptor holds a copy of the socket: closing ours
                                // alone would not show the client the end.
                                if let Ok(c) = closer {
                                    let _ = c.shutdown(std::net::Shutdown::Both);
                                }
                            });
                    open.retain(|(t, _)| !t.is_finished());
                    if let Ok(thread) = thread {
                        open.push((thread, handle));
                    }
                }
                open
            })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            listener,
            exports: served,
            stopping,
            acceptor: Some(acceptor),
        })
    }

    /// The socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The counters of export `name` (totals since the server started, over all
    /// its connections); `None` for a name it does not serve.
    pub fn counters(&self, name: &str) -> Option<Arc<DriveCounters>> {
        self.exports.get(name).map(|e| e.counters.clone())
    }

    /// Switches export `name` to `disk` while clients stay connected: requests in
    /// flight finish on the old disk, which is then flushed; later ones go to
    /// `disk`, which must have the old one's size, sector size and read-only mode.
    /// Returns the old disk (the caller closes it by dropping it).
    pub fn switch(
        &self,
        name: &str,
        disk: Arc<dyn vhd::Disk>,
    ) -> Result<Arc<dyn vhd::Disk>, SwitchError> {
        let export = self
            .exports
            .get(name)
            .ok_or_else(|| SwitchError::NoExport(name.to_string()))?;
        Ok(export.disk.replace(disk)?)
    }

    /// The disk export `name` serves now.
    pub fn disk(&self, name: &str) -> Option<Arc<dyn vhd::Disk>> {
        self.exports.get(name).map(|e| e.disk.current())
    }

    /// Stops accepting connections, ends the open ones (a request in progress
    /// completes or fails; its client sees the connection close), waits for their
    /// threads, and removes the socket. Blocks briefly: call it from a blocking
    /// context.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag: shutting the listening socket
        // down makes its blocked accept() fail at once. (Connecting to the
        // socket's path, as this once did, hangs here forever when the path
        // was removed or its folder deleted first.)
        // SAFETY: the descriptor is the listener's, open for as long as
        // `self.listener` lives; shutdown(2) does not close it or touch memory.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(a) = self.acceptor.take() {
            // End the connections still open and wait for their threads: once stop
            // returns, nothing here holds a disk (its lock can be taken again).
            for (thread, socket) in a.join().unwrap_or_default() {
                let _ = socket.shutdown(std::net::Shutdown::Both);
                let _ = thread.join();
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.shut_down();
        }
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// The export a client names; the empty name picks the only export when there is one.
fn find_export<'a>(exports: &'a Exports, name: &str) -> Option<&'a Export> {
    exports.get(name).or_else(|| {
        if name.is_empty() && exports.len() == 1 {
            exports.values().next()
        } else {
            None
        }
    })
}

fn transmission_flags(disk: &dyn vhd::Disk) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if disk.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    flags
}

/// Serves one client: handshake, option haggling, then transmission.
fn serve(mut s: UnixStream, exports: &Exports) -> io::Result<()> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = read_u32(&mut s)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        // proto.md: the server MUST close the connection on client flags it
        // does not recognize.
        return Err(protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

    let export = loop {
        if read_u64(&mut s)? != IHAVEOPT {
            return Err(protocol("option without the IHAVEOPT magic"));
        }
        let option = read_u32(&mut s)?;
        let len = read_u32(&mut s)?;
        if len > 64 * 1024 {
            return Err(protocol(format!(
                "option {option} of {len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = find_export(exports, &name) else {
                    // The protocol has no error reply here: the only answer is to close.
                    return Err(protocol(format!("unknown export {name:?}")));
                };
                let disk = export.disk.current();
                let mut out = Vec::new();
                out.extend_from_slice(&disk.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(disk.as_ref()).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                break export;
            }
            OPT_ABORT => {
                option_reply(&mut s, option, REP_ACK, &[])?;
                return Ok(());
            }
            OPT_LIST => {
                for name in exports.keys() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    option_reply(&mut s, option, REP_SERVER, &d)?;
                }
                option_reply(&mut s, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| {
                    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
                    let name = std::str::from_utf8(data.get(4..4 + n)?).ok()?.to_string();
                    Some(name)
                })();
                let Some(name) = parsed else {
                    option_reply(&mut s, option, REP_ERR_INVALID, b"malformed option")?;
                    continue;
                };
                let Some(export) = find_export(exports, &name) else {
                    let msg = format!("no export named {name:?}");
                    option_reply(&mut s, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let disk = export.disk.current();
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&disk.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(disk.as_ref()).to_be_bytes());
                option_reply(&mut s, option, REP_INFO, &info)?;
                let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                sizes.extend_from_slice(&1u32.to_be_bytes());
                sizes.extend_from_slice(&4096u32.to_be_bytes());
                sizes.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(&mut s, option, REP_INFO, &sizes)?;
                option_reply(&mut s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    break export;
                }
            }
            _ => option_reply(&mut s, option, REP_ERR_UNSUP, &[])?,
        }
    };
    transmit(s, &export.disk, &export.counters)
}

/// The NBD error for a failed command. proto.md: a write (or write-zeroes)
/// beyond the end of the export SHOULD fail with ENOSPC, a read or trim with
/// EINVAL.
fn errno(e: &vhd::Error, writes_data: bool) -> u32 {
    match e {
        vhd::Error::ReadOnly { .. } => EPERM,
        vhd::Error::OutOfRange { .. } if writes_data => ENOSPC,
        vhd::Error::OutOfRange { .. } => EINVAL,
        vhd::Error::Io { source, .. } if source.raw_os_error() == Some(28) => ENOSPC,
        _ => EIO,
    }
}

/// Writes zeros as data, for `NBD_CMD_FLAG_NO_HOLE` (the client wants the range
/// to stay allocated).
fn write_explicit_zeros(disk: &dyn vhd::Disk, offset: u64, len: u64) -> vhd::Result<()> {
    vhd::disk::check_range(disk.path(), disk.size(), offset, len)?;
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        disk.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Performs `result` and, for a FUA request, flushes `disk` after it.
fn with_fua(disk: &dyn vhd::Disk, flags: u16, result: vhd::Result<()>) -> vhd::Result<()> {
    result.and_then(|()| {
        if flags & CMD_FLAG_FUA != 0 {
            disk.flush()
        } else {
            Ok(())
        }
    })
}

/// Serves one connection's requests. Each request takes the export's disk from
/// `cell` for just its disk work (never while waiting on the socket), so a switch
/// waits only for the requests in flight.
fn transmit(s: UnixStream, cell: &vhd::DiskCell, counters: &DriveCounters) -> io::Result<()> {
    let mut r = io::BufReader::with_capacity(256 * 1024, s.try_clone()?);
    let mut w = io::BufWriter::with_capacity(256 * 1024, s);
    let mut buf = Vec::new();
    loop {
        let magic = match read_u32(&mut r) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Err(protocol(format!("request magic {magic:#x}")));
        }
        let flags = read_u16(&mut r)?;
        let kind = read_u16(&mut r)?;
        let handle = read_u64(&mut r)?;
        let offset = read_u64(&mut r)?;
        let len = read_u32(&mut r)?;
        if matches!(kind, CMD_READ | CMD_WRITE) && len > MAX_REQUEST {
            return Err(protocol(format!("request of {len} bytes is too large")));
        }
        let reply = |w: &mut io::BufWriter<UnixStream>, error: u32| -> io::Result<()> {
            w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
            w.write_all(&error.to_be_bytes())?;
            w.write_all(&handle.to_be_bytes())
        };
        // Counts the request when it succeeded, then gives its NBD error code.
        let code = |result: vhd::Result<()>, writes_data: bool, count: &dyn Fn()| match result {
            Ok(()) => {
                count();
                0
            }
            Err(e) => errno(&e, writes_data),
        };
        if flags & !allowed_flags(kind) != 0 && kind != CMD_DISC {
            if kind == CMD_WRITE {
                // The payload follows regardless; skip it to stay in step.
                buf.resize(len as usize, 0);
                r.read_exact(&mut buf)?;
            }
            reply(&mut w, EINVAL)?;
            if r.buffer().is_empty() {
                w.flush()?;
            }
            continue;
        }
        match kind {
            CMD_READ => {
                buf.resize(len as usize, 0);
                let result = cell.get().read_at(&mut buf, offset);
                match result {
                    Ok(()) => {
                        counters.read(u64::from(len));
                        reply(&mut w, 0)?;
                        w.write_all(&buf)?;
                    }
                    Err(e) => reply(&mut w, errno(&e, false))?,
                }
            }
            CMD_WRITE => {
                buf.resize(len as usize, 0);
                r.read_exact(&mut buf)?;
                let result = {
                    let disk = cell.get();
                    with_fua(disk.as_ref(), flags, disk.write_at(&buf, offset))
                };
                reply(
                    &mut w,
                    code(result, true, &|| counters.write(u64::from(len))),
                )?;
            }
            CMD_FLUSH => {
                let result = cell.get().flush();
                reply(&mut w, code(result, false, &|| counters.flush()))?;
            }
            CMD_TRIM => {
                let result = {
                    let disk = cell.get();
                    with_fua(disk.as_ref(), flags, disk.discard(offset, u64::from(len)))
                };
                reply(&mut w, code(result, false, &|| counters.discard()))?;
            }
            CMD_WRITE_ZEROES => {
                let result = {
                    let disk = cell.get();
                    let zeroed = if flags & CMD_FLAG_NO_HOLE != 0 {
                        write_explicit_zeros(disk.as_ref(), offset, u64::from(len))
                    } else {
                        disk.write_zeroes(offset, u64::from(len))
                    };
                    with_fua(disk.as_ref(), flags, zeroed)
                };
                reply(&mut w, code(result, true, &|| counters.write_zeroes()))?;
            }
            CMD_CACHE => reply(&mut w, 0)?,
            CMD_DISC => {
                w.flush()?;
                return Ok(());
            }
            _ => reply(&mut w, EINVAL)?,
        }
        // Answer at once when no further request is already waiting.
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// QEMU's own NBD client (qemu-io) writes and reads through our server, and
    /// the bytes land in the file.
    #[test]
    fn qemu_io_writes_and_reads_through_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
        let disk: Arc<dyn vhd::Disk> = Arc::new(vhd::RawDisk::open(&image, false).unwrap());
        let sock = dir.path().join("nbd.sock");
        let service = Server::start(&sock, vec![("ide0-0".into(), disk)]).unwrap();
        let uri = format!("nbd+unix:///ide0-0?socket={}", sock.display());
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0xab 65536 131072",
                "-c",
                "flush",
            ])
            .args(["-c", "read -P 0xab 65536 131072", "-c", "read -P 0 0 65536"])
            .args(["-c", "write -z 0 4096", "-c", "discard 1048576 65536"])
            .arg(&uri)
            .output()
            .expect("qemu-io runs (qemu-utils)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(!text.contains("Pattern verification failed"), "{text}");
        let bytes = std::fs::read(&image).unwrap();
        assert!(bytes[65536..65536 + 131072].iter().all(|&b| b == 0xab));
        assert!(bytes[..65536].iter().all(|&b| b == 0));
        // An unknown export is refused with a reason, not a hang.
        let bad = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512"])
            .arg(format!("nbd+unix:///nope?socket={}", sock.display()))
            .output()
            .unwrap();
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("nope"),
            "{}",
            String::from_utf8_lossy(&bad.stderr)
        );
        service.stop();
        assert!(!sock.exists());
    }

    #[test]
    fn read_only_export_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("cd.iso");
        std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
        let disk: Arc<dyn vhd::Disk> = Arc::new(vhd::RawDisk::open(&image, true).unwrap());
        let sock = dir.path().join("nbd.sock");
        let service = Server::start(&sock, vec![("ide1-0".into(), disk)]).unwrap();
        let uri = format!("nbd+unix:///ide1-0?socket={}", sock.display());
        let read = Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 7 0 4096"])
            .arg(&uri)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&read.stdout).to_string();
        assert!(text.contains("read 4096/4096"), "{text}");
        // A writable open is refused: the export says it is read-only.
        let write = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(&uri)
            .output()
            .unwrap();
        assert!(!write.status.success());
        assert!(
            String::from_utf8_lossy(&write.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&write.stderr)
        );
        assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 7));
        service.stop();
    }
}
