//! The NBD server as a client sees it, over a real unix socket: a small raw
//! client below speaks the fixed-newstyle handshake and simple replies
//! (NBD's `doc/proto.md`), so these tests can send what QEMU never would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once, Weak};
use std::time::{Duration, Instant};

use nbd_server::Server;
use vhd::crash::{AfterCrash, CrashStorage};
use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::{Disk, NoProgress};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const INFO_EXPORT: u16 = 0;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_FUA: u16 = 8;
const TFLAG_SEND_TRIM: u16 = 32;
const TFLAG_SEND_WRITE_ZEROES: u16 = 64;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

const MIB: u64 = 1 << 20;

/// Panics on the server's threads, counted by a hook installed once per test
/// process (the server names its threads `nbd-*`).
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_server_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("nbd-"))
            {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// A raw NBD client: every field on the wire is the test's to choose.
struct Client {
    s: UnixStream,
    handle: u64,
}

struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

impl Client {
    /// Connects and reads the server's greeting; sends nothing.
    fn connect(sock: &Path) -> Self {
        let s = UnixStream::connect(sock).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s, handle: 0 };
        assert_eq!(c.u64(), NBDMAGIC);
        assert_eq!(c.u64(), IHAVEOPT);
        let flags = c.u16();
        assert_eq!(flags & 3, 3, "FIXED_NEWSTYLE and NO_ZEROES offered");
        c
    }

    /// Connects and sends the client flags (fixed newstyle, no zeroes).
    fn handshake(sock: &Path) -> Self {
        let mut c = Self::connect(sock);
        c.send(&3u32.to_be_bytes());
        c
    }

    /// Handshake and `NBD_OPT_GO` for `name`: (size, transmission flags).
    fn open(sock: &Path, name: &str) -> (Self, u64, u16) {
        let mut c = Self::handshake(sock);
        let (size, flags) = c.go(name).expect("the export is there");
        (c, size, flags)
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the server");
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("the server answers");
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC, "option reply magic");
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        let data = self.bytes(len);
        OptReply { option, kind, data }
    }

    /// `NBD_OPT_GO`: the export's size and flags, or the error reply's type.
    fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data);
        let mut export = None;
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, OPT_GO);
            match r.kind {
                REP_INFO => {
                    let kind = u16::from_be_bytes([r.data[0], r.data[1]]);
                    if kind == INFO_EXPORT {
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        export = Some((size, flags));
                    }
                }
                REP_ACK => return Ok(export.expect("NBD_INFO_EXPORT before the ACK")),
                err => return Err(err),
            }
        }
    }

    fn request(&mut self, flags: u16, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        self.handle += 1;
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
        self.handle
    }

    /// A simple reply's error field, checking its magic and handle.
    fn reply(&mut self, handle: u64) -> u32 {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let error = self.u32();
        assert_eq!(self.u64(), handle, "reply handle");
        error
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let h = self.request(0, CMD_READ, offset, len, &[]);
        match self.reply(h) {
            0 => Ok(self.bytes(len as usize)),
            e => Err(e),
        }
    }

    fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        let h = self.request(flags, CMD_WRITE, offset, data.len() as u32, data);
        self.reply(h)
    }

    fn command(&mut self, flags: u16, kind: u16, offset: u64, len: u32) -> u32 {
        let h = self.request(flags, kind, offset, len, &[]);
        self.reply(h)
    }

    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, &[]);
        self.expect_closed();
    }

    /// The server has closed the connection: the next read finds the end.
    fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn make_dynamic(path: &Path, size: u64) {
    let kind = NewDisk::Dynamic {
        size,
        block_size: 2 << 20,
    };
    let opts = CreateOptions {
        kind,
        exact_size: true,
    };
    create(path, &opts, &mut NoProgress).expect("create a dynamic VHD");
}

struct Served {
    _dir: tempfile::TempDir,
    image: PathBuf,
    sock: PathBuf,
    server: Server,
}

/// Serves a new dynamic VHD of `size` bytes as export "d", and the same
/// kind of disk read-only as "ro".
fn serve_dynamic(size: u64) -> Served {
    count_server_panics();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhd");
    make_dynamic(&image, size);
    let ro_image = dir.path().join("ro.vhd");
    make_dynamic(&ro_image, size);
    let disk: Arc<dyn Disk> = Arc::from(vhd::open(&image, false).unwrap());
    let ro: Arc<dyn Disk> = Arc::from(vhd::open(&ro_image, true).unwrap());
    let sock = dir.path().join("nbd.sock");
    let server = Server::start(&sock, vec![("d".into(), disk), ("ro".into(), ro)]).unwrap();
    Served {
        _dir: dir,
        image,
        sock,
        server,
    }
}

/// The server still serves: a new client reads and writes "d".
fn assert_still_serving(sock: &Path) {
    let (mut c, size, _) = Client::open(sock, "d");
    let data = pattern(4096, 99);
    assert_eq!(c.write(0, size - 4096, &data), 0);
    assert_eq!(c.read(size - 4096, 4096).unwrap(), data);
    c.disconnect();
}

#[test]
fn unknown_option_is_refused_with_err_unsup_and_the_session_goes_on() {
    let t = serve_dynamic(8 * MIB);
    let mut c = Client::handshake(&t.sock);
    // Structured replies are not spoken (simple replies only), and 0x4242 is no option at all.
    for option in [OPT_STRUCTURED_REPLY, 0x4242] {
        c.option(option, b"some option data");
        let r = c.opt_reply();
        assert_eq!((r.option, r.kind), (option, REP_ERR_UNSUP));
    }
    // A malformed GO (name length past the data) and an unknown export are
    // errors, and the session still goes on.
    c.option(OPT_GO, &[0, 0, 1, 0, b'd']);
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    assert_eq!(c.go("nope"), Err(REP_ERR_UNKNOWN));
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply();
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        names.push(String::from_utf8(r.data[4..].to_vec()).unwrap());
    }
    names.sort();
    assert_eq!(names, ["d", "ro"]);
    // INFO describes an export without entering transmission.
    let mut info = 2u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"ro");
    info.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_INFO, &info);
    let mut ro_flags = None;
    loop {
        let r = c.opt_reply();
        assert_eq!(r.option, OPT_INFO);
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_INFO);
        if u16::from_be_bytes([r.data[0], r.data[1]]) == INFO_EXPORT {
            ro_flags = Some(u16::from_be_bytes([r.data[10], r.data[11]]));
        }
    }
    assert_ne!(ro_flags.expect("NBD_INFO_EXPORT") & TFLAG_READ_ONLY, 0);
    let (size, _) = c.go("d").expect("GO after the refusals");
    assert_eq!(size, 8 * MIB);
    assert_eq!(c.read(0, 512).unwrap(), vec![0u8; 512]);
    c.disconnect();
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn option_abort_is_acknowledged() {
    let t = serve_dynamic(4 * MIB);
    let mut c = Client::handshake(&t.sock);
    c.option(OPT_ABORT, &[]);
    let r = c.opt_reply();
    assert_eq!((r.option, r.kind), (OPT_ABORT, REP_ACK));
    c.expect_closed();
    assert_still_serving(&t.sock);
}

#[test]
fn broken_handshakes_are_disconnected_and_other_clients_are_still_served() {
    let t = serve_dynamic(4 * MIB);
    // Options without the IHAVEOPT magic.
    let mut c = Client::handshake(&t.sock);
    c.send(&0x1122_3344_5566_7788u64.to_be_bytes());
    // The server may already have closed on the bad magic: this write can fail.
    let _ = c.s.write_all(&[0u8; 8]);
    c.expect_closed();
    // An option claiming 4 GiB of data: closed without reading or allocating it.
    let mut c = Client::handshake(&t.sock);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    c.expect_closed();
    // Client flags the server does not know (the spec says: close).
    let mut c = Client::connect(&t.sock);
    c.send(&0x8000_0003u32.to_be_bytes());
    c.expect_closed();
    // A client that goes away in the middle of its option data.
    let mut c = Client::handshake(&t.sock);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0]);
    c.send(&b);
    drop(c);
    // A client that goes away before even sending its flags.
    drop(Client::connect(&t.sock));

    assert_still_serving(&t.sock);
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn request_with_a_bad_magic_ends_that_connection_only() {
    let t = serve_dynamic(4 * MIB);
    let (mut bystander, _, _) = Client::open(&t.sock, "d");
    let (mut c, _, _) = Client::open(&t.sock, "d");
    let mut b = 0xdead_beefu32.to_be_bytes().to_vec();
    b.extend_from_slice(&[0u8; 24]);
    c.send(&b);
    c.expect_closed();
    // A request too large to be a real one (64 MiB read) is refused the same way.
    let (mut c, _, _) = Client::open(&t.sock, "d");
    c.request(0, CMD_READ, 0, 64 << 20, &[]);
    c.expect_closed();
    // The connection opened before is untouched.
    let data = pattern(512, 3);
    assert_eq!(bystander.write(0, 4096, &data), 0);
    assert_eq!(bystander.read(4096, 512).unwrap(), data);
    bystander.disconnect();
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn access_beyond_the_end_is_an_error_reply_and_the_connection_stays_usable() {
    let size = 4 * MIB;
    let t = serve_dynamic(size);
    let (mut c, got, flags) = Client::open(&t.sock, "d");
    assert_eq!(got, size);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    // Reads past the end (and wrapping around u64) answer EINVAL with no payload.
    assert_eq!(c.read(size, 512), Err(EINVAL));
    assert_eq!(c.read(size - 512, 1024), Err(EINVAL));
    assert_eq!(c.read(u64::MAX - 511, 1024), Err(EINVAL));
    // Writes past the end answer ENOSPC (proto.md: "SHOULD return ENOSPC if it
    // receives a write request including one or more sectors beyond the size
    // of the device"), after their payload was read.
    let data = pattern(1024, 7);
    assert_eq!(c.write(0, size - 512, &data), ENOSPC);
    assert_eq!(c.write(CMD_FLAG_FUA, u64::MAX - 511, &data), ENOSPC);
    assert_eq!(
        c.command(0, CMD_WRITE_ZEROES, size - 512, 1024),
        ENOSPC,
        "write zeroes past the end"
    );
    assert_eq!(
        c.command(0, CMD_TRIM, size, 512),
        EINVAL,
        "trim past the end"
    );
    // An unknown command and an unknown flag are EINVAL too.
    assert_eq!(c.command(0, 0x77, 0, 512), EINVAL);
    assert_eq!(c.command(0x8000, CMD_FLUSH, 0, 0), EINVAL);
    // Nothing landed, and the connection still works.
    assert_eq!(c.read(size - 512, 512).unwrap(), vec![0u8; 512]);
    assert_eq!(c.write(0, size - 512, &data[..512]), 0);
    assert_eq!(c.read(size - 512, 512).unwrap(), data[..512]);
    c.disconnect();
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn writes_to_a_read_only_export_are_refused_with_eperm() {
    let t = serve_dynamic(4 * MIB);
    let (mut c, _, flags) = Client::open(&t.sock, "ro");
    assert_ne!(
        flags & TFLAG_READ_ONLY,
        0,
        "the export says it is read-only"
    );
    assert_eq!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    let data = pattern(4096, 1);
    assert_eq!(c.write(0, 0, &data), EPERM);
    assert_eq!(c.write(CMD_FLAG_FUA, 8192, &data), EPERM);
    assert_eq!(c.command(0, CMD_TRIM, 0, 4096), EPERM);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 0, 4096), EPERM);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.read(0, 4096).unwrap(), vec![0u8; 4096]);
    c.disconnect();
}

#[test]
fn a_client_gone_in_the_middle_of_a_write_payload_harms_nobody() {
    let t = serve_dynamic(4 * MIB);
    let (mut bystander, _, _) = Client::open(&t.sock, "d");
    let (mut c, _, _) = Client::open(&t.sock, "d");
    // A 1 MiB write of which only 1000 bytes arrive.
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&CMD_WRITE.to_be_bytes());
    b.extend_from_slice(&1u64.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&(MIB as u32).to_be_bytes());
    b.extend_from_slice(&[0xee; 1000]);
    c.send(&b);
    drop(c);
    // A client gone between two requests' headers.
    let (mut c, _, _) = Client::open(&t.sock, "d");
    c.send(&REQUEST_MAGIC.to_be_bytes()[..3]);
    drop(c);
    let data = pattern(8192, 5);
    assert_eq!(bystander.write(CMD_FLAG_FUA, 0, &data), 0);
    assert_eq!(
        bystander.read(0, 8192).unwrap(),
        data,
        "no torn write landed"
    );
    bystander.disconnect();
    assert_still_serving(&t.sock);
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn trim_and_write_zeroes_make_ranges_read_as_zeros() {
    let size = 8 * MIB;
    let t = serve_dynamic(size);
    let (mut c, _, flags) = Client::open(&t.sock, "d");
    let want = TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    assert_eq!(flags & want, want);
    let data = pattern(3 * MIB as usize, 11);
    assert_eq!(c.write(0, 0, &data), 0);
    // Trim an unaligned range inside the first block; zero one across the
    // first two blocks (without and with NO_HOLE).
    assert_eq!(c.command(0, CMD_TRIM, 1000, 5000), 0);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 2 * MIB - 4096, 8192), 0);
    assert_eq!(
        c.command(
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            CMD_WRITE_ZEROES,
            MIB + 17,
            100
        ),
        0
    );
    let mut expect = data.clone();
    expect[1000..6000].fill(0);
    expect[(2 * MIB - 4096) as usize..(2 * MIB + 4096) as usize].fill(0);
    expect[(MIB + 17) as usize..(MIB + 117) as usize].fill(0);
    let got = c.read(0, 3 * MIB as u32).unwrap();
    assert!(got == expect, "reads after TRIM/WRITE_ZEROES differ");
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
    c.disconnect();
    // The engine sees the same bytes in the file.
    t.server.stop();
    let disk = vhd::open(&t.image, true).unwrap();
    let mut back = vec![0u8; 3 * MIB as usize];
    disk.read_at(&mut back, 0).unwrap();
    assert!(
        back == expect,
        "the file holds other bytes than the client read"
    );
}

/// Waits until every holder of the disk (the server's connection threads) let it go.
fn wait_released(disk: Weak<dyn Disk>) {
    let start = Instant::now();
    while disk.upgrade().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the disk is still held"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serves a new 16 MiB dynamic VHD whose file I/O goes through the crash
/// harness, lets `client` work on it, then cuts the power (losing every write
/// the file had not flushed) before the client or the server closes anything,
/// and reopens the image from the host.
fn after_power_cut(client: impl FnOnce(&mut Client)) -> (tempfile::TempDir, Box<dyn Disk>) {
    count_server_panics();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhd");
    make_dynamic(&image, 16 * MIB);
    let crash = CrashStorage::cut_after(u64::MAX, AfterCrash::LoseUnflushedWrites);
    let disk: Arc<dyn Disk> = Arc::from(vhd::open_on(&crash, &image, false).unwrap());
    let held = Arc::downgrade(&disk);
    let sock = dir.path().join("nbd.sock");
    let server = Server::start(&sock, vec![("d".into(), disk)]).unwrap();
    let (mut c, _, flags) = Client::open(&sock, "d");
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES;
    assert_eq!(flags & want, want, "flags {flags:#x}");
    client(&mut c);
    crash.power_cut().unwrap();
    c.disconnect();
    server.stop();
    wait_released(held);
    let disk = vhd::open(&image, false).expect("the image opens after the crash");
    (dir, disk)
}

fn read_back(disk: &dyn Disk, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    disk.read_at(&mut b, offset).unwrap();
    b
}

/// A write answered with FUA, writes followed by an answered FLUSH, and a
/// WRITE_ZEROES answered with FUA survive a power cut that loses every
/// unflushed write of the file. In each case a later write with neither is
/// lost, which shows the cut would catch a server that answered before the
/// data was durable. (Each case runs on its own, so that one command's flush
/// cannot make another's data durable.)
#[test]
fn fua_and_flush_replies_mean_the_data_survives_a_crash() {
    let a = pattern(64 << 10, 1);
    let volatile = pattern(64 << 10, 3);
    let lost = vec![0u8; 64 << 10];
    // Each write lands in a new 2 MiB block of the dynamic VHD.
    let (_dir, disk) = after_power_cut(|c| {
        assert_eq!(c.write(CMD_FLAG_FUA, 0, &a), 0);
        assert_eq!(c.write(0, 4 * MIB, &volatile), 0);
    });
    assert!(
        read_back(disk.as_ref(), 0, a.len()) == a,
        "a write answered with FUA was lost"
    );
    assert!(
        read_back(disk.as_ref(), 4 * MIB, lost.len()) == lost,
        "the harness did not bite"
    );

    let (_dir, disk) = after_power_cut(|c| {
        assert_eq!(c.write(0, 0, &a[..4096]), 0);
        assert_eq!(c.write(0, 2 * MIB, &a), 0);
        assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
        assert_eq!(c.write(0, 4 * MIB, &volatile), 0);
    });
    assert!(
        read_back(disk.as_ref(), 0, 4096) == a[..4096],
        "a flushed write was lost"
    );
    assert!(
        read_back(disk.as_ref(), 2 * MIB, a.len()) == a,
        "a flushed write was lost"
    );
    assert!(
        read_back(disk.as_ref(), 4 * MIB, lost.len()) == lost,
        "the harness did not bite"
    );

    let (_dir, disk) = after_power_cut(|c| {
        assert_eq!(c.write(0, 0, &a), 0);
        assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
        assert_eq!(c.command(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 4096, 8192), 0);
        assert_eq!(c.write(0, 4 * MIB, &volatile), 0);
    });
    let mut expect = a.clone();
    expect[4096..12288].fill(0);
    assert!(
        read_back(disk.as_ref(), 0, a.len()) == expect,
        "zeros written with FUA were lost"
    );
    assert!(
        read_back(disk.as_ref(), 4 * MIB, lost.len()) == lost,
        "the harness did not bite"
    );
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
}

/// QEMU's NBD client writes and reads a pattern through the server on a
/// dynamic VHD, and the engine then reads that pattern from the file.
#[test]
fn qemu_io_pattern_on_a_served_dynamic_vhd_lands_in_the_file() {
    let t = serve_dynamic(8 * MIB);
    let uri = format!("nbd+unix:///d?socket={}", t.sock.display());
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .args(["-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"])
        .args(["-c", "write -P 0xa5 3M 512k", "-c", "flush"])
        .output()
        .expect("qemu-io runs (qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("read 1048576/1048576"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    t.server.stop();
    let disk = vhd::open(&t.image, true).unwrap();
    let mut b = vec![0u8; 4 * MIB as usize];
    disk.read_at(&mut b, 0).unwrap();
    assert!(b[..MIB as usize].iter().all(|&x| x == 0x5a));
    assert!(b[MIB as usize..3 * MIB as usize].iter().all(|&x| x == 0));
    assert!(b[3 * MIB as usize..(3 * MIB + (512 << 10)) as usize]
        .iter()
        .all(|&x| x == 0xa5));
}

/// Stopping returned only after waking the acceptor through the socket's
/// path; with the path gone (its folder deleted first, as a test's temporary
/// folder is) `stop` hung forever, and with it the worker's shutdown.
#[test]
fn stop_returns_even_when_the_socket_file_is_already_gone() {
    let t = serve_dynamic(4 * MIB);
    let (mut c, _, _) = Client::open(&t.sock, "d");
    std::fs::remove_file(&t.sock).unwrap();
    let (done, stopped) = std::sync::mpsc::channel();
    let server = t.server;
    std::thread::spawn(move || {
        server.stop();
        let _ = done.send(());
    });
    stopped
        .recv_timeout(Duration::from_secs(10))
        .expect("Server::stop returns");
    // Stopping ended the open connection, and nothing holds the disk any more:
    // it opens for writing (an exclusive lock) at once.
    c.expect_closed();
    vhd::open(&t.image, false).expect("the stopped server released the disk");
}

#[test]
fn counters_add_exactly_the_bytes_and_operations_of_completed_requests_per_export() {
    let size = 8 * MIB;
    let t = serve_dynamic(size);
    let d = t.server.counters("d").expect("export d has counters");
    let ro = t.server.counters("ro").expect("export ro has counters");
    assert!(t.server.counters("nope").is_none());
    assert_eq!(d.snapshot(), nbd_server::DriveIo::default());
    let (mut c, _, _) = Client::open(&t.sock, "d");
    // A write of N bytes adds N, a read of N adds N, each one operation.
    let n = 65536 + 512;
    assert_eq!(c.write(0, 4096, &pattern(n, 1)), 0);
    assert_eq!(c.write(CMD_FLAG_FUA, 0, &pattern(512, 2)), 0);
    assert_eq!(c.read(4096, n as u32).unwrap(), pattern(n, 1));
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.command(0, CMD_TRIM, 0, 4096), 0);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, MIB, 8192), 0);
    // Failed requests add nothing.
    assert_eq!(c.read(size, 512), Err(EINVAL));
    assert_eq!(c.write(0, size - 512, &pattern(1024, 3)), ENOSPC);
    // A second connection to the same export adds to the same counters.
    let (mut c2, _, _) = Client::open(&t.sock, "d");
    assert_eq!(c2.read(0, 4096).unwrap().len(), 4096);
    let s = d.snapshot();
    assert_eq!(s.write_bytes, n as u64 + 512);
    assert_eq!(s.write_ops, 2);
    assert_eq!(s.read_bytes, n as u64 + 4096);
    assert_eq!(s.read_ops, 2);
    assert_eq!(s.flush_ops, 1);
    assert_eq!(s.discard_ops, 1);
    assert_eq!(s.write_zeroes_ops, 1);
    // 65 KiB + 512 B: 9 units of 8 KiB; 512 B and 4 KiB: one each; twice for the read.
    assert_eq!(s.normalized_ops, 9 + 1 + 9 + 1);
    // The other export took none of it.
    assert_eq!(ro.snapshot(), nbd_server::DriveIo::default());
    c.disconnect();
    c2.disconnect();
}

#[test]
fn requests_after_a_switch_go_to_the_new_disk_on_the_same_connection() {
    let t = serve_dynamic(8 * MIB);
    let (mut c, size, _) = Client::open(&t.sock, "d");
    let before = pattern(8192, 1);
    assert_eq!(c.write(0, 0, &before), 0);
    // The copy is the disk as it was, plus data of its own, so a read shows
    // which disk answered.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.vhd");
    make_dynamic(&copy, size);
    let new: Arc<dyn Disk> = Arc::from(vhd::open(&copy, false).unwrap());
    let marker = pattern(4096, 7);
    new.write_at(&marker, MIB).unwrap();
    let old = t.server.switch("d", new).unwrap();
    assert_eq!(old.path(), Some(t.image.as_path()));
    assert_eq!(t.server.disk("d").unwrap().path(), Some(copy.as_path()));
    // The same connection now reads and writes the copy.
    assert_eq!(c.read(MIB, 4096).unwrap(), marker);
    assert_eq!(c.read(0, 8192).unwrap(), vec![0u8; 8192]);
    let after = pattern(4096, 42);
    assert_eq!(c.write(0, 2 * MIB, &after), 0);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
    drop(old);
    let old_disk = vhd::open(&t.image, true).unwrap();
    let mut back = vec![0u8; 8192];
    old_disk.read_at(&mut back, 0).unwrap();
    assert_eq!(back, before, "the old disk was flushed and keeps its data");
    let mut nothing = vec![1u8; 4096];
    old_disk.read_at(&mut nothing, 2 * MIB).unwrap();
    assert_eq!(
        nothing,
        vec![0u8; 4096],
        "nothing reached the old disk after the switch"
    );
    // A disk of another size is refused; the export keeps the copy.
    let small = dir.path().join("small.vhd");
    make_dynamic(&small, size / 2);
    let small: Arc<dyn Disk> = Arc::from(vhd::open(&small, false).unwrap());
    assert!(t.server.switch("d", small).is_err());
    assert!(t
        .server
        .switch("nope", t.server.disk("ro").unwrap())
        .is_err());
    assert_eq!(c.read(2 * MIB, 4096).unwrap(), after);
    c.disconnect();
    t.server.stop();
    let on_copy = vhd::open(&copy, true).unwrap();
    let mut b = vec![0u8; 4096];
    on_copy.read_at(&mut b, 2 * MIB).unwrap();
    assert_eq!(b, after);
}
