//! Requests through the vhost-user protocol, with this test as the front end (what
//! QEMU does): guest memory is a memfd in two regions, the test lays out the
//! virtqueue and requests in it and reads the used ring, the dirty log and the
//! disk's bytes afterwards.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_blk::protocol::*;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 4 << 20;
/// The second memory region starts here: a buffer across it is split by the device.
const REGION2: u64 = 2 << 20;
const QUEUE: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x3000;
const STATUS: u64 = 0x5000;
const PAGE: u64 = 4096;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn memfd(name: &str, len: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// One buffer of a request: guest address, length, device-writable.
type Buf = (u64, u32, bool);

struct Driver {
    front: Frontend,
    mem: GuestMemoryMmap<()>,
    kick: EventFd,
    _call: EventFd,
    _guest: File,
    log: File,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    /// Connects to `sock` and sets up queue 0, with the dirty log on.
    fn connect(sock: &Path) -> Self {
        let guest = memfd("guest", MEM as u64);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(guest.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let mut front = Frontend::connect(sock, 2).unwrap();
        front.set_owner().unwrap();
        let offered = front.get_features().unwrap();
        let want = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
            | (1 << VHOST_F_LOG_ALL);
        assert_eq!(offered & want, want, "the device offers {want:#x}");
        front.set_features(want).unwrap();
        let pf = front.get_protocol_features().unwrap();
        front
            .set_protocol_features(
                pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::LOG_SHMFD),
            )
            .unwrap();
        let region = |gpa: u64, len: u64| VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: base + gpa,
            mmap_offset: gpa,
            mmap_handle: guest.as_raw_fd(),
        };
        front
            .set_mem_table(&[region(0, REGION2), region(REGION2, MEM as u64 - REGION2)])
            .unwrap();
        let log = memfd("log", PAGE);
        front
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: PAGE,
                    mmap_offset: 0,
                    mmap_handle: log.as_raw_fd(),
                }),
            )
            .unwrap();
        front.set_vring_num(0, QUEUE).unwrap();
        front
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QUEUE,
                    queue_size: QUEUE,
                    flags: 0,
                    desc_table_addr: base + DESC,
                    used_ring_addr: base + USED,
                    avail_ring_addr: base + AVAIL,
                    log_addr: None,
                },
            )
            .unwrap();
        front.set_vring_base(0, 0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        front.set_vring_call(0, &call).unwrap();
        front.set_vring_kick(0, &kick).unwrap();
        front.set_vring_enable(0, true).unwrap();
        Self {
            front,
            mem,
            kick,
            _call: call,
            _guest: guest,
            log,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Lays out one request's descriptors and makes it available (no kick).
    fn put(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = (self.next_desc + i as u16) % QUEUE;
            let last = i + 1 == bufs.len();
            let mut flags = if write { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            let at = GuestAddress(DESC + 16 * u64::from(d));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem
                .write_obj((d + 1) % QUEUE, at.unchecked_add(14))
                .unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % QUEUE;
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        head
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits for `n` more used entries; returns them as (head, length).
    fn wait_used(&mut self, n: u16) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx().wrapping_sub(self.used_seen) < n {
            assert!(
                Instant::now() < deadline,
                "the device did not complete the requests"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        (0..n)
            .map(|_| {
                let at = USED + 4 + 8 * u64::from(self.used_seen % QUEUE);
                self.used_seen = self.used_seen.wrapping_add(1);
                (
                    self.mem.read_obj(GuestAddress(at)).unwrap(),
                    self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// Performs one request and returns its status byte (at `status`).
    fn request(&mut self, kind: u32, sector: u64, data: &[Buf], status: u64) -> u8 {
        let header = RequestHeader {
            request_type: kind,
            sector,
        };
        self.mem
            .write_slice(&header.serialize(), GuestAddress(HEADERS))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut bufs = vec![(HEADERS, REQUEST_HEADER_SIZE as u32, false)];
        bufs.extend_from_slice(data);
        bufs.push((status, 1, true));
        self.put(&bufs);
        self.kick();
        self.wait_used(1);
        self.mem.read_obj(GuestAddress(status)).unwrap()
    }

    fn dirty(&self, gpa: u64) -> bool {
        let page = gpa / PAGE;
        let mut byte = [0u8];
        self.log.read_exact_at(&mut byte, page / 8).unwrap();
        byte[0] & (1 << (page % 8)) != 0
    }

    fn clear_log(&self) {
        self.log.write_all_at(&[0u8; PAGE as usize], 0).unwrap();
    }
}

/// A fixed VHD (the engine hands out its file runs: preadv/pwritev) or a raw disk
/// (no file runs: the engine's read_at/write_at per slice), 1 MiB, filled with a
/// pattern; returns the disk and the pattern.
fn disk(dir: &Path, fixed_vhd: bool) -> (Arc<dyn vhd::Disk>, Vec<u8>) {
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 / 512 + i) as u8).collect();
    let disk: Arc<dyn vhd::Disk> = if fixed_vhd {
        let path = dir.join("d.vhd");
        vhd::vhd1::create::create(
            &path,
            &vhd::vhd1::create::CreateOptions {
                kind: vhd::vhd1::create::NewDisk::Fixed { size: 1 << 20 },
                exact_size: true,
            },
            &mut vhd::NoProgress,
        )
        .unwrap();
        Arc::from(vhd::open(&path, false).unwrap())
    } else {
        let path = dir.join("d.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        Arc::new(vhd::RawDisk::open(&path, false).unwrap())
    };
    disk.write_at(&pattern, 0).unwrap();
    (disk, pattern)
}

/// Data buffers of a 12 KiB request, in three odd pieces: one across the border
/// between the two memory regions, one inside a page, one in the first region.
const SPREAD: [(u64, u32); 3] = [
    (REGION2 - 0x1000, 0x2000),
    (0x30_0200, 0x600),
    (0x1_0000, 0xa00),
];

fn spread(write: bool) -> Vec<Buf> {
    SPREAD.iter().map(|&(a, l)| (a, l, write)).collect()
}

fn reads_and_writes_spread_over_descriptors(fixed_vhd: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (disk, pattern) = disk(dir.path(), fixed_vhd);
    let sock = dir.path().join("blk.sock");
    let server = vhost_blk::Server::start(disk.clone(), &sock, Default::default()).unwrap();
    let mut d = Driver::connect(&sock);

    d.clear_log();
    let sector = 24;
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, sector, &spread(true), STATUS),
        VIRTIO_BLK_S_OK
    );
    let mut at = (sector * 512) as usize;
    for &(addr, len) in &SPREAD {
        let mut got = vec![0u8; len as usize];
        d.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(
            got,
            pattern[at..at + len as usize],
            "the bytes at guest {addr:#x}"
        );
        at += len as usize;
        for page in (addr / PAGE)..=((addr + u64::from(len) - 1) / PAGE) {
            assert!(
                d.dirty(page * PAGE),
                "guest page {page:#x} the device wrote is in the dirty log"
            );
        }
    }
    assert!(
        d.dirty(STATUS),
        "the status byte's page is in the dirty log"
    );
    assert!(
        !d.dirty(0x38_0000),
        "a page the device did not touch is clean"
    );

    // A write whose first data bytes share the header's descriptor.
    let fresh: Vec<u8> = (0..0x3000u32).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    let mut at = 0;
    for &(addr, len) in &SPREAD {
        d.mem
            .write_slice(&fresh[at..at + len as usize], GuestAddress(addr))
            .unwrap();
        at += len as usize;
    }
    let header = RequestHeader {
        request_type: VIRTIO_BLK_T_OUT,
        sector: 100,
    };
    let joint = 0x6000u64;
    d.mem
        .write_slice(&header.serialize(), GuestAddress(joint))
        .unwrap();
    d.mem
        .write_slice(
            &[0xeeu8; 512],
            GuestAddress(joint + REQUEST_HEADER_SIZE as u64),
        )
        .unwrap();
    let mut bufs = vec![(joint, REQUEST_HEADER_SIZE as u32 + 512, false)];
    bufs.extend(spread(false));
    bufs.push((STATUS, 1, true));
    d.put(&bufs);
    d.kick();
    d.wait_used(1);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut back = vec![0u8; 512 + 0x3000];
    disk.read_at(&mut back, 100 * 512).unwrap();
    assert!(
        back[..512].iter().all(|&b| b == 0xee),
        "the data after the header"
    );
    assert_eq!(back[512..], fresh[..], "the spread data, in order");
    drop(d);
    server.stop().unwrap();
}

#[test]
fn a_fixed_vhd_reads_and_writes_buffers_spread_over_descriptors_and_regions() {
    reads_and_writes_spread_over_descriptors(true);
}

#[test]
fn a_raw_disk_reads_and_writes_buffers_spread_over_descriptors_and_regions() {
    reads_and_writes_spread_over_descriptors(false);
}

#[test]
fn a_malformed_request_fails_alone_and_the_device_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, pattern) = disk(dir.path(), true);
    let sock = dir.path().join("blk.sock");
    let server = vhost_blk::Server::start(disk, &sock, Default::default()).unwrap();
    let mut d = Driver::connect(&sock);
    // Data outside guest memory.
    assert_eq!(
        d.request(
            VIRTIO_BLK_T_IN,
            0,
            &[(MEM as u64 - 512, 1024, true)],
            STATUS
        ),
        VIRTIO_BLK_S_IOERR
    );
    // Past the end of the disk.
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 2047, &[(0x1_0000, 1024, true)], STATUS),
        VIRTIO_BLK_S_IOERR
    );
    // Not whole sectors.
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, 0, &[(0x1_0000, 100, false)], STATUS),
        VIRTIO_BLK_S_IOERR
    );
    // A readable buffer after a writable one: no status can be trusted, length 0.
    d.put(&[
        (HEADERS, 16, false),
        (0x1_0000, 512, true),
        (0x1_1000, 512, false),
        (STATUS, 1, true),
    ]);
    d.kick();
    assert_eq!(d.wait_used(1)[0].1, 0);
    // And a good request still works.
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 1, &[(0x1_0000, 512, true)], STATUS),
        VIRTIO_BLK_S_OK
    );
    let mut got = vec![0u8; 512];
    d.mem.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
    assert_eq!(got, pattern[512..1024]);
    drop(d);
    server.stop().unwrap();
}

#[test]
fn every_request_popped_before_get_vring_base_is_in_the_used_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = disk(dir.path(), true);
    let sock = dir.path().join("blk.sock");
    let server = vhost_blk::Server::start(disk, &sock, Default::default()).unwrap();
    let mut d = Driver::connect(&sock);
    // Twenty 64 KiB reads, made available one kick at a time, and the ring
    // stopped while the device is busy with them.
    for i in 0..20u64 {
        let header_at = HEADERS + 32 * i;
        let header = RequestHeader {
            request_type: VIRTIO_BLK_T_IN,
            sector: 128 * (i % 8),
        };
        d.mem
            .write_slice(&header.serialize(), GuestAddress(header_at))
            .unwrap();
        d.put(&[
            (header_at, 16, false),
            (0x10_0000 + 0x1_0000 * i, 0x1_0000, true),
            (STATUS + i, 1, true),
        ]);
        d.kick();
    }
    let base = d.front.get_vring_base(0).unwrap() as u16;
    let used = d.used_idx();
    assert_eq!(
        used, base,
        "every request the device took ({base}) completed before it answered"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        d.used_idx(),
        used,
        "nothing completed after the ring was stopped"
    );
    drop(d);
    server.stop().unwrap();
}
