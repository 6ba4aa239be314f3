//! `/v1/disks/...`: the storage engine's operations run as jobs.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Response;

use crate::error::ApiError;
use crate::http::body::Body;
use crate::service::Service;

type Answer = Result<Response<Body>, ApiError>;

/// Resolves a disk path from a request: absolute paths as given; relative ones under
/// `base` (the data dir's `Virtual Hard Disks`), which they may not climb out of.
pub fn resolve(base: &Path, given: &str) -> Result<PathBuf, ApiError> {
    if given.is_empty() || given.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{given:?} is not a usable path (empty or with control characters)"
        )));
    }
    let p = Path::new(given);
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(ApiError::invalid(format!(
            "the path {given:?} contains `..`; give an absolute path or a plain name under the disks folder"
        )));
    }
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    })
}

pub async fn submit(svc: &Arc<Service>, op: &str, body: Incoming) -> Answer {
    crate::disk_jobs::submit(svc, op, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_under_the_disks_folder() {
        let base = Path::new("/data/Virtual Hard Disks");
        assert_eq!(resolve(base, "a.vhdx").unwrap(), base.join("a.vhdx"));
        assert_eq!(
            resolve(base, "/srv/a.vhdx").unwrap(),
            Path::new("/srv/a.vhdx")
        );
        assert!(resolve(base, "../../etc/passwd").is_err());
        assert!(resolve(base, "/srv/../etc/x.vhd").is_err());
        assert!(resolve(base, "a\nb.vhd").is_err());
    }
}
