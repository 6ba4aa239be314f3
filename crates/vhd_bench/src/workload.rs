//! The I/O loops: one request at a time (queue depth 1), the same for every disk.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::ValueEnum;
use vhd::Disk;

use crate::direct::AlignedBuf;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// COUNT requests from offset 0 upwards, then a flush.
    SeqWrite,
    /// COUNT requests from offset 0 upwards.
    SeqRead,
    /// COUNT requests at distinct random request-aligned offsets over the
    /// whole disk (a seeded permutation, so every write allocates), then a flush.
    RandWrite,
}

pub struct Outcome {
    pub seconds: f64,
    pub bytes: u64,
}

/// xorshift64*: reproducible offsets without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Fills `buf` with non-zero pseudo-random bytes.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut rng = Rng(seed | 1);
    for chunk in buf.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The first `count` slots of a seeded random permutation of `slots`.
fn random_slots(slots: u64, count: u64, seed: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..slots).collect();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for i in 0..count as usize {
        let j = i + (rng.next() % (slots - i as u64)) as usize;
        all.swap(i, j);
    }
    all.truncate(count as usize);
    all
}

/// `count` distinct random `bs`-aligned offsets within `size` bytes.
pub fn random_offsets(size: u64, bs: u64, count: u64, seed: u64) -> Result<Vec<u64>> {
    let slots = size / bs;
    if count > slots {
        bail!("{count} requests of {bs} bytes do not fit a {size}-byte disk");
    }
    Ok(random_slots(slots, count, seed)
        .into_iter()
        .map(|s| s * bs)
        .collect())
}

pub fn run(disk: &dyn Disk, pattern: Pattern, bs: u64, count: u64, seed: u64) -> Result<Outcome> {
    if count > disk.size() / bs {
        bail!(
            "{count} requests of {bs} bytes do not fit a {}-byte disk",
            disk.size()
        );
    }
    let mut buf = AlignedBuf::new(bs as usize);
    fill_pattern(buf.as_mut_slice(), seed);
    let offsets: Vec<u64> = match pattern {
        Pattern::SeqWrite | Pattern::SeqRead => (0..count).map(|i| i * bs).collect(),
        Pattern::RandWrite => random_offsets(disk.size(), bs, count, seed)?,
    };
    let start = Instant::now();
    match pattern {
        Pattern::SeqRead => {
            for &off in &offsets {
                disk.read_at(buf.as_mut_slice(), off)?;
            }
        }
        Pattern::SeqWrite | Pattern::RandWrite => {
            for &off in &offsets {
                disk.write_at(buf.as_slice(), off)?;
            }
            disk.flush()?;
        }
    }
    Ok(Outcome {
        seconds: start.elapsed().as_secs_f64(),
        bytes: count * bs,
    })
}
