//! What counting costs a request: nanoseconds per `DriveCounters::read` (three
//! relaxed atomic adds), on one thread and on two threads sharing one drive's
//! counters (as two virtqueues of a synthetic disk do).
//!
//! `cargo run --release -p drive_counters --example counter_cost`

use std::sync::Arc;
use std::time::Instant;

use drive_counters::DriveCounters;

const CALLS: u64 = 20_000_000;

fn run(threads: u64) -> f64 {
    let c = Arc::new(DriveCounters::new());
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..CALLS {
                    c.read(std::hint::black_box(4096 + (i & 1)));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let ns = start.elapsed().as_nanos() as f64 / CALLS as f64;
    assert_eq!(c.snapshot().read_ops, CALLS * threads);
    ns
}

fn main() {
    for threads in [1, 2] {
        let best = (0..3).map(|_| run(threads)).fold(f64::MAX, f64::min);
        println!("{threads} thread(s): {best:.1} ns per counted request (best of 3)");
    }
}
