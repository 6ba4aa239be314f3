//! The job engine: Hyper-V-style jobs with states, progress, cancellation and retention.
