//! The log: entries of 4 KiB sectors (a header with descriptors, then data
//! sectors), and the search for the active sequence that MS-VHDX 2.3.3
//! describes. Everything here works on the log's bytes; the image applies the
//! result.

use uuid::Uuid;

use super::crc::{crc32c, crc32c_without};
use super::{field, guid_at, need, put_guid, signature, u32_at, u64_at, Fault, LOG_SECTOR};

pub const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
pub const DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
pub const ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
pub const DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";
const HEADER_BYTES: usize = 64;
const DESC_BYTES: usize = 32;
const SECTOR: u64 = LOG_SECTOR as u64;

/// One update a log entry makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Write these 4096 bytes at `offset`.
    Data { offset: u64, bytes: Vec<u8> },
    /// Write `length` zero bytes at `offset`.
    Zero { offset: u64, length: u64 },
}

/// A log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub sequence_number: u64,
    /// Offset in the log of the first entry of the sequence this one ends.
    pub tail: u32,
    pub log_guid: Uuid,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub ops: Vec<LogOp>,
}

fn descriptor_sectors(count: usize) -> usize {
    (HEADER_BYTES + DESC_BYTES * count).div_ceil(LOG_SECTOR)
}

impl LogEntry {
    /// Bytes this entry takes in the log.
    pub fn length(&self) -> usize {
        let data = self
            .ops
            .iter()
            .filter(|o| matches!(o, LogOp::Data { .. }))
            .count();
        (descriptor_sectors(self.ops.len()) + data) * LOG_SECTOR
    }

    /// Bytes an entry with `data` data descriptors (and no zero ones) takes.
    pub fn length_for(data: usize) -> usize {
        (descriptor_sectors(data) + data) * LOG_SECTOR
    }

    /// The entry's length from its header, to know how much to read; checks
    /// only the signature and that the length is a whole number of sectors.
    pub fn peek_length(b: &[u8]) -> Result<usize, Fault> {
        need("log entry", b, HEADER_BYTES)?;
        signature("log entry", b, ENTRY_SIGNATURE)?;
        let len = u32_at(b, 8) as usize;
        if len == 0 || !len.is_multiple_of(LOG_SECTOR) {
            return Err(field(
                "log entry",
                format!("length {len} is not a whole number of 4 KiB sectors"),
            ));
        }
        Ok(len)
    }

    /// Parses and validates a whole entry (`b` holds exactly its bytes):
    /// signature, CRC-32C, descriptor and data-sector signatures, and the
    /// sequence number repeated in every descriptor and data sector.
    pub fn parse(b: &[u8]) -> Result<Self, Fault> {
        const WHAT: &str = "log entry";
        let len = Self::peek_length(b)?;
        if b.len() != len {
            return Err(field(
                WHAT,
                format!("{} bytes given for a {len}-byte entry", b.len()),
            ));
        }
        let stored = u32_at(b, 4);
        let computed = crc32c_without(b, 4);
        if stored != computed {
            return Err(Fault::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let tail = u32_at(b, 12);
        let seq = u64_at(b, 16);
        let count = u32_at(b, 24) as usize;
        if seq == 0 || u64::from(tail) % SECTOR != 0 {
            return Err(field(
                WHAT,
                format!("sequence number {seq} or tail {tail} is invalid"),
            ));
        }
        let desc_sectors = descriptor_sectors(count);
        if desc_sectors * LOG_SECTOR > len {
            return Err(field(
                WHAT,
                format!("{count} descriptors do not fit in {len} bytes"),
            ));
        }
        let mut ops = Vec::with_capacity(count);
        let mut data_index = 0usize;
        for i in 0..count {
            let d = &b[HEADER_BYTES + DESC_BYTES * i..HEADER_BYTES + DESC_BYTES * (i + 1)];
            if u64_at(d, 24) != seq {
                return Err(field(
                    WHAT,
                    format!("descriptor {i} belongs to another sequence number"),
                ));
            }
            let offset = u64_at(d, 16);
            if !offset.is_multiple_of(SECTOR) {
                return Err(field(
                    WHAT,
                    format!("descriptor {i} targets unaligned offset {offset}"),
                ));
            }
            if &d[..4] == ZERO_DESC_SIGNATURE {
                let length = u64_at(d, 8);
                if !length.is_multiple_of(SECTOR) {
                    return Err(field(
                        WHAT,
                        format!("zero descriptor {i} has unaligned length {length}"),
                    ));
                }
                ops.push(LogOp::Zero { offset, length });
            } else if &d[..4] == DATA_DESC_SIGNATURE {
                let at = (desc_sectors + data_index) * LOG_SECTOR;
                let Some(s) = b.get(at..at + LOG_SECTOR) else {
                    return Err(field(WHAT, "more data descriptors than data sectors"));
                };
                if &s[..4] != DATA_SECTOR_SIGNATURE
                    || u32_at(s, 4) != (seq >> 32) as u32
                    || u32_at(s, LOG_SECTOR - 4) != seq as u32
                {
                    return Err(field(
                        WHAT,
                        format!("data sector {data_index} is not this entry's"),
                    ));
                }
                let mut bytes = s.to_vec();
                bytes[..8].copy_from_slice(&d[8..16]);
                bytes[LOG_SECTOR - 4..].copy_from_slice(&d[4..8]);
                ops.push(LogOp::Data { offset, bytes });
                data_index += 1;
            } else {
                return Err(field(
                    WHAT,
                    format!("descriptor {i} has an unknown signature"),
                ));
            }
        }
        if (desc_sectors + data_index) * LOG_SECTOR != len {
            return Err(field(
                WHAT,
                format!("{data_index} data sectors do not fill the {len}-byte entry"),
            ));
        }
        Ok(LogEntry {
            sequence_number: seq,
            tail,
            log_guid: guid_at(b, 32),
            flushed_file_offset: u64_at(b, 48),
            last_file_offset: u64_at(b, 56),
            ops,
        })
    }

    pub fn serialize(&self) -> Vec<u8> {
        let len = self.length();
        let mut b = vec![0u8; len];
        let seq = self.sequence_number;
        b[..4].copy_from_slice(ENTRY_SIGNATURE);
        b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        b[12..16].copy_from_slice(&self.tail.to_le_bytes());
        b[16..24].copy_from_slice(&seq.to_le_bytes());
        b[24..28].copy_from_slice(&(self.ops.len() as u32).to_le_bytes());
        put_guid(&mut b, 32, &self.log_guid);
        b[48..56].copy_from_slice(&self.flushed_file_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.last_file_offset.to_le_bytes());
        let desc_sectors = descriptor_sectors(self.ops.len());
        let mut data_index = 0;
        for (i, op) in self.ops.iter().enumerate() {
            let d = HEADER_BYTES + DESC_BYTES * i;
            match op {
                LogOp::Zero { offset, length } => {
                    b[d..d + 4].copy_from_slice(ZERO_DESC_SIGNATURE);
                    b[d + 8..d + 16].copy_from_slice(&length.to_le_bytes());
                    b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
                }
                LogOp::Data { offset, bytes } => {
                    b[d..d + 4].copy_from_slice(DATA_DESC_SIGNATURE);
                    b[d + 4..d + 8].copy_from_slice(&bytes[LOG_SECTOR - 4..LOG_SECTOR]);
                    b[d + 8..d + 16].copy_from_slice(&bytes[..8]);
                    b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
                    let s = (desc_sectors + data_index) * LOG_SECTOR;
                    b[s..s + LOG_SECTOR].copy_from_slice(&bytes[..LOG_SECTOR]);
                    b[s..s + 4].copy_from_slice(DATA_SECTOR_SIGNATURE);
                    b[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                    b[s + LOG_SECTOR - 4..s + LOG_SECTOR]
                        .copy_from_slice(&(seq as u32).to_le_bytes());
                    data_index += 1;
                }
            }
            b[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        }
        let crc = crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// `len` bytes of the circular log starting at `at`.
fn circular(log: &[u8], at: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = at;
    while out.len() < len {
        let n = (len - out.len()).min(log.len() - pos);
        out.extend_from_slice(&log[pos..pos + n]);
        pos = (pos + n) % log.len();
    }
    out
}

/// Whether sector `k` of the log can continue an entry: every sector of a
/// valid entry but its first starts with a descriptor (`desc`, `zero`) or is a
/// data sector (`data`), and none starts with `loge`.
fn continues_entry(log: &[u8], k: usize) -> bool {
    let s = &log[k * LOG_SECTOR..k * LOG_SECTOR + 4];
    s == DATA_DESC_SIGNATURE || s == ZERO_DESC_SIGNATURE || s == DATA_SECTOR_SIGNATURE
}

/// The valid entry of `guid` starting at sector `k`, with its length in
/// sectors. `breaks[i]` counts the sectors among the first `i` of the log laid
/// twice end to end that cannot continue an entry: an entry whose claimed
/// sectors include one is refused before its bytes are copied and summed
/// (`parse` would refuse it too). So the entries that get that far never
/// overlap, and all of them together cost at most one pass over the log.
fn entry_at(log: &[u8], k: usize, guid: &Uuid, breaks: &[usize]) -> Option<(LogEntry, usize)> {
    let at = k * LOG_SECTOR;
    let len = LogEntry::peek_length(&log[at..]).ok()?;
    if len > log.len() {
        return None;
    }
    let sectors = len / LOG_SECTOR;
    // k < n and sectors <= n, so k + sectors < 2n + 1 = breaks.len().
    if breaks[k + sectors] != breaks[k + 1] || guid_at(log, at + 32) != *guid {
        return None;
    }
    let e = LogEntry::parse(&circular(log, at, len)).ok()?;
    if &e.log_guid != guid || e.tail as usize >= log.len() {
        return None;
    }
    Some((e, sectors))
}

/// The active sequence: the entries to replay, tail first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSequence {
    pub entries: Vec<LogEntry>,
}

impl ActiveSequence {
    pub fn head(&self) -> &LogEntry {
        // Never empty: `find_active_sequence` only returns non-empty sequences.
        &self.entries[self.entries.len() - 1]
    }
}

/// Finds the newest valid and complete sequence of entries of `guid` in the
/// log's bytes, by the scan of MS-VHDX 2.3.3; `None` when there is none.
///
/// The scan starts a sequence at the current tail (sector 0 first), extends
/// it entry by entry while each is valid and numbered one past the previous,
/// keeps it as the candidate when its head's tail lies within it and its head
/// is newer than the candidate's, then moves the current tail past the
/// sequence (valid) or one sector on (not valid), until the tail wraps.
///
/// Done as written that is quadratic: every start one sector on walks the
/// same entries again. Here every sector is parsed once, and the entries are
/// linked into chains (an entry to the one right after it when that one is
/// numbered one more). Valid entries never share a sector (see [`entry_at`]),
/// so each entry has at most one predecessor, the chains are disjoint paths,
/// and the sequence the scan builds from any start is the rest of its chain
/// from there: its head is the chain's last entry and it is valid when that
/// entry's tail is a position at or after the start on the same chain. A
/// chain never covers more than the log (its entries are disjoint), so no
/// sequence reads past LogLength. Linear in the log's length.
pub fn find_active_sequence(log: &[u8], guid: &Uuid) -> Option<ActiveSequence> {
    if log.is_empty() || !log.len().is_multiple_of(LOG_SECTOR) || guid.is_nil() {
        return None;
    }
    let n = log.len() / LOG_SECTOR;
    let mut breaks = Vec::with_capacity(2 * n + 1);
    breaks.push(0usize);
    for i in 0..2 * n {
        breaks.push(breaks[i] + usize::from(!continues_entry(log, i % n)));
    }
    let mut found: Vec<Option<(LogEntry, usize)>> =
        (0..n).map(|k| entry_at(log, k, guid, &breaks)).collect();
    let seq_at = |found: &[Option<(LogEntry, usize)>], k: usize| {
        found[k].as_ref().map(|(e, _)| e.sequence_number)
    };
    let next: Vec<Option<usize>> = (0..n)
        .map(|k| {
            let (e, sectors) = found[k].as_ref()?;
            let j = (k + sectors) % n;
            (seq_at(&found, j)? == e.sequence_number.wrapping_add(1)).then_some(j)
        })
        .collect();
    let mut has_pred = vec![false; n];
    for &j in next.iter().flatten() {
        has_pred[j] = true;
    }
    // Each entry's chain (named by its first entry), its place in it, and
    // each chain's last entry. Chains start at entries without predecessor;
    // the second pass would break a loop of entries (impossible: numbers only
    // grow along a chain), so every entry has a chain.
    const NONE: usize = usize::MAX;
    let mut chain = vec![NONE; n];
    let mut place = vec![0usize; n];
    let mut last = vec![NONE; n];
    for pass in 0..2 {
        for k in 0..n {
            if found[k].is_none() || chain[k] != NONE || (pass == 0 && has_pred[k]) {
                continue;
            }
            let (mut x, mut i) = (k, 0);
            loop {
                chain[x] = k;
                place[x] = i;
                match next[x] {
                    Some(y) if chain[y] == NONE => (x, i) = (y, i + 1),
                    _ => break,
                }
            }
            last[k] = x;
        }
    }
    let mut candidate: Option<usize> = None;
    let mut candidate_seq = 0u64;
    let mut current_tail = 0usize;
    let mut old_tail = 0usize;
    for _ in 0..=n {
        let mut valid = false;
        let mut head_end = current_tail;
        if let Some((_, _)) = &found[current_tail] {
            let c = chain[current_tail];
            let h = last[c];
            if let Some((he, sectors)) = &found[h] {
                let t = he.tail as usize / LOG_SECTOR;
                valid = found[t].is_some() && chain[t] == c && place[t] >= place[current_tail];
                if valid && he.sequence_number > candidate_seq {
                    candidate_seq = he.sequence_number;
                    candidate = Some(current_tail);
                }
                head_end = (h + sectors) % n;
            }
        }
        current_tail = if valid {
            head_end
        } else {
            (current_tail + 1) % n
        };
        if current_tail < old_tail {
            break;
        }
        old_tail = current_tail;
    }
    let h = last[chain[candidate?]];
    let mut x = found[h].as_ref()?.0.tail as usize / LOG_SECTOR;
    let mut entries = Vec::new();
    loop {
        entries.push(found[x].take()?.0);
        if x == h {
            break;
        }
        x = next[x]?;
    }
    Some(ActiveSequence { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, tail: u32, guid: Uuid, fill: u8) -> LogEntry {
        LogEntry {
            sequence_number: seq,
            tail,
            log_guid: guid,
            flushed_file_offset: 4 << 20,
            last_file_offset: 5 << 20,
            ops: vec![
                LogOp::Data {
                    offset: 3 << 20,
                    bytes: vec![fill; LOG_SECTOR],
                },
                LogOp::Zero {
                    offset: 2 << 20,
                    length: 8192,
                },
            ],
        }
    }

    fn place(log: &mut [u8], at: usize, e: &LogEntry) -> usize {
        let b = e.serialize();
        log[at..at + b.len()].copy_from_slice(&b);
        at + b.len()
    }

    #[test]
    fn entry_round_trips_with_leading_and_trailing_bytes_restored() {
        let g = Uuid::new_v4();
        let mut e = entry(5, 0, g, 0x11);
        if let LogOp::Data { bytes, .. } = &mut e.ops[0] {
            bytes[..8].copy_from_slice(b"ABCDEFGH");
            bytes[LOG_SECTOR - 4..].copy_from_slice(b"WXYZ");
        }
        let b = e.serialize();
        assert_eq!(b.len(), 2 * LOG_SECTOR);
        assert_eq!(&b[LOG_SECTOR..LOG_SECTOR + 4], b"data");
        assert_eq!(LogEntry::parse(&b).unwrap(), e);
    }

    #[test]
    fn corrupt_entry_fails_its_checksum() {
        let mut b = entry(1, 0, Uuid::new_v4(), 1).serialize();
        b[LOG_SECTOR + 100] ^= 0xff;
        assert!(matches!(LogEntry::parse(&b), Err(Fault::Checksum { .. })));
    }

    #[test]
    fn active_sequence_is_the_newest_complete_one() {
        let g = Uuid::new_v4();
        let mut log = vec![0u8; 64 * LOG_SECTOR];
        // An old sequence at 0 (seq 1, 2), then a newer one (seq 3 ending at 4,
        // whose tail is seq 3's position).
        let a = place(&mut log, 0, &entry(1, 0, g, 1));
        let b = place(&mut log, a, &entry(2, 0, g, 2));
        let c = place(&mut log, b, &entry(3, b as u32, g, 3));
        place(&mut log, c, &entry(4, b as u32, g, 4));
        let s = find_active_sequence(&log, &g).unwrap();
        assert_eq!(
            s.entries
                .iter()
                .map(|e| e.sequence_number)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(s.head().sequence_number, 4);
    }

    #[test]
    fn entries_of_another_log_guid_are_ignored() {
        let g = Uuid::new_v4();
        let mut log = vec![0u8; 16 * LOG_SECTOR];
        place(&mut log, 0, &entry(9, 0, Uuid::new_v4(), 1));
        assert!(find_active_sequence(&log, &g).is_none());
        place(
            &mut log,
            8 * LOG_SECTOR,
            &entry(2, 8 * LOG_SECTOR as u32, g, 1),
        );
        assert_eq!(
            find_active_sequence(&log, &g)
                .unwrap()
                .head()
                .sequence_number,
            2
        );
    }

    #[test]
    fn a_sequence_whose_tail_is_missing_is_not_valid() {
        let g = Uuid::new_v4();
        let mut log = vec![0u8; 16 * LOG_SECTOR];
        // The head says the sequence starts at sector 10, which holds nothing.
        place(&mut log, 0, &entry(7, 10 * LOG_SECTOR as u32, g, 1));
        assert!(find_active_sequence(&log, &g).is_none());
    }

    #[test]
    fn an_entry_wrapping_around_the_end_of_the_log_is_found() {
        let g = Uuid::new_v4();
        let e = entry(3, 3 * LOG_SECTOR as u32, g, 7);
        let b = e.serialize();
        let mut log = vec![0u8; 4 * LOG_SECTOR];
        // Starts in the last sector, continues at 0.
        log[3 * LOG_SECTOR..].copy_from_slice(&b[..LOG_SECTOR]);
        log[..LOG_SECTOR].copy_from_slice(&b[LOG_SECTOR..]);
        let s = find_active_sequence(&log, &g).unwrap();
        assert_eq!(s.entries, vec![e]);
    }

    /// A one-sector entry (a zero descriptor only).
    fn small(seq: u64, tail: usize, guid: Uuid) -> LogEntry {
        LogEntry {
            sequence_number: seq,
            tail: (tail * LOG_SECTOR) as u32,
            log_guid: guid,
            flushed_file_offset: 4 << 20,
            last_file_offset: 5 << 20,
            ops: vec![LogOp::Zero {
                offset: 2 << 20,
                length: 4096,
            }],
        }
    }

    #[test]
    fn a_log_full_of_small_entries_replays_them_all_in_order() {
        let g = Uuid::new_v4();
        let n = 8192;
        let mut log = vec![0u8; n * LOG_SECTOR];
        // One sequence of one-sector entries filling the whole log, starting
        // at sector 5 and wrapping: seq 100 at sector 5, ..., the head
        // (seq 100 + n - 1) at sector 4, its tail at sector 5.
        for i in 0..n {
            let at = (5 + i) % n;
            place(&mut log, at * LOG_SECTOR, &small(100 + i as u64, 5, g));
        }
        let s = find_active_sequence(&log, &g).unwrap();
        assert_eq!(s.entries.len(), n, "each entry once, none read twice");
        assert!(s
            .entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.sequence_number == 100 + i as u64));
        // The head's tail in the middle: only the entries from there on.
        let head = (5 + n - 1) % n;
        place(
            &mut log,
            head * LOG_SECTOR,
            &small(100 + n as u64 - 1, 8000, g),
        );
        let s = find_active_sequence(&log, &g).unwrap();
        assert_eq!(s.entries.first().unwrap().sequence_number, 100 + 7995);
        assert_eq!(s.head().sequence_number, 100 + n as u64 - 1);
    }

    #[test]
    fn a_log_full_of_entries_whose_tail_is_never_found_is_searched_in_linear_time() {
        // Two-sector entries, one chain over the whole log, every head's tail
        // naming a data sector: no start gives a valid sequence, so the scan
        // steps one sector at a time through the chain. Walking the chain
        // again from every start took minutes at this size.
        let g = Uuid::new_v4();
        let n = 16384;
        let mut log = vec![0u8; n * LOG_SECTOR];
        for i in 0..n / 2 {
            place(
                &mut log,
                2 * i * LOG_SECTOR,
                &entry(1 + i as u64, LOG_SECTOR as u32, g, 3),
            );
        }
        let t = std::time::Instant::now();
        assert!(find_active_sequence(&log, &g).is_none());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn an_entry_claiming_more_than_the_log_length_is_not_read() {
        let g = Uuid::new_v4();
        // A valid 2-sector entry, cut to fit a 1-sector log: its header says
        // 8192 bytes, more than LogLength.
        let b = entry(4, 0, g, 9).serialize();
        let log = b[..LOG_SECTOR].to_vec();
        assert!(find_active_sequence(&log, &g).is_none());
        // Entries chained all the way round a full log end where they began:
        // the sequence holds each once (it never runs past LogLength).
        let n = 6;
        let mut log = vec![0u8; n * LOG_SECTOR];
        for i in 0..n / 2 {
            place(
                &mut log,
                2 * i * LOG_SECTOR,
                &entry(7 + i as u64, 0, g, i as u8),
            );
        }
        let s = find_active_sequence(&log, &g).unwrap();
        assert_eq!(
            s.entries
                .iter()
                .map(|e| e.sequence_number)
                .collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
    }

    #[test]
    fn garbage_never_panics() {
        let g = Uuid::new_v4();
        let mut log = vec![0u8; 8 * LOG_SECTOR];
        for (i, b) in log.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        log[..4].copy_from_slice(b"loge");
        log[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find_active_sequence(&log, &g).is_none());
        assert!(LogEntry::parse(&log[..100]).is_err());
    }
}
