//! The serial console's log: everything the guest wrote on its first serial port,
//! kept within a size cap.
//!
//! The log is `console.log` in the runtime folder. When it reaches half the cap it is
//! renamed to `console.log.1` (replacing the previous one) and a new `console.log`
//! starts, so the two together never exceed the cap and the newest output is always
//! kept. [`read_log`] returns both, oldest first.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const LOG_FILE: &str = "console.log";
pub const OLD_LOG_FILE: &str = "console.log.1";

/// Default cap on the console log, both files together.
pub const DEFAULT_LOG_LIMIT: u64 = 2 * 1024 * 1024;

/// A size-capped append-only log.
pub struct CappedLog {
    dir: PathBuf,
    file: File,
    written: u64,
    half: u64,
}

impl CappedLog {
    /// Opens (appending to) the log in `dir`, capped at `limit` bytes (at least 2 KiB).
    pub fn open(dir: &Path, limit: u64) -> io::Result<Self> {
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            written,
            half: (limit / 2).max(1024),
        })
    }

    /// Appends `data`, rotating first when it would pass half the cap.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.written >= self.half {
                self.rotate()?;
            }
            let room = usize::try_from(self.half - self.written).unwrap_or(usize::MAX);
            let n = data.len().min(room);
            self.file.write_all(&data[..n])?;
            self.written += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(self.dir.join(LOG_FILE), self.dir.join(OLD_LOG_FILE))?;
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join(LOG_FILE))?;
        self.written = 0;
        Ok(())
    }
}

/// The whole kept console output in `dir`, oldest first (empty if there is none).
pub fn read_log(dir: &Path) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for name in [OLD_LOG_FILE, LOG_FILE] {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => out.extend_from_slice(&bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_stays_within_its_cap_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CappedLog::open(dir.path(), 4096).unwrap();
        for i in 0..1000 {
            log.append(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        let text = String::from_utf8(read_log(dir.path()).unwrap()).unwrap();
        assert!(text.len() <= 4096, "{} bytes kept", text.len());
        assert!(text.ends_with("line 0999\n"));
        assert!(!text.contains("line 0000"));
        assert!(text.len() > 2048, "only {} bytes kept", text.len());
        // What is kept is one contiguous tail of the output (the oldest line may be cut).
        let whole = &text[text.find('\n').unwrap() + 1..];
        let first: usize = whole[5..9].parse().unwrap();
        let expected: String = (first..1000).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(whole, expected);
    }

    #[test]
    fn reopening_appends_to_the_existing_log() {
        let dir = tempfile::tempdir().unwrap();
        CappedLog::open(dir.path(), 1 << 20)
            .unwrap()
            .append(b"first\n")
            .unwrap();
        CappedLog::open(dir.path(), 1 << 20)
            .unwrap()
            .append(b"second\n")
            .unwrap();
        assert_eq!(read_log(dir.path()).unwrap(), b"first\nsecond\n");
    }
}
