//! `check`: structural validation of a disk file, and safe repairs.

use std::path::{Path, PathBuf};

use crate::vhd1::footer::{Footer, FOOTER_SIZE};
use crate::vhd1::{chain, DiskType, VhdImage};
use crate::{Format, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub what: String,
    pub repaired: bool,
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
    if crate::detect_format(path)? != Format::Vhd && !crate::is_vhd_name(path) {
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
        });
    }
    Ok(())
}
