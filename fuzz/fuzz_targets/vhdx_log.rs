//! The VHDX log: entry parsing at every 4 KiB sector of a log buffer, and the
//! search for the active sequence over the whole buffer (padded with zeros to
//! whole sectors). The first byte is a flags byte: bit 0 recomputes the
//! CRC-32C of the entries found walking the log from its start. The LogGuid
//! searched for is the first entry's (bytes 32..48). An entry that parses must
//! serialize back to the same entry; a sequence found must be one the log
//! holds: consecutive sequence numbers of that LogGuid, each entry in place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uuid::Uuid;
use vhd::vhdx::log::{find_active_sequence, LogEntry};
use vhd::vhdx::LOG_SECTOR;
use viridian_fuzz::vhdx_input::fix_log;

/// Logs up to 64 sectors: the search is quadratic in the log's length.
const MAX_LOG: usize = 64 * LOG_SECTOR;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let n = data.len().min(MAX_LOG);
    let mut log = data[..n].to_vec();
    log.resize(n.div_ceil(LOG_SECTOR).max(1) * LOG_SECTOR, 0);
    if flags & 1 != 0 {
        fix_log(&mut log);
    }

    let mut entries = Vec::new();
    for at in (0..log.len()).step_by(LOG_SECTOR) {
        let Ok(len) = LogEntry::peek_length(&log[at..]) else {
            continue;
        };
        let Some(b) = log.get(at..at + len) else {
            continue;
        };
        let Ok(e) = LogEntry::parse(b) else {
            continue;
        };
        assert_eq!(e.length(), len, "{e:?}");
        let again = LogEntry::parse(&e.serialize()).expect("a serialized entry parses");
        assert_eq!(again, e);
        entries.push(e);
    }

    let mut g = [0u8; 16];
    g.copy_from_slice(&log[32..48]);
    let guid = Uuid::from_bytes_le(g);
    let Some(seq) = find_active_sequence(&log, &guid) else {
        return;
    };
    assert!(!seq.entries.is_empty());
    for w in seq.entries.windows(2) {
        assert_eq!(w[1].sequence_number, w[0].sequence_number.wrapping_add(1));
    }
    for e in &seq.entries {
        assert_eq!(e.log_guid, guid);
        assert!((e.tail as usize) < log.len());
        assert!(e.length() <= log.len());
    }
    let _ = seq.head();
});
