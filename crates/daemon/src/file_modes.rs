//! The modes of the files and folders the service makes: 0600 and 0700 by default
//! (disks, exports, `vm.json`, checkpoint state hold guest data), 0640 and 0750 with
//! `--file-group`, whose group the data dir and storage roots get (set-group-ID, so
//! what is made inside inherits it). Set once at start through the umask, which
//! workers and QEMU inherit too.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::DaemonConfig;

/// The umask for `group`: none → 077, a group → 027.
pub fn umask_for(group: Option<u32>) -> libc::mode_t {
    if group.is_some() {
        0o027
    } else {
        0o077
    }
}

/// Sets the umask and the data dir's mode (and with a group, the group of the data
/// dir and the storage roots given on the command line).
pub fn apply(config: &DaemonConfig) -> Result<(), String> {
    let gid = config.file_group.as_deref().map(group_id).transpose()?;
    // SAFETY: umask(2) only changes this process's file-creation mask.
    unsafe { libc::umask(umask_for(gid)) };
    let dir_mode = if gid.is_some() { 0o2750 } else { 0o700 };
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(dir_mode)).map_err(
        |e| {
            format!(
                "cannot set the mode of the data directory {}: {e}",
                config.data_dir.display()
            )
        },
    )?;
    if let Some(gid) = gid {
        for dir in std::iter::once(&config.data_dir).chain(&config.storage_roots) {
            share_with_group(dir, gid)?;
        }
    }
    Ok(())
}

fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = CString::new(name).map_err(|_| format!("{name:?} is not a group name"))?;
    // SAFETY: getgrnam reads the NUL-terminated name; the record it returns is only
    // read here, before any other call that could reuse its storage.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(format!(
            "the group {name:?} given to --file-group does not exist on this host"
        ));
    }
    // SAFETY: `gr` is a non-null record from getgrnam, read at once.
    Ok(unsafe { (*gr).gr_gid })
}

fn share_with_group(dir: &Path, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(dir, None, Some(gid))
        .map_err(|e| format!("cannot give {} to group {gid}: {e}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .permissions()
        .mode();
    std::fs::set_permissions(
        dir,
        std::fs::Permissions::from_mode((mode & 0o7777) | 0o2050),
    )
    .map_err(|e| format!("cannot set the mode of {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_opens_group_read_and_nothing_for_others() {
        assert_eq!(umask_for(None), 0o077);
        assert_eq!(umask_for(Some(100)), 0o027);
    }

    #[test]
    fn unknown_groups_are_named_in_the_error() {
        let e = group_id("no-such-group-viridian").unwrap_err();
        assert!(e.contains("no-such-group-viridian"), "{e}");
        assert_eq!(group_id("0").unwrap(), 0);
    }
}
