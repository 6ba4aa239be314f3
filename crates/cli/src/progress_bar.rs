//! A progress bar for long offline operations: drawn on a terminal (stderr),
//! silent when stderr is not one, so scripts and logs stay clean.

use std::io::{IsTerminal, Write};

pub struct ProgressBar {
    label: &'static str,
    on_terminal: bool,
    last_percent: Option<u64>,
}

impl ProgressBar {
    pub fn new(label: &'static str) -> Self {
        ProgressBar {
            label,
            on_terminal: std::io::stderr().is_terminal(),
            last_percent: None,
        }
    }

    /// Clears the bar's line.
    pub fn finish(&self) {
        if self.on_terminal && self.last_percent.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

impl vhd::Progress for ProgressBar {
    fn update(&mut self, done: u64, total: u64) -> bool {
        if !self.on_terminal {
            return true;
        }
        let percent = (done.saturating_mul(100))
            .checked_div(total)
            .unwrap_or(100)
            .min(100);
        if self.last_percent != Some(percent) {
            let filled = (percent / 4) as usize;
            eprint!(
                "\r{} [{}{}] {percent:3}%",
                self.label,
                "#".repeat(filled),
                " ".repeat(25 - filled)
            );
            let _ = std::io::stderr().flush();
            self.last_percent = Some(percent);
        }
        true
    }
}
