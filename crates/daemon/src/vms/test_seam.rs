//! The crash tests' seam for VM-level jobs (delete, move storage): an environment
//! variable naming a step makes the job stop there for good, after logging
//! "<what> stalled for a crash test", so a test can SIGKILL the daemon at that
//! point. Unset, it does nothing. (The checkpoint merges have their own,
//! `VIRIDIAN_TEST_STALL_MERGE_AT`; the disk jobs use `VIRIDIAN_TEST_STALL_DISK_JOB_AT`
//! with [`Stall::at_percent`].)

pub struct Stall {
    what: &'static str,
    at: Option<String>,
}

impl Stall {
    pub fn from_env(var: &'static str, what: &'static str) -> Stall {
        Stall {
            what,
            at: std::env::var(var).ok().filter(|s| !s.is_empty()),
        }
    }

    /// Stops here when the variable names `step`.
    pub fn at(&self, step: &str) {
        if self.at.as_deref() == Some(step) {
            self.forever(step);
        }
    }

    /// Stops once a copy reaches the percent the variable names as `copy-<percent>`.
    pub fn at_copy(&self, percent: u8) {
        let at = self.at.as_deref().and_then(|s| s.strip_prefix("copy-"));
        if at
            .and_then(|p| p.parse::<u8>().ok())
            .is_some_and(|p| percent >= p)
        {
            self.forever(&format!("copy at {percent} %"));
        }
    }

    /// Stops once progress reaches the percent the variable names as a plain
    /// number (the disk jobs' `VIRIDIAN_TEST_STALL_DISK_JOB_AT=<percent>`).
    pub fn at_percent(&self, percent: u8) {
        if self
            .at
            .as_deref()
            .and_then(|p| p.parse::<u8>().ok())
            .is_some_and(|p| percent >= p)
        {
            self.forever(&format!("{percent} %"));
        }
    }

    /// Like [`Stall::at_copy`], but the wait ends when `cancelled` says so (a job
    /// that can be cancelled stays cancellable while it waits).
    pub fn at_copy_unless(&self, percent: u8, cancelled: impl Fn() -> bool) {
        let at = self.at.as_deref().and_then(|s| s.strip_prefix("copy-"));
        if at
            .and_then(|p| p.parse::<u8>().ok())
            .is_some_and(|p| percent >= p)
        {
            tracing::warn!(at = %format!("copy at {percent} %"), "{} stalled for a crash test", self.what);
            while !cancelled() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    fn forever(&self, at: &str) -> ! {
        tracing::warn!(at, "{} stalled for a crash test", self.what);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
