//! Which SeaBIOS a generation 1 VM boots with.
//!
//! Debian's and QEMU's SeaBIOS builds read IDE disks in PIO, and QEMU's PIIX model
//! makes every PIO sector its own block request: over the worker's NBD server a boot
//! loader loading 15 MiB pays ~31,000 socket round trips. `scripts/build-seabios.sh`
//! builds the same SeaBIOS source with ATA DMA on, where each BIOS disk read is one
//! request; viridiand uses that build when it is installed (BENCHMARKS.md,
//! "Generation 1 firmware").

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `scripts/build-seabios.sh` installs Viridian's SeaBIOS build.
pub const VIRIDIAN_SEABIOS: &str = "/usr/local/share/viridian/firmware/seabios.bin";

/// The generation 1 firmware asked for (viridiand's `--bios`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiosChoice {
    /// Viridian's SeaBIOS build when it is installed, else QEMU's own.
    #[default]
    Auto,
    /// QEMU's own `bios-256k.bin`.
    Qemu,
    /// This SeaBIOS image.
    File(PathBuf),
}

impl BiosChoice {
    /// Parses `--bios`: `auto`, `qemu`, or a path.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("--bios needs auto, qemu or the path of a SeaBIOS image".into()),
            "auto" => Ok(Self::Auto),
            "qemu" => Ok(Self::Qemu),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// The firmware decided on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bios {
    /// The image to give QEMU (`-bios`); `None` is QEMU's own.
    pub path: Option<PathBuf>,
    /// One sentence for `viridian host`.
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("the SeaBIOS image {} cannot be used: {reason}", path.display())]
    Bios { path: PathBuf, reason: String },
}

/// Decides the generation 1 firmware; `installed` is where Viridian's build would be
/// ([`VIRIDIAN_SEABIOS`] outside tests).
pub fn resolve(choice: &BiosChoice, installed: &Path) -> Result<Bios, FirmwareError> {
    const PIO: &str = "it reads IDE disks in PIO, one sector per request, so firmware boots \
                       are slow (scripts/build-seabios.sh builds the DMA one)";
    match choice {
        BiosChoice::Qemu => Ok(Bios {
            path: None,
            reason: format!("QEMU's own bios-256k.bin (--bios qemu); {PIO}"),
        }),
        BiosChoice::File(path) => {
            check_image(path)?;
            Ok(Bios {
                path: Some(path.clone()),
                reason: "the SeaBIOS image given with --bios".into(),
            })
        }
        BiosChoice::Auto => {
            if check_image(installed).is_ok() {
                Ok(Bios {
                    path: Some(installed.to_path_buf()),
                    reason:
                        "Viridian's SeaBIOS build with ATA DMA: boot disks read in whole requests"
                            .into(),
                })
            } else {
                Ok(Bios {
                    path: None,
                    reason: format!(
                        "QEMU's own bios-256k.bin: {} is not installed, and {PIO}",
                        installed.display()
                    ),
                })
            }
        }
    }
}

/// A SeaBIOS image QEMU can map: a readable file of 128 or 256 KiB (QEMU maps the
/// BIOS below 4 GiB, so its size must be a multiple of 64 KiB; SeaBIOS builds are these two).
fn check_image(path: &Path) -> Result<(), FirmwareError> {
    let bad = |reason: String| FirmwareError::Bios {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if !matches!(meta.len(), 131_072 | 262_144) {
        return Err(bad(format!(
            "it is {} bytes; a SeaBIOS image is 128 KiB or 256 KiB",
            meta.len()
        )));
    }
    std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_installed_build_and_falls_back_to_qemus_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("seabios.bin");
        let b = resolve(&BiosChoice::Auto, &installed).unwrap();
        assert_eq!(b.path, None);
        assert!(b.reason.contains("is not installed"), "{}", b.reason);
        assert!(b.reason.contains("build-seabios.sh"), "{}", b.reason);

        std::fs::write(&installed, vec![0u8; 262_144]).unwrap();
        let b = resolve(&BiosChoice::Auto, &installed).unwrap();
        assert_eq!(b.path.as_deref(), Some(installed.as_path()));
        assert!(b.reason.contains("ATA DMA"), "{}", b.reason);
    }

    #[test]
    fn a_given_image_must_exist_and_look_like_a_bios() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.bin");
        let e = resolve(&BiosChoice::File(missing.clone()), &missing).unwrap_err();
        assert!(e.to_string().contains("nope.bin"), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");

        let small = dir.path().join("small.bin");
        std::fs::write(&small, b"not a bios").unwrap();
        let e = resolve(&BiosChoice::File(small.clone()), &missing).unwrap_err();
        assert!(e.to_string().contains("10 bytes"), "{e}");

        let e = resolve(&BiosChoice::File(dir.path().to_path_buf()), &missing).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");

        let good = dir.path().join("bios.bin");
        std::fs::write(&good, vec![0u8; 131_072]).unwrap();
        let b = resolve(&BiosChoice::File(good.clone()), &missing).unwrap();
        assert_eq!(b.path, Some(good));
    }

    #[test]
    fn qemu_is_qemus_own_even_when_ours_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("seabios.bin");
        std::fs::write(&installed, vec![0u8; 262_144]).unwrap();
        let b = resolve(&BiosChoice::Qemu, &installed).unwrap();
        assert_eq!(b.path, None);
        assert!(b.reason.contains("--bios qemu"), "{}", b.reason);
    }

    #[test]
    fn bios_option_parses_auto_qemu_and_paths() {
        assert_eq!(BiosChoice::parse("auto"), Ok(BiosChoice::Auto));
        assert_eq!(BiosChoice::parse("qemu"), Ok(BiosChoice::Qemu));
        assert_eq!(
            BiosChoice::parse("/x/bios.bin"),
            Ok(BiosChoice::File("/x/bios.bin".into()))
        );
        assert!(BiosChoice::parse("").is_err());
    }
}
