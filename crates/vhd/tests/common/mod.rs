//! What the crash tests share: the model of what each sector may read as
//! after a crash.

/// Bytes per sector.
const SECTOR: usize = 512;

/// What each sector may read as after a crash: its durable value, or any
/// value written to it since (the write may or may not have landed).
pub struct Model {
    durable: Vec<u8>,
    since_flush: Vec<Vec<u8>>,
}

impl Model {
    pub fn new(initial: Vec<u8>) -> Self {
        let n = initial.len();
        Model {
            durable: initial,
            since_flush: vec![Vec::new(); n],
        }
    }

    pub fn writing(&mut self, first: usize, count: usize, value: u8) {
        for s in first..first + count {
            self.since_flush[s].push(value);
        }
    }

    pub fn flushed(&mut self) {
        for (d, since) in self.durable.iter_mut().zip(&mut self.since_flush) {
            if let Some(&last) = since.last() {
                *d = last;
            }
            since.clear();
        }
    }

    pub fn assert_matches(&self, data: &[u8], n: u64) {
        for (s, sector) in data.chunks(SECTOR).enumerate() {
            let v = sector[0];
            assert!(
                sector.iter().all(|&b| b == v),
                "crash point {n}: sector {s} is torn"
            );
            assert!(
                v == self.durable[s] || self.since_flush[s].contains(&v),
                "crash point {n}: sector {s} reads {v:#x}; flushed {:#x}, written since {:?}",
                self.durable[s],
                self.since_flush[s]
            );
        }
    }
}
