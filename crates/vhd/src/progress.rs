//! Progress reporting and cancellation for long operations (merge, convert, ...).

/// Receives progress of a long operation and may ask it to stop.
///
/// `update(done, total)` is called with byte counts as work proceeds; returning
/// `false` cancels the operation, which then stops at a consistent point and
/// returns [`crate::Error::Cancelled`].
pub trait Progress {
    fn update(&mut self, done: u64, total: u64) -> bool;
}

impl<F: FnMut(u64, u64) -> bool> Progress for F {
    fn update(&mut self, done: u64, total: u64) -> bool {
        self(done, total)
    }
}

/// A progress sink that ignores updates and never cancels.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&mut self, _done: u64, _total: u64) -> bool {
        true
    }
}
