//! `info`: what a disk file is, without opening its chain for I/O or locking it.

use std::path::{Path, PathBuf};

use crate::vhd1::{self, chain, format_guid, DiskType, Geometry, VhdImage};
use crate::vhdx::{self, image::VhdxType, VhdxImage};
use crate::{Error, Format, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct ParentInfo {
    /// The parent-name field as stored.
    pub name: String,
    /// Locator paths as stored (relative first).
    pub locators: Vec<String>,
    pub expected_unique_id: String,
    /// Where the parent was found, if it was.
    pub resolved_path: Option<PathBuf>,
    /// Why it does not resolve, if it does not.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub format: Format,
    pub disk_type: Option<DiskType>,
    /// Size of the virtual disk in bytes (the current-size field, as Hyper-V reads it).
    pub virtual_size: u64,
    /// The size readers that go by CHS geometry (QEMU 7.2 for unknown creators) see.
    pub geometry_size: Option<u64>,
    pub file_size: u64,
    pub geometry: Option<Geometry>,
    pub block_size: Option<u64>,
    pub creator: Option<String>,
    pub unique_id: Option<String>,
    pub allocated_bytes: u64,
    pub parent: Option<ParentInfo>,
    /// The chain from this file down to its base, as far as it resolves.
    pub chain: Vec<PathBuf>,
    /// VHDX: logical and physical sector sizes.
    pub logical_sector_size: Option<u32>,
    pub physical_sector_size: Option<u32>,
    /// VHDX: the DataWriteGuid that differencing children link to.
    pub data_write_guid: Option<String>,
    /// VHDX: a log that needs replay (it is replayed at the next writable open).
    pub log_needs_replay: Option<String>,
}

fn open_unlocked(path: &Path) -> Result<VhdImage> {
    VhdImage::inspect(path)
}

pub fn info(path: &Path) -> Result<DiskInfo> {
    inspect(path, true)
}

/// [`info`] of this one file: its parent is resolved and checked, but the chain
/// below it is not followed (`chain` holds only `path`). Walking a chain of N
/// layers with this costs N header reads, where `info` at every level costs N².
pub fn layer_info(path: &Path) -> Result<DiskInfo> {
    inspect(path, false)
}

fn inspect(path: &Path, deep: bool) -> Result<DiskInfo> {
    let file_size = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    match crate::detect_format(path)? {
        Format::Vhd => vhd_info(path, file_size, deep),
        Format::Vhdx => vhdx_info(path, file_size, deep),
        Format::Raw if crate::is_vhdx_name(path) => Err(VhdxImage::inspect(path)
            .err()
            .unwrap_or_else(|| not_vhd(path))),
        Format::Raw if crate::is_vhd_name(path) => {
            Err(open_unlocked(path).err().unwrap_or_else(|| not_vhd(path)))
        }
        format => Ok(DiskInfo {
            path: path.to_path_buf(),
            format,
            disk_type: None,
            virtual_size: file_size,
            geometry_size: None,
            file_size,
            geometry: None,
            block_size: None,
            creator: None,
            unique_id: None,
            allocated_bytes: file_size,
            parent: None,
            chain: vec![path.to_path_buf()],
            logical_sector_size: None,
            physical_sector_size: None,
            data_write_guid: None,
            log_needs_replay: None,
        }),
    }
}

fn not_vhd(path: &Path) -> Error {
    vhd1::Error::Invalid {
        path: path.to_path_buf(),
        what: "not a VHD".into(),
    }
    .into()
}

fn vhd_info(path: &Path, file_size: u64, deep: bool) -> Result<DiskInfo> {
    let img = open_unlocked(path)?;
    let f = img.footer();
    let mut chain_paths = vec![path.to_path_buf()];
    let parent = match img.header() {
        Some(h) if f.disk_type == DiskType::Differencing => {
            let (resolved_path, problem) = match chain::resolve_parent(&img) {
                Ok(p) => {
                    let mut problem = None;
                    match crate::parent_identity(&p) {
                        Ok(Some(id)) if id != h.parent_unique_id => {
                            problem = Some(format!(
                                "{} has unique ID {}, the child expects {}",
                                p.display(),
                                format_guid(&id),
                                format_guid(&h.parent_unique_id)
                            ))
                        }
                        Err(e) => problem = Some(e.to_string()),
                        _ => {
                            if let Some(pi) = deep.then(|| info(&p).ok()).flatten() {
                                chain_paths.extend(pi.chain);
                            }
                        }
                    }
                    (Some(p), problem)
                }
                Err(e) => (None, Some(e.to_string())),
            };
            Some(ParentInfo {
                name: h.parent_name.clone(),
                locators: chain::locator_paths(&img, h)
                    .into_iter()
                    .map(|(_, s)| s)
                    .collect(),
                expected_unique_id: format_guid(&h.parent_unique_id),
                resolved_path,
                problem,
            })
        }
        _ => None,
    };
    Ok(DiskInfo {
        path: path.to_path_buf(),
        format: Format::Vhd,
        disk_type: Some(f.disk_type),
        virtual_size: f.current_size,
        geometry_size: Some(f.qemu_size()),
        file_size,
        geometry: Some(f.geometry),
        block_size: img.block_size(),
        creator: Some(f.creator()),
        unique_id: Some(format_guid(&f.unique_id)),
        allocated_bytes: img.allocated_bytes(),
        parent,
        chain: chain_paths,
        logical_sector_size: None,
        physical_sector_size: None,
        data_write_guid: None,
        log_needs_replay: None,
    })
}

fn vhdx_info(path: &Path, file_size: u64, deep: bool) -> Result<DiskInfo> {
    let img = VhdxImage::inspect(path)?;
    let m = img.metadata();
    let mut chain_paths = vec![path.to_path_buf()];
    let parent = match &m.parent_locator {
        Some(loc) if m.has_parent => {
            let (resolved_path, problem) = match vhdx::chain::resolve_parent(&img) {
                Ok(p) => match vhdx::chain::check_linkage(&img, &p) {
                    Ok(()) => {
                        if let Some(pi) = deep.then(|| info(&p).ok()).flatten() {
                            chain_paths.extend(pi.chain);
                        }
                        (Some(p), None)
                    }
                    Err(e) => (Some(p), Some(e.to_string())),
                },
                Err(e) => (None, Some(e.to_string())),
            };
            Some(ParentInfo {
                name: loc
                    .get(vhdx::chain::RELATIVE_PATH)
                    .or(loc.get(vhdx::chain::ABSOLUTE_WIN32_PATH))
                    .unwrap_or_default()
                    .to_string(),
                locators: loc
                    .entries
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
                expected_unique_id: loc
                    .get(vhdx::chain::PARENT_LINKAGE)
                    .unwrap_or_default()
                    .to_string(),
                resolved_path,
                problem,
            })
        }
        _ => None,
    };
    let disk_type = match img.disk_type() {
        VhdxType::Fixed => DiskType::Fixed,
        VhdxType::Dynamic => DiskType::Dynamic,
        VhdxType::Differencing => DiskType::Differencing,
    };
    Ok(DiskInfo {
        path: path.to_path_buf(),
        format: Format::Vhdx,
        disk_type: Some(disk_type),
        virtual_size: m.virtual_disk_size,
        geometry_size: None,
        file_size,
        geometry: None,
        block_size: Some(u64::from(m.block_size)),
        creator: Some(img.creator().to_string()),
        unique_id: Some(m.virtual_disk_id.hyphenated().to_string()),
        allocated_bytes: img.allocated_bytes(),
        parent,
        chain: chain_paths,
        logical_sector_size: Some(m.logical_sector_size),
        physical_sector_size: Some(m.physical_sector_size),
        data_write_guid: Some(vhdx::braced(&img.header()?.data_write_guid)),
        log_needs_replay: img.log_found().map(|l| {
            format!(
                "{} log entries up to sequence {} (replayed in memory for reading)",
                l.entries, l.head_sequence
            )
        }),
    })
}
