//! The storage roots: the folders in which the API may create, read, convert,
//! attach, move, export to and delete files. Configured by the host's administrator
//! (`viridiand --storage-root`, `host.json`), never through the API, so a client
//! with the token cannot widen them. The data dir is always one.
//!
//! A path is inside a root when it starts with the root (as configured, or as its
//! real path) and resolving the rest from the root's folder never leaves it:
//! `openat2(2)` with `RESOLVE_BENEATH` refuses `..` and symlinks that point outside
//! (and `/proc` magic links). Kernels before 5.6 lack `openat2`; there the rest is
//! resolved with `realpath` and the result compared, which gives the same answer.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use api::ErrorCode;
use vhd::Format;

use crate::error::ApiError;

#[derive(Debug, Clone)]
struct Root {
    /// As the administrator wrote it (absolute).
    given: PathBuf,
    /// With every symlink resolved.
    real: PathBuf,
}

#[derive(Debug, Clone)]
pub struct StorageRoots {
    roots: Vec<Root>,
}

/// How a path relates to the roots.
#[derive(Debug)]
enum Beneath {
    /// It resolves inside a root (to this real path).
    Inside(PathBuf),
    /// It does not exist (under a root).
    Missing,
    /// It starts outside every root.
    Outside,
    /// It starts in `root` but resolves outside it.
    Escapes(PathBuf),
}

impl StorageRoots {
    /// The roots from these folders (the data dir first); each must be an absolute
    /// path of an existing folder.
    pub fn new(folders: &[PathBuf]) -> Result<StorageRoots, String> {
        let mut roots: Vec<Root> = Vec::new();
        for f in folders {
            if !f.is_absolute() {
                return Err(format!(
                    "the storage root {} is not an absolute path; give the folder's full path",
                    f.display()
                ));
            }
            if f.components().any(|c| c == Component::ParentDir) {
                return Err(format!(
                    "the storage root {} contains `..`; give the folder's own path",
                    f.display()
                ));
            }
            let real = std::fs::canonicalize(f).map_err(|e| {
                format!(
                    "the storage root {} cannot be used: {e}; create the folder first",
                    f.display()
                )
            })?;
            if !real.is_dir() {
                return Err(format!("the storage root {} is not a folder", f.display()));
            }
            if real == Path::new("/") {
                return Err(
                    "the storage root / would give the API every file of the host; name the folders that hold disks and exports"
                        .to_string(),
                );
            }
            if !roots.iter().any(|r| r.real == real) {
                roots.push(Root {
                    given: f.clone(),
                    real,
                });
            }
        }
        Ok(StorageRoots { roots })
    }

    /// The roots as configured, the data dir first.
    pub fn paths(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|r| r.given.display().to_string())
            .collect()
    }

    fn named(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.given.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn forbidden(&self, path: &Path, why: &str) -> ApiError {
        ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "{} {why}; this host's storage roots are: {} (the administrator adds more with `viridiand --storage-root PATH` or in host.json)",
                path.display(),
                self.named()
            ),
        )
    }

    /// The root `path` starts in (the longest match) and the rest of it.
    fn root_of(&self, path: &Path) -> Option<(&Root, PathBuf)> {
        self.roots
            .iter()
            .flat_map(|r| [(r, &r.given), (r, &r.real)])
            .filter_map(|(r, base)| path.strip_prefix(base).ok().map(|rest| (r, rest)))
            .max_by_key(|(_, rest)| std::cmp::Reverse(rest.as_os_str().len()))
            .map(|(r, rest)| (r, rest.to_path_buf()))
    }

    fn beneath(&self, path: &Path) -> Result<Beneath, ApiError> {
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(ApiError::invalid(format!(
                "{} is not a usable path here; give an absolute path without `..`",
                path.display()
            )));
        }
        let Some((root, rest)) = self.root_of(path) else {
            return Ok(Beneath::Outside);
        };
        match resolve_beneath(&root.real, &rest) {
            Ok(real) => Ok(Beneath::Inside(real)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Beneath::Missing),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV) | Some(libc::ELOOP)) => {
                Ok(Beneath::Escapes(root.given.clone()))
            }
            Err(e) => Err(ApiError::new(
                ErrorCode::InvalidParameter,
                format!("{} cannot be looked up: {e}", path.display()),
            )),
        }
    }

    fn refuse(&self, path: &Path, b: &Beneath) -> ApiError {
        match b {
            Beneath::Escapes(root) => self.forbidden(
                path,
                &format!(
                    "leads out of the storage root {} through a symlink",
                    root.display()
                ),
            ),
            _ => self.forbidden(path, "is outside the storage roots"),
        }
    }

    /// An existing file or folder inside a root; returns its real path.
    pub fn existing(&self, path: &Path) -> Result<PathBuf, ApiError> {
        match self.beneath(path)? {
            Beneath::Inside(real) => Ok(real),
            Beneath::Missing => Err(ApiError::not_found(format!(
                "{} does not exist",
                path.display()
            ))),
            b => Err(self.refuse(path, &b)),
        }
    }

    /// A place for a new file: its folder exists inside a root, and nothing (not even
    /// a dangling symlink) has the name yet.
    pub fn new_file(&self, path: &Path) -> Result<(), ApiError> {
        let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
            return Err(ApiError::invalid(format!(
                "{} names no file",
                path.display()
            )));
        };
        match self.beneath(dir)? {
            Beneath::Inside(_) => {}
            Beneath::Missing => {
                return Err(ApiError::invalid(format!(
                    "the folder {} does not exist; create it first",
                    dir.display()
                )))
            }
            b => return Err(self.refuse(path, &b)),
        }
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{} already exists; choose another name or delete it first",
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    /// A folder that exists or will be made: its deepest existing ancestor is inside
    /// a root.
    pub fn folder(&self, path: &Path) -> Result<(), ApiError> {
        let mut probe = path;
        loop {
            match self.beneath(probe)? {
                Beneath::Inside(_) => return Ok(()),
                Beneath::Missing => match probe.parent() {
                    Some(up) => probe = up,
                    None => return Err(self.forbidden(path, "is outside the storage roots")),
                },
                b => return Err(self.refuse(path, &b)),
            }
        }
    }

    /// A virtual hard disk to read: inside a root, a regular file with a VHD or VHDX
    /// signature (a raw image only when `raw_allowed`), and every file of its
    /// differencing chain inside the roots too.
    pub fn disk(&self, path: &Path, raw_allowed: bool) -> Result<(), ApiError> {
        let real = self.existing(path)?;
        if !real.is_file() {
            return Err(ApiError::invalid(format!(
                "{} is not a regular file; a virtual hard disk is a .vhd or .vhdx file",
                path.display()
            )));
        }
        let format = vhd::detect_format(&real)
            .map_err(|e| ApiError::invalid(format!("{} cannot be read: {e}", path.display())))?;
        if format == Format::Raw {
            if raw_allowed {
                return Ok(());
            }
            return Err(ApiError::invalid(format!(
                "{} is not a virtual hard disk: it carries neither a VHD nor a VHDX signature",
                path.display()
            )));
        }
        // A chain that cannot be followed fails where it is used, with its reason.
        if let Ok(info) = vhd::ops::info::info(&real) {
            for ancestor in info.chain.iter().skip(1) {
                // Parent locators may be relative (`../base.vhd`): the real path counts.
                let Ok(ancestor) = std::fs::canonicalize(ancestor) else {
                    continue;
                };
                let ancestor = &ancestor;
                match self.beneath(ancestor)? {
                    Beneath::Inside(_) | Beneath::Missing => {}
                    b => {
                        let err = self.refuse(ancestor, &b);
                        return Err(ApiError::new(
                            ErrorCode::Forbidden,
                            format!("the parent disk of {}: {}", path.display(), err.message),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A file's checks as media of a VM's drive: hard disks as [`Self::disk`], ISO
    /// images and other files inside a root.
    pub fn media(&self, media: &vm_config::DriveMedia) -> Result<(), ApiError> {
        use vm_config::DriveMedia;
        match media {
            DriveMedia::HardDisk { path } => self.disk(Path::new(path), false),
            DriveMedia::Dvd { iso: Some(iso) } => self.existing(Path::new(iso)).map(|_| ()),
            // Block devices are the host's own; attaching one is an administrator's
            // choice that paths in folders do not constrain.
            DriveMedia::PassThrough { .. } | DriveMedia::Dvd { iso: None } => Ok(()),
        }
    }
}

/// Resolves `rest` from the folder `root` without leaving it; returns the real path.
fn resolve_beneath(root: &Path, rest: &Path) -> io::Result<PathBuf> {
    let rest = if rest.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rest
    };
    let dir = open_path(root)?;
    let c_rest = CString::new(rest.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers, for which all zeroes is a valid value
    // (and the kernel wants unused fields zero).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads `how` (a valid open_how of the size passed) and the
    // NUL-terminated path; the descriptor it returns is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_rest.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return resolve_by_realpath(root, rest);
        }
        return Err(e);
    }
    // SAFETY: `fd` is a descriptor openat2 just returned; nothing else owns it.
    let file = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The same answer as `openat2` with `RESOLVE_BENEATH`, for older kernels.
fn resolve_by_realpath(root: &Path, rest: &Path) -> io::Result<PathBuf> {
    let real = std::fs::canonicalize(root.join(rest))?;
    if real.starts_with(root) {
        Ok(real)
    } else {
        Err(io::Error::from_raw_os_error(libc::EXDEV))
    }
}

fn open_path(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open(2) on a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn setup() -> (tempfile::TempDir, StorageRoots, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let roots = StorageRoots::new(std::slice::from_ref(&root)).unwrap();
        (t, roots, root, outside)
    }

    #[test]
    fn files_inside_a_root_pass_and_outside_are_forbidden_with_the_roots_named() {
        let (_t, roots, root, outside) = setup();
        std::fs::write(root.join("sub/a.txt"), "x").unwrap();
        std::fs::write(outside.join("b.txt"), "x").unwrap();
        assert!(roots.existing(&root.join("sub/a.txt")).is_ok());
        let e = roots.existing(&outside.join("b.txt")).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(
            e.message.contains(&root.display().to_string()),
            "{}",
            e.message
        );
        assert_eq!(
            roots.existing(&root.join("nope")).unwrap_err().code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn symlinks_may_not_lead_out_of_a_root() {
        let (_t, roots, root, outside) = setup();
        std::fs::write(outside.join("secret"), "x").unwrap();
        symlink(outside.join("secret"), root.join("evil.vhd")).unwrap();
        symlink(&outside, root.join("dir")).unwrap();
        symlink("sub", root.join("fine")).unwrap();
        for p in [root.join("evil.vhd"), root.join("dir/secret")] {
            let e = roots.existing(&p).unwrap_err();
            assert_eq!(e.code, ErrorCode::Forbidden, "{}", p.display());
            assert!(e.message.contains("through a symlink"), "{}", e.message);
        }
        assert_eq!(
            roots.new_file(&root.join("dir/new.vhd")).unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            roots.existing(&root.join("fine")).unwrap(),
            std::fs::canonicalize(root.join("sub")).unwrap()
        );
        assert!(roots.new_file(&root.join("fine/new.vhd")).is_ok());
    }

    #[test]
    fn parent_dirs_and_relative_roots_are_refused() {
        let (_t, roots, root, _) = setup();
        assert_eq!(
            roots.existing(&root.join("sub/../../x")).unwrap_err().code,
            ErrorCode::InvalidParameter
        );
        assert!(StorageRoots::new(&[PathBuf::from("rel")]).is_err());
        assert!(StorageRoots::new(&[PathBuf::from("/")]).is_err());
    }

    #[test]
    fn a_new_folder_counts_by_its_deepest_existing_ancestor() {
        let (_t, roots, root, outside) = setup();
        assert!(roots.folder(&root.join("x/y/z")).is_ok());
        assert_eq!(
            roots.folder(&outside.join("x")).unwrap_err().code,
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn a_disk_needs_its_signature_unless_raw_is_asked_for() {
        let (_t, roots, root, _) = setup();
        let text = root.join("notes.vhd");
        std::fs::write(&text, vec![b'a'; 4096]).unwrap();
        let e = roots.disk(&text, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter);
        assert!(e.message.contains("signature"), "{}", e.message);
        assert!(roots.disk(&text, true).is_ok());
        let real = root.join("real.vhdx");
        vhd::create_dynamic(&real, 1 << 20, None).unwrap();
        assert!(roots.disk(&real, false).is_ok());
    }

    #[test]
    fn a_chain_whose_parent_is_outside_is_forbidden() {
        let (_t, roots, root, outside) = setup();
        let base = outside.join("base.vhd");
        vhd::create_dynamic(&base, 1 << 20, None).unwrap();
        let child = root.join("child.vhd");
        vhd::create_child(&child, &base).unwrap();
        let e = roots.disk(&child, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("parent"), "{}", e.message);
    }
}
