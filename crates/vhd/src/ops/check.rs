//! `check`: structural validation of a disk file, and safe repairs.

use std::path::{Path, PathBuf};

use crate::vhd1::footer::{Footer, FOOTER_SIZE};
use crate::vhd1::{chain, DiskType, VhdImage};
use crate::vhdx::VhdxImage;
use crate::{Format, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub what: String,
    pub repaired: bool,
    pub kind: ProblemKind,
}

/// What kind of problem: the one a file may have by design, or damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A VHDX whose log holds entries to replay, as the format intends after a
    /// crash or when the file was copied while open for writing: nothing is
    /// damaged; the first writable open (or `--repair`) replays it.
    LogReplay,
    /// The file is damaged or its chain does not resolve.
    Damage,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Whether nothing is wrong now (every problem found was repaired).
    pub fn clean(&self) -> bool {
        self.problems.iter().all(|p| p.repaired)
    }

    /// Whether what remains is only a log to replay (no damage).
    pub fn needs_only_log_replay(&self) -> bool {
        !self.clean()
            && self
                .problems
                .iter()
                .all(|p| p.repaired || p.kind == ProblemKind::LogReplay)
    }

    /// The problems that remain, as one sentence for a message.
    pub fn summary(&self) -> String {
        let left: Vec<&str> = self
            .problems
            .iter()
            .filter(|p| !p.repaired)
            .map(|p| p.what.as_str())
            .collect();
        left.join("; ")
    }
}

/// What [`verify_copy`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Nothing to do.
    Clean,
    /// The copy held a log (its source was open for writing when it was
    /// copied); the log was replayed into the copy, which is clean now.
    LogReplayed,
    /// The copy is damaged: the problems, as one sentence.
    Damaged(String),
}

/// Checks a copy the caller just made and owns (no one else has it open): a
/// VHDX log is what the format intends after a copy of an open file, not
/// damage, so it is replayed into the copy and the copy checked again; only
/// damage is reported. Storage moves and exports verify their copies with it.
pub fn verify_copy(path: &Path) -> Result<Verified> {
    let report = check(path, false)?;
    if report.clean() {
        return Ok(Verified::Clean);
    }
    if !report.needs_only_log_replay() {
        return Ok(Verified::Damaged(report.summary()));
    }
    check(path, true)?;
    let again = check(path, false)?;
    Ok(if again.clean() {
        Verified::LogReplayed
    } else {
        Verified::Damaged(again.summary())
    })
}

/// Checks `path`. Faults that make the file unusable are reported as problems,
/// not returned as errors; an `Err` means the file could not be examined at all.
/// With `repair`, fixes only what is safe: a trailing footer that differs from,
/// or is missing beside, an intact copy at offset 0.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let mut report = CheckReport {
        path: path.to_path_buf(),
        problems: Vec::new(),
    };
    let format = crate::detect_format(path)?;
    if format == Format::Vhdx || (format == Format::Raw && crate::is_vhdx_name(path)) {
        check_vhdx(path, repair, &mut report)?;
        return Ok(report);
    }
    if format != Format::Vhd && !crate::is_vhd_name(path) {
        return Ok(report);
    }
    let opened = if repair {
        VhdImage::open_layer(path, false)
    } else {
        VhdImage::inspect(path)
    };
    let mut img = match opened {
        Ok(img) => img,
        Err(e @ crate::Error::Locked { .. }) => return Err(e),
        Err(e) => {
            report.problems.push(Problem {
                what: e.to_string(),
                repaired: false,
                kind: ProblemKind::Damage,
            });
            return Ok(report);
        }
    };
    check_footer_copy(&mut img, repair, &mut report)?;
    if img.footer().disk_type == DiskType::Differencing {
        if let Err(e) = chain::open_chain(path, true) {
            report.problems.push(Problem {
                what: e.to_string(),
                repaired: false,
                kind: ProblemKind::Damage,
            });
        }
    }
    Ok(report)
}

fn check_footer_copy(img: &mut VhdImage, repair: bool, report: &mut CheckReport) -> Result<()> {
    if img.footer().disk_type == DiskType::Fixed {
        return Ok(());
    }
    let path = img.file_path().to_path_buf();
    let fault = if img.footer_recovered() {
        Some(format!(
            "{}: the footer at the end of the file is missing or damaged; the copy at offset 0 is intact",
            path.display()
        ))
    } else {
        let mut copy = [0u8; FOOTER_SIZE];
        img.file()
            .read_at(&mut copy, 0)
            .map_err(|source| crate::Error::Io {
                path: path.clone(),
                source,
            })?;
        match Footer::parse(&copy) {
            Ok(c) if &c == img.footer() => None,
            Ok(_) => Some("it differs from the footer at the end".to_string()),
            Err(fault) => Some(fault.to_string()),
        }
        .map(|why| {
            format!(
                "{}: the footer copy at offset 0 is wrong: {why}",
                path.display()
            )
        })
    };
    if let Some(what) = fault {
        // Rewriting puts the good footer at both places.
        if repair {
            img.rewrite_footer(img.footer().clone())?;
        }
        report.problems.push(Problem {
            what,
            repaired: repair,
            kind: ProblemKind::Damage,
        });
    }
    Ok(())
}

/// A VHDX: the structure must open (headers, region table, metadata, BAT, a
/// log that replays), the chain must resolve and link. A log that needs
/// replay is a problem that `repair` fixes by replaying it into the file.
fn check_vhdx(path: &Path, repair: bool, report: &mut CheckReport) -> Result<()> {
    let img = match VhdxImage::inspect(path) {
        Ok(img) => img,
        Err(e) => {
            report.problems.push(Problem {
                what: e.to_string(),
                repaired: false,
                kind: ProblemKind::Damage,
            });
            return Ok(());
        }
    };
    if let Some(log) = img.log_found() {
        let what = format!(
            "{}: the log holds {} entries (up to sequence {}) not yet applied to the file, as after a crash",
            path.display(),
            log.entries,
            log.head_sequence
        );
        let repaired = if repair {
            drop(img);
            // A writable open replays the log into the file.
            VhdxImage::open_layer(path, false)?.close()?;
            true
        } else {
            false
        };
        report.problems.push(Problem {
            what,
            repaired,
            kind: ProblemKind::LogReplay,
        });
    } else {
        drop(img);
    }
    let img = VhdxImage::inspect(path)?;
    if img.is_differencing() {
        if let Err(e) = crate::vhdx::chain::open_chain(path, true) {
            report.problems.push(Problem {
                what: e.to_string(),
                repaired: false,
                kind: ProblemKind::Damage,
            });
        }
    }
    Ok(())
}
