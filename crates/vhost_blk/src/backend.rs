//! The vhost-user-blk device: turns virtqueue requests into `Disk` calls.
//!
//! Each queue is served by its own epoll thread (`queues_per_thread` gives one
//! queue per thread) and has its own state, so queues never wait on each other;
//! the `Disk` is shared and safe to use from several threads at once.
//!
//! I/O is synchronous inside `handle_event`, which holds the queue's vring lock
//! from popping a request until its completion is in the used ring. The front
//! end's GET_VRING_BASE takes that same lock (to mark the queue not ready) before
//! it reads the ring position, so by the time it has the position no request is
//! in flight: nothing completes after it, and save/migration see a quiet ring.
//!
//! Request data moves between the disk and guest memory without a copy in this
//! process: `preadv`/`pwritev` on the image file where the disk holds the run
//! contiguously in one (`read_into`, `write_from`), the engine's `read_at` and
//! `write_at` on slices of guest memory elsewhere. Each slice carries its
//! region's `BitmapMmapRegion`, and every slice the device writes is marked in
//! it before the request completes; headers and status bytes go through
//! vm-memory, which marks them itself. So once the front end has sent
//! SET_LOG_BASE (LOG_ALL with the LOG_SHMFD protocol feature) every byte the
//! device writes into guest memory is in its dirty log.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use drive_counters::DriveCounters;
use vhd::{Disk, DiskCell, Gate};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap, VolatileSlice,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::protocol::*;

pub(crate) type GuestMemory = GuestMemoryMmap<BitmapMmapRegion>;
pub(crate) type Memory = GuestMemoryAtomic<GuestMemory>;
type Vring = VringMutex<Memory>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemory>>;
/// A run of guest memory in this process, with its region's dirty bitmap.
type GuestSlice<'m> = VolatileSlice<'m, BitmapMmapRegion>;

/// Most segments accepted in one DISCARD or WRITE_ZEROES request.
const MAX_SEGMENTS: u32 = 32;
/// Most sectors in one DISCARD or WRITE_ZEROES segment (1 GiB).
const MAX_SEGMENT_SECTORS: u32 = 1 << 21;

/// How a synthetic disk is offered to the guest.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Virtqueues, one epoll thread each (QEMU's `num-queues` must not exceed it).
    pub num_queues: u16,
    /// Largest ring size the front end may choose.
    pub queue_size: u16,
    /// The serial number the guest reads with GET_ID (at most 20 bytes are used).
    pub serial: String,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            num_queues: 2,
            queue_size: 256,
            serial: String::new(),
        }
    }
}

/// The device for one front-end connection.
pub(crate) struct BlkBackend {
    /// Shared with the server, which can switch it while the front end stays
    /// connected; each request holds its read guard from start to completion.
    disk: Arc<DiskCell>,
    opts: BlkOptions,
    mem: Mutex<Memory>,
    event_idx: AtomicBool,
    /// Writeback cache enabled (the guest may turn it off through CONFIG_WCE; then
    /// every write is flushed before it completes).
    wce: AtomicBool,
    /// Number of virtqueues (and queue threads).
    queues: usize,
    /// What the guest did with the disk; shared with the server, so the totals
    /// outlive this connection.
    counters: Arc<DriveCounters>,
    /// Shared with the server: while it is held, no queue is processed (see
    /// [`vhd::Gate`]).
    gate: Arc<Gate>,
}

/// What happened to one request: its status byte and how many bytes the device
/// wrote into the guest's buffers (data and status).
struct Completion {
    status: u8,
    data_written: u32,
}

impl Completion {
    fn status(status: u8) -> Self {
        Self {
            status,
            data_written: 0,
        }
    }
}

/// A request's buffers as the guest laid them out: device-readable pieces, then
/// device-writable ones.
struct Buffers {
    readable: Vec<(GuestAddress, u32)>,
    writable: Vec<(GuestAddress, u32)>,
}

impl Buffers {
    fn total(pieces: &[(GuestAddress, u32)]) -> u64 {
        pieces.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// Visits the parts of `pieces` that cover bytes `skip..skip + len` of their
    /// concatenation, in order.
    fn walk(
        pieces: &[(GuestAddress, u32)],
        mut skip: u64,
        mut len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0usize;
        for (addr, plen) in pieces {
            let plen = u64::from(*plen);
            if skip >= plen {
                skip -= plen;
                continue;
            }
            let take = (plen - skip).min(len as u64) as usize;
            f(addr.unchecked_add(skip), done, take)?;
            done += take;
            len -= take;
            skip = 0;
            if len == 0 {
                break;
            }
        }
        if len != 0 {
            return Err(vm_memory::GuestMemoryError::PartialBuffer {
                expected: done + len,
                completed: done,
            });
        }
        Ok(())
    }

    /// The guest memory behind bytes `skip..skip + len` of `pieces`, as host
    /// slices in order: descriptors that continue each other in guest memory are
    /// joined, and a run that crosses from one memory region into the next is
    /// split at the boundary, so each slice carries its own region's dirty bitmap.
    fn slices<'m>(
        mem: &'m GuestMemory,
        pieces: &[(GuestAddress, u32)],
        skip: u64,
        len: u64,
    ) -> Result<Vec<GuestSlice<'m>>, vm_memory::GuestMemoryError> {
        let len =
            usize::try_from(len).map_err(|_| vm_memory::GuestMemoryError::GuestAddressOverflow)?;
        let mut runs: Vec<(GuestAddress, usize)> = Vec::new();
        Self::walk(pieces, skip, len, |addr, _, n| {
            match runs.last_mut() {
                Some((start, l)) if start.checked_add(*l as u64) == Some(addr) => *l += n,
                _ => runs.push((addr, n)),
            }
            Ok(())
        })?;
        let mut out = Vec::with_capacity(runs.len());
        for (addr, n) in runs {
            for s in mem.get_slices(addr, n) {
                out.push(s?);
            }
        }
        Ok(out)
    }

    fn gather(
        &self,
        mem: &GuestMemory,
        skip: u64,
        out: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let len = out.len();
        Self::walk(&self.readable, skip, len, |addr, at, n| {
            mem.read_slice(&mut out[at..at + n], addr)
        })
    }

    fn scatter(
        &self,
        mem: &GuestMemory,
        skip: u64,
        data: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        Self::walk(&self.writable, skip, data.len(), |addr, at, n| {
            mem.write_slice(&data[at..at + n], addr)
        })
    }
}

impl BlkBackend {
    pub(crate) fn new(
        disk: Arc<DiskCell>,
        opts: BlkOptions,
        counters: Arc<DriveCounters>,
        gate: Arc<Gate>,
    ) -> Self {
        let queues = usize::from(opts.num_queues.max(1));
        Self {
            gate,
            disk,
            opts,
            mem: Mutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            wce: AtomicBool::new(true),
            queues,
            counters,
        }
    }

    fn config(&self) -> BlkConfig {
        let disk = self.disk.current();
        let logical = disk.logical_sector_size().max(512);
        let physical = disk.physical_sector_size().max(logical);
        BlkConfig {
            capacity: disk.size() / SECTOR,
            seg_max: u32::from(self.opts.queue_size).saturating_sub(2).max(1),
            blk_size: logical,
            physical_block_exp: (physical / logical).trailing_zeros() as u8,
            wce: self.wce.load(Ordering::Relaxed),
            num_queues: self.opts.num_queues.max(1),
            max_discard_sectors: MAX_SEGMENT_SECTORS,
            max_discard_seg: MAX_SEGMENTS,
            discard_sector_alignment: logical / 512,
            max_write_zeroes_sectors: MAX_SEGMENT_SECTORS,
            max_write_zeroes_seg: MAX_SEGMENTS,
            write_zeroes_may_unmap: true,
        }
    }

    fn memory(&self) -> GuestMemoryLoadGuard<GuestMemory> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).memory()
    }

    /// Pops every available request, performs it and puts it in the used ring.
    /// Returns whether anything completed.
    fn process_queue(
        &self,
        vring: &mut vhost_user_backend::VringState<Memory>,
    ) -> io::Result<bool> {
        let mem = self.memory();
        let chains: Vec<Chain> = match vring.get_queue_mut().iter(mem.clone()) {
            Ok(iter) => iter.collect(),
            // Not ready (being stopped or not yet set up): nothing to do.
            Err(_) => return Ok(false),
        };
        if chains.is_empty() {
            return Ok(false);
        }
        for chain in chains {
            let head = chain.head_index();
            let used = self.process_chain(&mem, chain);
            vring
                .add_used(head, used)
                .map_err(|e| io::Error::other(format!("adding to the used ring: {e}")))?;
        }
        let notify = if self.event_idx.load(Ordering::Relaxed) {
            vring
                .needs_notification()
                .map_err(|e| io::Error::other(format!("checking for notification: {e}")))?
        } else {
            true
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(true)
    }

    /// Performs one request; returns the used length for the ring. A request too
    /// malformed to carry a status byte completes with length 0.
    fn process_chain(&self, mem: &GuestMemory, chain: Chain) -> u32 {
        let mut bufs = Buffers {
            readable: Vec::new(),
            writable: Vec::new(),
        };
        for desc in chain {
            if desc.is_write_only() {
                bufs.writable.push((desc.addr(), desc.len()));
            } else if bufs.writable.is_empty() {
                bufs.readable.push((desc.addr(), desc.len()));
            } else {
                // A readable buffer after a writable one breaks the virtio layout.
                tracing::warn!("virtio-blk request with a readable buffer after a writable one");
                return 0;
            }
        }
        let writable = Buffers::total(&bufs.writable);
        if writable == 0 {
            tracing::warn!("virtio-blk request without a status byte");
            return 0;
        }
        let status_at = writable - 1;
        let done = self.perform(self.disk.get().as_ref(), mem, &bufs, status_at);
        if bufs.scatter(mem, status_at, &[done.status]).is_err() {
            return 0;
        }
        done.data_written.saturating_add(1)
    }

    fn perform(
        &self,
        disk: &dyn Disk,
        mem: &GuestMemory,
        bufs: &Buffers,
        data_in_len: u64,
    ) -> Completion {
        let mut header = [0u8; REQUEST_HEADER_SIZE];
        if bufs.gather(mem, 0, &mut header).is_err() {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let Some(header) = RequestHeader::parse(&header) else {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        };
        let data_out_len = Buffers::total(&bufs.readable) - REQUEST_HEADER_SIZE as u64;
        let writable_disk = !disk.read_only();
        let result = match header.request_type {
            VIRTIO_BLK_T_IN => self.read(disk, mem, bufs, header.sector, data_in_len),
            VIRTIO_BLK_T_OUT if writable_disk => self
                .write(disk, mem, bufs, header.sector, data_out_len)
                .and_then(|c| self.write_through(disk, c)),
            VIRTIO_BLK_T_FLUSH => disk.flush().map(|_| 0).map_err(log_io),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let serial = self.opts.serial.as_bytes();
                let n = serial.len().min(ID_BYTES);
                id[..n].copy_from_slice(&serial[..n]);
                let len = (data_in_len as usize).min(ID_BYTES);
                bufs.scatter(mem, 0, &id[..len])
                    .map(|_| len as u32)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if writable_disk => self
                .ranges(disk, mem, bufs, header.request_type, data_out_len)
                .and_then(|c| self.write_through(disk, c)),
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                Err(VIRTIO_BLK_S_IOERR)
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        };
        if result.is_ok() {
            match header.request_type {
                VIRTIO_BLK_T_IN => self.counters.read(data_in_len),
                VIRTIO_BLK_T_OUT => self.counters.write(data_out_len),
                VIRTIO_BLK_T_FLUSH => self.counters.flush(),
                VIRTIO_BLK_T_DISCARD => self.counters.discard(),
                VIRTIO_BLK_T_WRITE_ZEROES => self.counters.write_zeroes(),
                _ => {}
            }
        }
        match result {
            Ok(data_written) => Completion {
                status: VIRTIO_BLK_S_OK,
                data_written,
            },
            Err(status) => Completion::status(status),
        }
    }

    /// With the writeback cache off, a write completes only once it is durable.
    fn write_through(&self, disk: &dyn Disk, written: u32) -> Result<u32, u8> {
        if !self.wce.load(Ordering::Relaxed) {
            disk.flush().map_err(log_io)?;
        }
        Ok(written)
    }

    /// Byte offset of `sector` when `len` bytes from there fit on the disk.
    fn range(disk: &dyn Disk, sector: u64, len: u64) -> Result<u64, u8> {
        let offset = sector.checked_mul(SECTOR).ok_or(VIRTIO_BLK_S_IOERR)?;
        let end = offset.checked_add(len).ok_or(VIRTIO_BLK_S_IOERR)?;
        if end > disk.size() || !len.is_multiple_of(SECTOR) {
            tracing::warn!(
                sector,
                len,
                size = disk.size(),
                "virtio-blk request out of range or not whole sectors"
            );
            return Err(VIRTIO_BLK_S_IOERR);
        }
        Ok(offset)
    }

    fn read(
        &self,
        disk: &dyn Disk,
        mem: &GuestMemory,
        bufs: &Buffers,
        sector: u64,
        len: u64,
    ) -> Result<u32, u8> {
        let offset = Self::range(disk, sector, len)?;
        let len32 = u32::try_from(len).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let slices =
            Buffers::slices(mem, &bufs.writable, 0, len).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let result = read_into(disk, &slices, offset, len);
        // The device wrote (or, after a failure, may have partly written) these
        // bytes: mark them in the front end's dirty log before the request
        // completes, as vm-memory does after a copy.
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        result.map(|_| len32)
    }

    fn write(
        &self,
        disk: &dyn Disk,
        mem: &GuestMemory,
        bufs: &Buffers,
        sector: u64,
        len: u64,
    ) -> Result<u32, u8> {
        let offset = Self::range(disk, sector, len)?;
        let slices = Buffers::slices(mem, &bufs.readable, REQUEST_HEADER_SIZE as u64, len)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
        let data: Vec<&[u8]> = guards
            .iter()
            .map(|g| {
                // SAFETY: the pointer and length come from vm-memory's slice of a guest
                // memory region, which stays mapped while `mem` (the load guard on the
                // region list) is alive, i.e. for this whole call. The guest may change
                // the bytes while they are written out (as with an O_DIRECT write from
                // guest memory, what qemu-storage-daemon does); the disk then gets a
                // mix of old and new bytes, which is what a guest that changes a
                // buffer it handed to the device gets from real hardware too. Nothing
                // in this process depends on the bytes staying put.
                unsafe { std::slice::from_raw_parts(g.as_ptr(), g.len()) }
            })
            .collect();
        write_from(disk, &data, offset, len)?;
        Ok(0)
    }

    fn ranges(
        &self,
        disk: &dyn Disk,
        mem: &GuestMemory,
        bufs: &Buffers,
        kind: u32,
        len: u64,
    ) -> Result<u32, u8> {
        if len > u64::from(MAX_SEGMENTS) * SEGMENT_SIZE as u64 {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut raw = vec![0u8; len as usize];
        bufs.gather(mem, REQUEST_HEADER_SIZE as u64, &mut raw)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let segments = Segment::parse_all(&raw).ok_or(VIRTIO_BLK_S_IOERR)?;
        for s in &segments {
            if s.num_sectors > MAX_SEGMENT_SECTORS || s.flags & !Segment::FLAG_UNMAP != 0 {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
        }
        for s in segments {
            let bytes = u64::from(s.num_sectors) * SECTOR;
            let offset = Self::range(disk, s.sector, bytes)?;
            let r = if kind == VIRTIO_BLK_T_DISCARD {
                disk.discard(offset, bytes)
            } else {
                disk.write_zeroes(offset, bytes)
            };
            r.map_err(log_io)?;
        }
        Ok(0)
    }
}

/// Fills `slices` (guest memory, `len` bytes together) with the disk's bytes
/// from `offset`. Where the disk's top layer holds a run contiguously in a file
/// the kernel can read (all of a fixed VHD, whole blocks of a dynamic one), a
/// `preadv` goes from the file straight into guest memory, one system call for
/// every guest page of the run, as qemu-storage-daemon does; the rest goes
/// through the engine's `read_at`, one call per slice, also straight into guest
/// memory.
fn read_into(disk: &dyn Disk, slices: &[GuestSlice<'_>], offset: u64, len: u64) -> Result<(), u8> {
    let mut done = 0u64;
    while done < len {
        let extent = disk
            .data_extent(offset + done, len - done)
            .map_err(log_io)?;
        if let Some(extent) = extent.filter(|e| e.len > 0) {
            if let Some(fd) = extent.file.read_fd() {
                let n = extent.len.min(len - done);
                let mut iov = iovecs(slices, done, n);
                preadv_exact(fd, &mut iov, extent.offset).map_err(|e| {
                    tracing::error!(
                        disk = %disk.path().map(|p| p.display().to_string()).unwrap_or_default(),
                        offset = offset + done,
                        len = n,
                        error = %e,
                        "virtio-blk read failed"
                    );
                    VIRTIO_BLK_S_IOERR
                })?;
                done += n;
                continue;
            }
        }
        // No file run to read from (zeros, a parent's data, a format that cannot
        // say): the engine reads the rest of the request.
        let mut at = 0u64;
        for s in slices {
            let (start, end) = (at, at + s.len() as u64);
            at = end;
            if end <= done {
                continue;
            }
            let skip = done.saturating_sub(start) as usize;
            let guard = s.ptr_guard_mut();
            // SAFETY: the pointer and length come from vm-memory's slice of a guest
            // memory region, which stays mapped while the load guard the caller holds
            // on the region list is alive, i.e. for this whole call; `skip` is less
            // than the slice's length. The region is a shared mapping of the guest's
            // RAM: the guest may read or change these bytes while the engine fills
            // them, so the exclusivity a `&mut` promises does not hold against the
            // guest. That is the contract of any host read into guest memory (a
            // `pread` or O_DIRECT read, as qemu-storage-daemon does): the engine only
            // stores into the buffer and does not depend on reading back what it
            // stored, so a guest that changes a buffer it gave the device can only
            // change what it sees in that buffer, not what this process does.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(guard.as_ptr().add(skip), s.len() - skip) };
            disk.read_at(buf, offset + start + skip as u64)
                .map_err(log_io)?;
        }
        done = len;
    }
    Ok(())
}

/// Writes `data` (guest memory, `len` bytes together) to the disk at `offset`.
/// Where the disk can take a run as a write straight into its file (all of a
/// fixed VHD, a dynamic one block by block: the engine's `prepare_extent_write`
/// and `commit_extent_write`, which allocate and record it as `write_at`
/// would), the run goes in one `pwritev` from guest memory; otherwise through
/// the engine's `write_at`, one call per slice.
fn write_from(disk: &dyn Disk, data: &[&[u8]], offset: u64, len: u64) -> Result<(), u8> {
    let mut done = 0u64;
    while done < len {
        let extent = disk
            .prepare_extent_write(offset + done, len - done)
            .map_err(log_io)?;
        if let Some(extent) = extent.filter(|e| e.len > 0) {
            let n = extent.len.min(len - done);
            let io: Vec<IoSlice<'_>> = pieces(data, done, n).map(IoSlice::new).collect();
            extent
                .file
                .write_vectored_at(&io, extent.offset)
                .map_err(|e| {
                    tracing::error!(
                        disk = %disk.path().map(|p| p.display().to_string()).unwrap_or_default(),
                        offset = offset + done,
                        len = n,
                        error = %e,
                        "virtio-blk write failed"
                    );
                    VIRTIO_BLK_S_IOERR
                })?;
            disk.commit_extent_write(offset + done, n).map_err(log_io)?;
            done += n;
            continue;
        }
        for (at, piece) in pieces(data, done, len - done).scan(done, |at, p| {
            let here = *at;
            *at += p.len() as u64;
            Some((here, p))
        }) {
            disk.write_at(piece, offset + at).map_err(log_io)?;
        }
        done = len;
    }
    Ok(())
}

/// The parts of `data` that cover bytes `skip..skip + len` of its concatenation.
fn pieces<'a>(data: &'a [&'a [u8]], skip: u64, len: u64) -> impl Iterator<Item = &'a [u8]> + 'a {
    let end = skip + len;
    data.iter()
        .scan(0u64, |at, d| {
            let start = *at;
            *at += d.len() as u64;
            Some((start, *d))
        })
        .filter_map(move |(start, d)| {
            let stop = start + d.len() as u64;
            if stop <= skip || start >= end {
                return None;
            }
            let from = (skip.max(start) - start) as usize;
            let to = (end.min(stop) - start) as usize;
            Some(&d[from..to])
        })
}

/// The `iovec`s for bytes `skip..skip + len` of `slices`' concatenation.
fn iovecs(slices: &[GuestSlice<'_>], skip: u64, len: u64) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    let (mut at, end) = (0u64, skip + len);
    for s in slices {
        let (start, stop) = (at, at + s.len() as u64);
        at = stop;
        if stop <= skip {
            continue;
        }
        if start >= end {
            break;
        }
        let from = skip.max(start) - start;
        let to = end.min(stop) - start;
        out.push(libc::iovec {
            // In bounds: `from < to <= s.len()`. Only the kernel writes through it.
            iov_base: s
                .ptr_guard_mut()
                .as_ptr()
                .wrapping_add(from as usize)
                .cast(),
            iov_len: (to - from) as usize,
        });
    }
    out
}

/// Reads exactly the `iov` buffers' total from `fd` at `offset`, retrying short
/// reads; the end of the file before that is an error.
fn preadv_exact(fd: BorrowedFd<'_>, iov: &mut [libc::iovec], mut offset: u64) -> io::Result<()> {
    /// Linux's IOV_MAX: the most buffers one `preadv` takes.
    const IOV_MAX: usize = 1024;
    let mut first = 0usize;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let count = (iov.len() - first).min(IOV_MAX);
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: `iov[first..first + count]` are valid iovecs, each naming memory
        // that stays mapped for this call (guest memory held by the caller's load
        // guard, see `iovecs`); the kernel writes at most `iov_len` bytes to each.
        // `count` is at most IOV_MAX, so it fits in a c_int.
        let n = unsafe { libc::preadv(fd.as_raw_fd(), iov[first..].as_ptr(), count as i32, at) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image file ends before the disk's data",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn log_io(e: vhd::Error) -> u8 {
    tracing::error!(error = %e, "virtio-blk request failed");
    VIRTIO_BLK_S_IOERR
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_MQ)
            | bit(VHOST_F_LOG_ALL)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES);
        if self.disk.current().read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback-cache byte is writable.
        let start = offset as usize;
        if start <= CONFIG_WCE_OFFSET && CONFIG_WCE_OFFSET < start + buf.len() {
            let wce = buf[CONFIG_WCE_OFFSET - start] != 0;
            if !wce {
                // Turning the cache off makes what was written so far durable too.
                self.disk
                    .get()
                    .flush()
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            self.wce.store(wce, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("virtio-blk config offset {offset} is read-only"),
        ))
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the queue threads never leave their epoll loop, and dropping the
        // daemon after a front end disconnects would wait for them forever.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(|e| tracing::error!(error = %e, "cannot create a queue thread's exit event"))
            .ok()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One queue per thread: true multiqueue.
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected epoll event {evset:?} on queue {device_event}"
            )));
        }
        let q = usize::from(device_event);
        let vring = vrings.get(q).ok_or_else(|| {
            io::Error::other(format!("event for queue {q}, which does not exist"))
        })?;
        // Before the virtqueue's lock: QEMU stops the device (GET_VRING_BASE
        // takes that lock) while requests are held here, and unpopped
        // requests stay in the ring for whoever runs the queue next.
        let _pass = self.gate.enter();
        // Held until every popped request is complete: see the module comment.
        let mut guard = vring.get_mut();
        if self.event_idx.load(Ordering::Relaxed) {
            loop {
                guard
                    .disable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                self.process_queue(&mut guard)?;
                if !guard
                    .enable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?
                {
                    break;
                }
            }
        } else {
            self.process_queue(&mut guard)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER_AT: u64 = 0;
    const DATA_AT: u64 = 0x1000;
    const STATUS_AT: u64 = 0x1f000;

    /// A device over a 1 MiB raw disk and 128 KiB of guest memory.
    fn device(dir: &std::path::Path) -> (BlkBackend, GuestMemory, Arc<DriveCounters>) {
        let image = dir.join("disk.raw");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let disk: Arc<dyn Disk> = Arc::new(vhd::RawDisk::open(&image, false).unwrap());
        let counters = Arc::new(DriveCounters::new());
        let dev = BlkBackend::new(
            Arc::new(DiskCell::new(disk)),
            BlkOptions::default(),
            counters.clone(),
            Arc::default(),
        );
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        (dev, mem, counters)
    }

    /// Puts a request header in guest memory and performs the request, laid out as
    /// a driver does: header, data (out or in), status byte. Returns the status.
    fn request(dev: &BlkBackend, mem: &GuestMemory, kind: u32, sector: u64, len: u32) -> u8 {
        let header = RequestHeader {
            request_type: kind,
            sector,
        };
        mem.write_slice(&header.serialize(), GuestAddress(HEADER_AT))
            .unwrap();
        let mut bufs = Buffers {
            readable: vec![(GuestAddress(HEADER_AT), REQUEST_HEADER_SIZE as u32)],
            writable: Vec::new(),
        };
        let data = (GuestAddress(DATA_AT), len);
        if kind == VIRTIO_BLK_T_IN {
            bufs.writable.push(data);
        } else if len > 0 {
            bufs.readable.push(data);
        }
        bufs.writable.push((GuestAddress(STATUS_AT), 1));
        let data_in = Buffers::total(&bufs.writable) - 1;
        dev.perform(dev.disk.get().as_ref(), mem, &bufs, data_in)
            .status
    }

    #[test]
    fn a_request_of_n_bytes_adds_exactly_n_and_one_operation() {
        let dir = tempfile::tempdir().unwrap();
        let (dev, mem, counters) = device(dir.path());
        let n: u32 = 3 * 4096 + 512;
        mem.write_slice(&vec![0x5a; n as usize], GuestAddress(DATA_AT))
            .unwrap();
        assert_eq!(request(&dev, &mem, VIRTIO_BLK_T_OUT, 8, n), VIRTIO_BLK_S_OK);
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_OUT, 0, 512),
            VIRTIO_BLK_S_OK
        );
        mem.write_slice(&vec![0; n as usize], GuestAddress(DATA_AT))
            .unwrap();
        assert_eq!(request(&dev, &mem, VIRTIO_BLK_T_IN, 8, n), VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; n as usize];
        mem.read_slice(&mut back, GuestAddress(DATA_AT)).unwrap();
        assert!(
            back.iter().all(|&b| b == 0x5a),
            "the read brought the data back"
        );
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_FLUSH, 0, 0),
            VIRTIO_BLK_S_OK
        );
        // GET_ID moves no disk data and is not counted; failures are not either.
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_GET_ID, 0, ID_BYTES as u32),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_IN, 2047, 1024),
            VIRTIO_BLK_S_IOERR,
            "a read past the end fails"
        );
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_OUT, 2048, 512),
            VIRTIO_BLK_S_IOERR,
            "a write past the end fails"
        );
        let s = counters.snapshot();
        assert_eq!(s.write_bytes, u64::from(n) + 512);
        assert_eq!(s.write_ops, 2);
        assert_eq!(s.read_bytes, u64::from(n));
        assert_eq!(s.read_ops, 1);
        assert_eq!(s.flush_ops, 1);
        assert_eq!((s.discard_ops, s.write_zeroes_ops), (0, 0));
    }

    #[test]
    fn requests_after_a_switch_go_to_the_new_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (dev, mem, _) = device(dir.path());
        mem.write_slice(&[0x11; 4096], GuestAddress(DATA_AT))
            .unwrap();
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_OUT, 0, 4096),
            VIRTIO_BLK_S_OK
        );
        // The copy holds other bytes, so a read shows which disk served it.
        let copy = dir.path().join("copy.raw");
        let mut bytes = vec![0x22u8; 1 << 20];
        bytes[4096..8192].fill(0x33);
        std::fs::write(&copy, bytes).unwrap();
        let new: Arc<dyn Disk> = Arc::new(vhd::RawDisk::open(&copy, false).unwrap());
        let old = dev.disk.replace(new).unwrap();
        assert_eq!(old.path(), Some(dir.path().join("disk.raw").as_path()));
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_IN, 0, 8192),
            VIRTIO_BLK_S_OK
        );
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(DATA_AT)).unwrap();
        assert!(
            back[..4096].iter().all(|&b| b == 0x22),
            "read from the copy"
        );
        assert!(back[4096..].iter().all(|&b| b == 0x33));
        mem.write_slice(&[0x44; 512], GuestAddress(DATA_AT))
            .unwrap();
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_OUT, 1, 512),
            VIRTIO_BLK_S_OK
        );
        drop(old);
        let on_copy = std::fs::read(&copy).unwrap();
        assert!(
            on_copy[512..1024].iter().all(|&b| b == 0x44),
            "written to the copy"
        );
        let on_old = std::fs::read(dir.path().join("disk.raw")).unwrap();
        assert!(
            on_old[..4096].iter().all(|&b| b == 0x11),
            "the old disk keeps its data"
        );
        assert!(
            on_old[4096..].iter().all(|&b| b == 0),
            "and got nothing after the switch"
        );
        // A disk of another size is refused and the copy stays in place.
        let small = dir.path().join("small.raw");
        std::fs::write(&small, vec![0u8; 1 << 19]).unwrap();
        let small: Arc<dyn Disk> = Arc::new(vhd::RawDisk::open(&small, false).unwrap());
        let Err(e) = dev.disk.replace(small) else {
            panic!("a disk of another size was taken")
        };
        assert!(e.to_string().contains("size"), "{e}");
        assert_eq!(dev.disk.current().path(), Some(copy.as_path()));
    }

    #[test]
    fn discard_and_write_zeroes_count_one_operation_per_request() {
        let dir = tempfile::tempdir().unwrap();
        let (dev, mem, counters) = device(dir.path());
        // Two segments in one request: {sector, num_sectors, flags}, little endian.
        let mut segs = Vec::new();
        for (sector, count) in [(0u64, 8u32), (64, 16)] {
            segs.extend_from_slice(&sector.to_le_bytes());
            segs.extend_from_slice(&count.to_le_bytes());
            segs.extend_from_slice(&0u32.to_le_bytes());
        }
        mem.write_slice(&segs, GuestAddress(DATA_AT)).unwrap();
        let len = segs.len() as u32;
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_DISCARD, 0, len),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            request(&dev, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, len),
            VIRTIO_BLK_S_OK
        );
        let s = counters.snapshot();
        assert_eq!((s.discard_ops, s.write_zeroes_ops), (1, 1));
        assert_eq!((s.write_bytes, s.write_ops), (0, 0));
    }
}
