//! How the VHDX targets turn a small fuzz input into the bytes they parse.
//!
//! A VHDX file is mostly zeros (its structures sit at 1 MiB boundaries, a
//! small file is already 4 MiB), so `vhdx_image` takes a *sparse* file: a flags
//! byte, the file length in 4 KiB units, then `(offset, length, bytes)`
//! records. A real image encodes to a few KiB, and the fuzzer's mutations land
//! on structure bytes, not on zeros.
//!
//! Headers, region tables and log entries carry CRC-32C checksums that a
//! mutation almost always breaks; [`fix_checksums`] recomputes them when the
//! input asks (a flags bit), so the fuzzer also reaches what lies behind them.

use vhd::vhdx::crc::crc32c_without;
use vhd::vhdx::header::{self, Header, HEADER_OFFSETS, HEADER_SIZE};
use vhd::vhdx::log::{LogEntry, ENTRY_SIGNATURE};
use vhd::vhdx::region::{self, TABLE_OFFSETS};
use vhd::vhdx::LOG_SECTOR;

/// The largest file a sparse input decodes to.
pub const MAX_DECODED: usize = 12 << 20;
/// Flags bit: recompute the CRC-32C of both headers and both region tables.
pub const FIX_HEADERS: u8 = 1;
/// Flags bit: recompute the CRC-32C of the log entries (walked from the log's start).
pub const FIX_LOG: u8 = 2;

fn u16_le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes a sparse input: `flags: u8, length_4k: u16 LE`, then records of
/// `offset: u32 LE` (taken modulo [`MAX_DECODED`]), `len: u16 LE` and `len`
/// bytes (fewer if the input ends). The file is as long as `length_4k` says
/// or as the records reach, at most [`MAX_DECODED`]. Returns (flags, file).
pub fn decode(data: &[u8]) -> (u8, Vec<u8>) {
    let Some((&flags, rest)) = data.split_first() else {
        return (0, Vec::new());
    };
    let Some(len) = rest.get(..2) else {
        return (flags, Vec::new());
    };
    let mut size = (usize::from(u16_le(len)) * 4096).min(MAX_DECODED);
    let mut records = Vec::new();
    let mut rest = &rest[2..];
    while rest.len() >= 6 {
        let offset = u32_le(rest) as usize % MAX_DECODED;
        let n = usize::from(u16_le(&rest[4..]));
        let bytes = &rest[6..6 + n.min(rest.len() - 6)];
        rest = &rest[6 + bytes.len()..];
        let bytes = &bytes[..bytes.len().min(MAX_DECODED - offset)];
        size = size.max(offset + bytes.len());
        records.push((offset, bytes));
    }
    let mut file = vec![0u8; size];
    for (offset, bytes) in records {
        file[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    (flags, file)
}

/// Encodes a file as a sparse input: one record per run of non-zero bytes
/// (runs closer than 16 zero bytes merged).
pub fn encode(flags: u8, file: &[u8]) -> Vec<u8> {
    assert!(
        file.len() <= MAX_DECODED,
        "{} bytes is too long",
        file.len()
    );
    let mut out = vec![flags];
    out.extend_from_slice(&(file.len().div_ceil(4096) as u16).to_le_bytes());
    let mut i = 0;
    while i < file.len() {
        if file[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i;
        while i < file.len() && i - end < 16 && i - start < usize::from(u16::MAX) {
            if file[i] != 0 {
                end = i + 1;
            }
            i += 1;
        }
        out.extend_from_slice(&(start as u32).to_le_bytes());
        out.extend_from_slice(&((end - start) as u16).to_le_bytes());
        out.extend_from_slice(&file[start..end]);
        i = end;
    }
    out
}

/// Writes the CRC-32C of the `len` bytes at `at` into its field at `at + 4`.
fn set_crc(file: &mut [u8], at: usize, len: usize) {
    let crc = crc32c_without(&file[at..at + len], 4);
    file[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the checksums `flags` asks for, of structures whose signature is in place.
pub fn fix_checksums(flags: u8, file: &mut [u8]) {
    if flags & FIX_HEADERS != 0 {
        for at in HEADER_OFFSETS.map(|a| a as usize) {
            if file.get(at..at + 4) == Some(header::HEADER_SIGNATURE)
                && at + HEADER_SIZE <= file.len()
            {
                set_crc(file, at, HEADER_SIZE);
            }
        }
        for at in TABLE_OFFSETS.map(|a| a as usize) {
            if file.get(at..at + 4) == Some(region::SIGNATURE)
                && at + region::TABLE_SIZE <= file.len()
            {
                set_crc(file, at, region::TABLE_SIZE);
            }
        }
    }
    if flags & FIX_LOG != 0 {
        for at in HEADER_OFFSETS.map(|a| a as usize) {
            let Some(h) = file
                .get(at..at + HEADER_SIZE)
                .and_then(|b| Header::parse(b).ok())
            else {
                continue;
            };
            let (Ok(start), Ok(len)) =
                (usize::try_from(h.log_offset), usize::try_from(h.log_length))
            else {
                continue;
            };
            if let Some(log) = file.get_mut(start..start.saturating_add(len)) {
                fix_log(log);
            }
        }
    }
}

/// Recomputes the CRC-32C of every entry found walking the log from its
/// start (entries that would wrap around its end are left alone).
pub fn fix_log(log: &mut [u8]) {
    let mut at = 0;
    while at + LOG_SECTOR <= log.len() {
        let step = match LogEntry::peek_length(&log[at..]) {
            Ok(len) if at + len <= log.len() && &log[at..at + 4] == ENTRY_SIGNATURE => {
                set_crc(log, at, len);
                len
            }
            _ => LOG_SECTOR,
        };
        at += step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trips() {
        let mut file = vec![0u8; 3 << 20];
        file[0..8].copy_from_slice(b"vhdxfile");
        file[65536..65540].copy_from_slice(b"head");
        file[(2 << 20) + 5] = 9;
        file[(2 << 20) + 40] = 9;
        let enc = encode(FIX_LOG, &file);
        assert!(enc.len() < 100, "{}", enc.len());
        assert_eq!(decode(&enc), (FIX_LOG, file));
    }
}
