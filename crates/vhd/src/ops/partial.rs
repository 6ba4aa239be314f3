//! The temporary names new disk files are built under, beside their final name,
//! and how to recognise the ones an interrupted operation left behind.
//!
//! A file being made (create, convert) or remade (compact, resize) is written as
//! `.NAME.TAG.partial` in the destination's folder, flushed, then renamed (or
//! linked) to `NAME`, and the folder synced: a crash leaves either no `NAME`
//! (or the old one) or the complete new one, plus at most the hidden partial
//! file, which is never part of any chain and is safe to delete. `TAG` is a job
//! ID for the service, random for the offline CLI. Older names this engine used
//! for the same purpose (`.NAME.XXXXXXXX.creating`, `.NAME.compacting`) are
//! recognised too.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The temporary name for `path` with `tag`: `.NAME.TAG.partial` in the same folder.
pub fn partial_path(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}.partial"))
}

/// [`partial_path`] with a random 8-digit tag, for callers without a job ID.
pub fn random_partial_path(path: &Path) -> PathBuf {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    partial_path(path, &tag[..8])
}

/// Whether a file name is one of the temporary names above: the engine's own
/// pattern, hidden, with a tag of hex digits and dashes.
pub fn is_partial_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    if let Some(base) = rest.strip_suffix(".compacting") {
        return !base.is_empty();
    }
    let Some((stem, suffix)) = rest.rsplit_once('.') else {
        return false;
    };
    if suffix != "partial" && suffix != "creating" {
        return false;
    }
    let Some((base, tag)) = stem.rsplit_once('.') else {
        return false;
    };
    !base.is_empty() && tag.len() >= 8 && tag.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Whether `candidate` is a temporary name of `path` (the same folder and
/// `NAME`), any tag.
pub fn is_partial_of(candidate: &Path, path: &Path) -> bool {
    let (Some(c), Some(name)) = (candidate.file_name(), path.file_name()) else {
        return false;
    };
    if candidate.parent() != path.parent() || !is_partial_name(c) {
        return false;
    }
    let prefix = format!(".{}.", name.to_string_lossy());
    c.to_string_lossy().starts_with(&prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_are_recognised_and_ordinary_names_are_not() {
        let p = partial_path(
            Path::new("/d/disk.vhdx"),
            "0f1e2d3c-aaaa-bbbb-cccc-000011112222",
        );
        assert_eq!(
            p,
            Path::new("/d/.disk.vhdx.0f1e2d3c-aaaa-bbbb-cccc-000011112222.partial")
        );
        assert!(is_partial_name(p.file_name().unwrap()));
        assert!(is_partial_of(&p, Path::new("/d/disk.vhdx")));
        assert!(!is_partial_of(&p, Path::new("/d/disk.vhd")));
        assert!(!is_partial_of(&p, Path::new("/e/disk.vhdx")));
        let r = random_partial_path(Path::new("/d/a b.vhd"));
        assert!(is_partial_of(&r, Path::new("/d/a b.vhd")));
        for ok in [
            ".x.vhd.0123abcd.creating",
            ".x.vhd.compacting",
            ".x.0123abcd.partial",
        ] {
            assert!(is_partial_name(OsStr::new(ok)), "{ok}");
        }
        for no in [
            "x.vhd",
            ".x.vhd",
            "x.vhd.0123abcd.partial",
            ".x.vhd.nothex!!.partial",
            ".x.vhd.abc.partial",
            "..0123abcd.partial",
            ".compacting",
            ".x.vhd.0123abcd.part",
        ] {
            assert!(!is_partial_name(OsStr::new(no)), "{no}");
        }
    }
}
