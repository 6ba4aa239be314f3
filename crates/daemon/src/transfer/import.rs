//! Import as blocking file work: `inspect` reads an export folder and reports
//! every problem at once without changing anything; `carry_out` brings a clean
//! one in (copying first, or registering the files where they are).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use api::transfer::{ImportMode, ImportProblem, ImportReport, ImportRequest, ImportSwitch};
use uuid::Uuid;
use vm_config::{validate, DriveMedia, HostLimits, VmSettings};

use super::package::{self, FileRole, Manifest};
use crate::checkpoints::ops::SAVED_STATE_FILE;
use crate::checkpoints::tree::{self, Tree, SETTINGS_FILE};
use crate::error::ApiError;
use crate::switches::SwitchSettings;
use crate::vms::store::{error_chain, SETTINGS_FILE as VM_FILE};

/// A VM the import must not collide with.
pub struct Existing {
    pub settings: VmSettings,
    /// Every disk file its drives and checkpoint tree use (canonical paths).
    pub disks: Vec<PathBuf>,
}

/// An export that passed every check, ready to be brought in.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The export folder.
    pub folder: PathBuf,
    pub manifest: Manifest,
    /// The VM's settings as they will be (id, name, adapters), paths export-relative.
    pub settings: VmSettings,
    pub tree: Option<Tree>,
    /// Checkpoint settings by checkpoint id, paths export-relative.
    pub node_settings: Vec<(Uuid, VmSettings)>,
    pub mode: ImportMode,
    /// Where the disks end up: the export folder (register) or the copy's folder.
    /// `None` with copy means the VM's own folder in the data directory.
    pub destination: Option<PathBuf>,
}

struct Problems(Vec<ImportProblem>);

impl Problems {
    fn add(&mut self, kind: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.0.push(ImportProblem {
            kind: kind.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }
}

/// Finds the export folder: `source` itself when it holds the manifest, or its
/// only sub-folder that does.
fn locate(source: &Path) -> Result<PathBuf, String> {
    if source.join(package::MANIFEST_FILE).exists() {
        return Ok(source.to_path_buf());
    }
    let found: Vec<PathBuf> = std::fs::read_dir(source)
        .map_err(|e| format!("cannot read {}: {e}", source.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(package::MANIFEST_FILE).exists())
        .collect();
    match found.len() {
        1 => Ok(found.into_iter().next().unwrap_or_default()),
        0 => Err(format!(
            "{} holds no {} (neither in itself nor in a sub-folder): it is not a Viridian export, or the export did not finish",
            source.display(),
            package::MANIFEST_FILE
        )),
        n => Err(format!(
            "{} holds {n} exports; name the one to import (one of its sub-folders)",
            source.display()
        )),
    }
}

fn relative_disks(s: &VmSettings) -> Vec<String> {
    s.drives
        .iter()
        .filter_map(|d| match &d.media {
            DriveMedia::HardDisk { path } => Some(path.clone()),
            _ => None,
        })
        .collect()
}

/// `s` with its export-relative disk paths resolved under `root`.
pub fn resolved(s: &VmSettings, root: &Path) -> VmSettings {
    let mut s = s.clone();
    for d in &mut s.drives {
        if let DriveMedia::HardDisk { path } = &mut d.media {
            if let Some(p) = package::inside(root, path) {
                *path = p.to_string_lossy().into_owned();
            }
        }
    }
    s
}

/// Reads the export at `req.source` and checks everything an import needs,
/// changing nothing. Returns the report, and the plan when there is no problem.
pub fn inspect(
    req: &ImportRequest,
    data_dir: &Path,
    existing: &[Existing],
    limits: &HostLimits,
    switches: &[SwitchSettings],
) -> (ImportReport, Option<Plan>) {
    let mut p = Problems(Vec::new());
    let mut report = ImportReport {
        source: req.source.clone(),
        vm_id: None,
        vm_name: None,
        state: None,
        checkpoints: 0,
        disks: vec![],
        bytes: 0,
        switches: vec![],
        problems: vec![],
    };
    let plan = inspect_into(
        req,
        data_dir,
        existing,
        limits,
        switches,
        &mut p,
        &mut report,
    );
    report.problems = p.0;
    let plan = plan.filter(|_| report.problems.is_empty());
    (report, plan)
}

fn inspect_into(
    req: &ImportRequest,
    data_dir: &Path,
    existing: &[Existing],
    limits: &HostLimits,
    switches: &[SwitchSettings],
    p: &mut Problems,
    report: &mut ImportReport,
) -> Option<Plan> {
    let source = Path::new(&req.source);
    if !source.is_absolute() {
        p.add(
            "UnreadableExport",
            format!("the source {:?} is not an absolute path", req.source),
            "give the full path of the export folder",
        );
        return None;
    }
    let folder = match locate(source) {
        Ok(f) => f,
        Err(message) => {
            p.add(
                "UnreadableExport",
                message,
                "give the folder that holds export.json",
            );
            return None;
        }
    };
    let folder = std::fs::canonicalize(&folder).unwrap_or(folder);
    report.source = folder.to_string_lossy().into_owned();
    let manifest = match package::read_manifest(&folder) {
        Ok(m) => m,
        Err(e @ package::ManifestError::TooNew { .. }) => {
            p.add(
                "SchemaTooNew",
                error_chain(&e),
                "import it with the Viridian version that exported it, or a newer one",
            );
            return None;
        }
        Err(e) => {
            p.add("UnreadableExport", error_chain(&e), "export the VM again");
            return None;
        }
    };
    report.vm_id = Some(manifest.vm_id);
    report.vm_name = Some(manifest.vm_name.clone());
    report.state = Some(if manifest.saved { "Saved" } else { "Off" }.into());

    // Every listed file is there, whole.
    for f in &manifest.files {
        let Some(path) = package::inside(&folder, &f.path) else {
            p.add(
                "UnreadableExport",
                format!(
                    "the manifest names {:?}, a path outside the export folder",
                    f.path
                ),
                "export the VM again; do not edit export.json",
            );
            continue;
        };
        match std::fs::metadata(&path) {
            Err(_) => p.add(
                "MissingFile",
                format!("{} is missing", path.display()),
                "copy the whole export folder again",
            ),
            // A registered export's disks grow as the VM uses them: only a file
            // shorter than written is cut short.
            Ok(m) if m.len() < f.bytes => p.add(
                "TruncatedFile",
                format!(
                    "{} has {} bytes; the export wrote {}",
                    path.display(),
                    m.len(),
                    f.bytes
                ),
                "copy the whole export folder again (the copy was cut short)",
            ),
            Ok(_) => {}
        }
        if f.role == FileRole::Disk {
            report.disks.push(f.path.clone());
        }
        report.bytes += f.bytes;
    }

    let settings_path = folder.join(VM_FILE);
    let settings = match vm_config::file::load(&settings_path) {
        Ok(s) => Some(s),
        Err(e @ vm_config::file::FileError::TooNew { .. }) => {
            p.add(
                "SchemaTooNew",
                error_chain(&e),
                "import it with a newer Viridian",
            );
            None
        }
        Err(e) => {
            p.add("UnreadableSettings", error_chain(&e), "export the VM again");
            None
        }
    };
    let tree = if tree::tree_path(&folder).exists() {
        match tree::load(&folder) {
            Ok(t) => Some(t),
            Err(e) => {
                p.add(
                    if matches!(e, tree::TreeError::TooNew { .. }) {
                        "SchemaTooNew"
                    } else {
                        "UnreadableSettings"
                    },
                    error_chain(&e),
                    "export the VM again",
                );
                None
            }
        }
    } else {
        None
    };
    report.checkpoints = tree.as_ref().map_or(0, |t| t.visible().count());

    // Every disk a state refers to is in the export, and every chain is whole.
    let mut referenced: Vec<String> = settings.as_ref().map(relative_disks).unwrap_or_default();
    let mut node_settings = Vec::new();
    if let Some(t) = &tree {
        for n in &t.nodes {
            referenced.extend(
                n.disks
                    .iter()
                    .map(|d| d.path.to_string_lossy().into_owned()),
            );
            if n.deleted {
                continue;
            }
            let sp = folder
                .join(tree::SNAPSHOTS_FOLDER)
                .join(n.id.to_string())
                .join(SETTINGS_FILE);
            match vm_config::file::load(&sp) {
                Ok(s) => {
                    referenced.extend(relative_disks(&s));
                    node_settings.push((n.id, s));
                }
                Err(e) => p.add(
                    "UnreadableSettings",
                    format!("checkpoint {:?}: {}", n.name, error_chain(&e)),
                    "export the VM again",
                ),
            }
            if n.memory_state {
                let state = folder
                    .join(tree::SNAPSHOTS_FOLDER)
                    .join(n.id.to_string())
                    .join(SAVED_STATE_FILE);
                if !state.exists() {
                    p.add(
                        "MissingFile",
                        format!(
                            "the saved state of checkpoint {:?} ({}) is missing",
                            n.name,
                            state.display()
                        ),
                        "copy the whole export folder again",
                    );
                }
            }
        }
        referenced.extend(
            t.current_disks
                .iter()
                .map(|d| d.path.to_string_lossy().into_owned()),
        );
    }
    if manifest.saved && !folder.join(SAVED_STATE_FILE).exists() {
        p.add(
            "MissingFile",
            format!(
                "the VM's saved state {} is missing",
                folder.join(SAVED_STATE_FILE).display()
            ),
            "copy the whole export folder again",
        );
    }
    referenced.sort();
    referenced.dedup();
    let mut whole = HashSet::new();
    for rel in &referenced {
        let Some(path) = package::inside(&folder, rel) else {
            p.add(
                "UnreadableSettings",
                format!(
                    "the settings name the disk {rel:?}, which is not inside the export folder"
                ),
                "export the VM again",
            );
            continue;
        };
        if !path.exists() {
            if !manifest.files.iter().any(|f| &f.path == rel) {
                p.add(
                    "MissingFile",
                    format!("the disk {} is missing", path.display()),
                    "copy the whole export folder again",
                );
            }
            continue;
        }
        check_chain(&folder, &path, p, &mut whole);
    }

    let settings = settings?;
    let (found, on_host) = resolve_switches(
        &manifest,
        &settings,
        &node_settings,
        tree.as_ref(),
        &req.switch_mapping,
        switches,
        p,
    );
    report.switches = found;
    // The VM as it will be.
    let mut new = settings.clone();
    for a in &mut new.network_adapters {
        reconnect(a, &on_host);
    }
    if req.new_id {
        new.id = Uuid::new_v4();
        // Stand-ins until the import runs: `pool_macs` gives them the pool's.
        let _ = vm_config::devices::renew_adapters(&mut new, || {
            Ok::<_, std::convert::Infallible>(vm_config::random_mac())
        });
    }
    if let Some(name) = &req.name {
        new.name = name.clone();
    }
    report.vm_id = Some(new.id);
    report.vm_name = Some(new.name.clone());

    let destination = match req.mode {
        ImportMode::Register => Some(folder.clone()),
        ImportMode::Copy => req
            .destination
            .as_ref()
            .map(|d| Path::new(d).join(&new.name)),
    };
    let check_root = destination
        .clone()
        .unwrap_or_else(|| data_dir.join("vms").join(new.id.to_string()));
    let as_placed = resolved(&new, &check_root);
    if let Err(e) = validate::validate(&as_placed, limits)
        .and_then(|()| validate::validate_new_name(&as_placed.name))
    {
        p.add(
            "InvalidSettings",
            e.to_string(),
            "import with --name, or change the setting on the exporting host and export again",
        );
    }
    if let Some(other) = existing.iter().find(|o| o.settings.id == new.id) {
        p.add(
            "IdInUse",
            format!("VM {} on this host already has the id {}", other.settings.name, new.id),
            "import with --new-id (the copy gets new ids and MAC addresses), or delete the other VM",
        );
    }
    if let Some(other) = existing.iter().find(|o| o.settings.name == new.name) {
        p.add(
            "NameInUse",
            format!(
                "a VM named {:?} already exists ({})",
                new.name, other.settings.id
            ),
            "import with --name NEW-NAME",
        );
    }
    if let Err(e) = validate::check_against_others(&as_placed, existing.iter().map(|o| &o.settings))
    {
        let kind = match e {
            vm_config::ConfigError::MacInUse { .. } => "MacInUse",
            _ => "DiskInUse",
        };
        p.add(
            kind,
            e.to_string(),
            if kind == "MacInUse" {
                "import with --new-id, which gives the adapters new MAC addresses"
            } else {
                "import with --copy, or detach the disk from the other VM"
            },
        );
    }
    if req.mode == ImportMode::Register {
        for f in manifest.files.iter().filter(|f| f.role == FileRole::Disk) {
            let Some(path) = package::inside(&folder, &f.path) else {
                continue;
            };
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            if let Some(other) = existing.iter().find(|o| o.disks.contains(&path)) {
                p.add(
                    "DiskInUse",
                    format!("{} is already a disk (or a checkpoint layer) of VM {}: this export was registered before", path.display(), other.settings.name),
                    "import with --copy to get a VM of its own files, or delete the other VM",
                );
            }
        }
    }
    for d in &new.drives {
        if let DriveMedia::Dvd { iso: Some(iso) } = &d.media {
            if !Path::new(iso).exists() {
                p.add(
                    "MissingFile",
                    format!(
                        "the ISO image {iso} in the DVD drive at {} is not on this host",
                        d.slot
                    ),
                    "copy the ISO to the same path, or empty the drive after the import",
                );
            }
        }
    }
    match (&req.mode, &destination) {
        (ImportMode::Copy, dest) => {
            let target = dest.clone().unwrap_or_else(|| check_root.clone());
            check_destination(&target, &folder, report.bytes, p);
        }
        (ImportMode::Register, _) => {
            if let Err(e) = tempfile_probe(&folder) {
                p.add("Destination", format!("the export folder {} is not writable ({e}); registering rewrites its disks' parent links", folder.display()), "import with --copy instead");
            }
        }
    }
    if req.mode == ImportMode::Register && req.destination.is_some() {
        p.add(
            "Destination",
            "a destination applies to --copy only",
            "leave out the destination, or import with --copy",
        );
    }

    let rename_adapters: HashMap<String, (String, Option<Uuid>)> = settings
        .network_adapters
        .iter()
        .zip(&new.network_adapters)
        .map(|(a, b)| (a.mac.to_ascii_lowercase(), (b.mac.clone(), b.id)))
        .collect();
    let node_settings = node_settings
        .into_iter()
        .map(|(id, mut s)| {
            s.id = new.id;
            s.name = new.name.clone();
            for a in &mut s.network_adapters {
                reconnect(a, &on_host);
                if let Some((mac, aid)) = rename_adapters.get(&a.mac.to_ascii_lowercase()) {
                    a.mac = mac.clone();
                    a.id = *aid;
                } else if req.new_id {
                    a.id = Some(Uuid::new_v4());
                    a.mac = vm_config::random_mac();
                }
            }
            (id, s)
        })
        .collect();
    Some(Plan {
        folder,
        manifest,
        settings: new,
        tree,
        node_settings,
        mode: req.mode,
        destination: match req.mode {
            ImportMode::Register => Some(check_root),
            ImportMode::Copy => destination,
        },
    })
}

/// Puts adapter `a` on the switch of this host its exported switch resolved to.
fn reconnect(a: &mut vm_config::NetworkAdapter, on_host: &HashMap<String, Option<String>>) {
    if let Some(key) = &a.switch {
        if let Some(new) = on_host.get(key) {
            a.switch = new.clone();
        }
    }
}

/// Where the adapters of each exported switch go on this host: the switch of a
/// `switch_mapping` (or none), else the switch with the same id, else the one
/// with the same name (Hyper-V matches by name). Returns the report's lines and,
/// by what the settings record, the switch id to record instead (`None`:
/// disconnected); a switch found nowhere is a `MissingSwitch` problem, a bad
/// mapping its own.
fn resolve_switches(
    manifest: &Manifest,
    settings: &VmSettings,
    node_settings: &[(Uuid, VmSettings)],
    tree: Option<&Tree>,
    mapping: &std::collections::BTreeMap<String, String>,
    host: &[SwitchSettings],
    p: &mut Problems,
) -> (Vec<ImportSwitch>, HashMap<String, Option<String>>) {
    // Each recorded switch with the adapters on it, the VM's first.
    let mut used: Vec<(String, Vec<String>)> = Vec::new();
    let mut note = |key: &str, adapter: String, plain: &str| {
        let i = match used.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                used.push((key.to_string(), Vec::new()));
                used.len() - 1
            }
        };
        let list = &mut used[i].1;
        if !list.iter().any(|a| a == &adapter || a == plain) {
            list.push(adapter);
        }
    };
    for a in &settings.network_adapters {
        if let Some(key) = &a.switch {
            note(key, a.mac.clone(), &a.mac);
        }
    }
    for (id, s) in node_settings {
        let name = tree
            .and_then(|t| t.node(*id))
            .map_or_else(|| id.to_string(), |n| n.name.clone());
        for a in &s.network_adapters {
            if let Some(key) = &a.switch {
                note(key, format!("{} in checkpoint {name:?}", a.mac), &a.mac);
            }
        }
    }
    let exported: Vec<package::ExportedSwitch> = used
        .iter()
        .map(|(key, _)| {
            manifest
                .switches
                .iter()
                .find(|e| &e.key == key)
                .cloned()
                .unwrap_or_else(|| package::ExportedSwitch::from_key(key))
        })
        .collect();
    let on_host = |key: &str| -> Option<&SwitchSettings> {
        Uuid::parse_str(key)
            .ok()
            .and_then(|id| host.iter().find(|s| s.id == id))
            .or_else(|| host.iter().find(|s| s.name == key))
    };
    for (old, new) in mapping {
        if !exported.iter().any(|e| e.answers_to(old)) {
            let names: Vec<&str> = exported.iter().map(|e| e.label()).collect();
            p.add(
                "UnusedSwitchMapping",
                format!(
                    "the switch mapping {old}={new} names the exported switch {old:?}, which no network adapter of the export is on ({})",
                    if names.is_empty() {
                        "none is on a switch".to_string()
                    } else {
                        format!("they are on {}", names.join(", "))
                    }
                ),
                "leave that mapping out, or give the switch's name as the report lists it under switches",
            );
        } else if new != "none" && on_host(new).is_none() {
            p.add(
                "UnknownSwitch",
                format!(
                    "the switch mapping {old}={new} names the switch {new:?}, which this host does not have"
                ),
                format!(
                    "map {old} to a switch `viridian switch list` shows (or to none, to import it disconnected), or create a switch named {new} first"
                ),
            );
        }
    }
    for e in &exported {
        let given: Vec<(&String, &String)> = mapping
            .iter()
            .filter(|(old, _)| e.answers_to(old))
            .collect();
        if given.windows(2).any(|w| w[0].1 != w[1].1) {
            let list: Vec<String> = given.iter().map(|(o, n)| format!("{o}={n}")).collect();
            p.add(
                "ConflictingSwitchMapping",
                format!(
                    "the switch mappings {} all name the exported switch {:?} and disagree",
                    list.join(", "),
                    e.label()
                ),
                "map each exported switch once",
            );
        }
    }
    let mut lines = Vec::new();
    let mut out = HashMap::new();
    for (e, (key, adapters)) in exported.iter().zip(used) {
        let mapped = mapping.iter().find(|(old, _)| e.answers_to(old));
        let (target, how) = match mapped {
            Some((_, new)) if new == "none" => (None, "mapping"),
            Some((_, new)) => (on_host(new), "mapping"),
            None => match e.id.and_then(|id| host.iter().find(|s| s.id == id)) {
                Some(s) => (Some(s), "id"),
                None => match e
                    .name
                    .as_deref()
                    .and_then(|n| host.iter().find(|s| s.name == n))
                {
                    Some(s) => (Some(s), "name"),
                    None => (None, "missing"),
                },
            },
        };
        if how == "missing" {
            let which = if adapters.len() == 1 {
                format!("network adapter {}", adapters[0])
            } else {
                format!("network adapters {}", adapters.join(", "))
            };
            let is_are = if adapters.len() == 1 { "is" } else { "are" };
            let label = e.label();
            match &e.name {
                Some(name) => p.add(
                    "MissingSwitch",
                    format!(
                        "the virtual switch {name:?}{} that {which} {is_are} on is not on this host",
                        e.id.map_or(String::new(), |id| format!(" ({id})"))
                    ),
                    format!(
                        "map it with --switch {name}=NEW (or --switch {name}=none to import it disconnected), or create a switch named {name}"
                    ),
                ),
                None => p.add(
                    "MissingSwitch",
                    format!(
                        "the virtual switch with the id {label} that {which} {is_are} on is not on this host (the export, from an older Viridian, does not record its name)"
                    ),
                    format!(
                        "map it with --switch {label}=NEW (or --switch {label}=none to import it disconnected)"
                    ),
                ),
            }
        }
        out.insert(key, target.map(|s| s.id.to_string()));
        lines.push(ImportSwitch {
            exported: e.label().to_string(),
            exported_id: e.id,
            switch: target.map(|s| s.id),
            switch_name: target.map(|s| s.name.clone()),
            matched_by: how.into(),
            adapters,
        });
    }
    (lines, out)
}

/// A disk of the export opens, and its parents are in the export and fit.
fn check_chain(folder: &Path, path: &Path, p: &mut Problems, whole: &mut HashSet<PathBuf>) {
    let mut cur = path.to_path_buf();
    let mut walked = Vec::new();
    for _ in 0..256 {
        if whole.contains(&cur) {
            whole.extend(walked);
            return;
        }
        walked.push(cur.clone());
        let info = match vhd::ops::info::layer_info(&cur) {
            Ok(i) => i,
            Err(e) => {
                p.add(
                    "BrokenChain",
                    format!(
                        "{} cannot be read as a disk: {}",
                        cur.display(),
                        error_chain(&e)
                    ),
                    "copy the whole export folder again, or export the VM again",
                );
                return;
            }
        };
        let Some(parent) = info.parent else {
            // A base: everything walked down to it is whole.
            whole.extend(walked);
            return;
        };
        let resolved = parent
            .resolved_path
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        match (resolved, parent.problem) {
            (Some(next), None) if next.starts_with(folder) => cur = next,
            (Some(next), None) => {
                p.add(
                    "BrokenChain",
                    format!(
                        "{}'s parent resolves to {}, outside the export folder",
                        cur.display(),
                        next.display()
                    ),
                    format!(
                        "put the parent {} into the export folder next to its child",
                        parent.name
                    ),
                );
                return;
            }
            (_, problem) => {
                p.add(
                    "BrokenChain",
                    format!(
                        "{}'s parent {} does not fit: {}",
                        cur.display(),
                        parent.name,
                        problem.unwrap_or_else(|| "not found".into())
                    ),
                    "copy the whole export folder again, or export the VM again",
                );
                return;
            }
        }
    }
    p.add(
        "BrokenChain",
        format!("{}'s chain of parents loops", path.display()),
        "export the VM again",
    );
}

fn check_destination(target: &Path, folder: &Path, bytes: u64, p: &mut Problems) {
    if !target.is_absolute() {
        p.add(
            "Destination",
            format!(
                "the destination {} is not an absolute path",
                target.display()
            ),
            "give the full path",
        );
        return;
    }
    if target.starts_with(folder) {
        p.add(
            "Destination",
            format!(
                "the destination {} is inside the export folder",
                target.display()
            ),
            "copy to a folder outside the export",
        );
    }
    if target.exists()
        && std::fs::read_dir(target)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        p.add(
            "Destination",
            format!("{} already exists and is not empty", target.display()),
            "choose another destination, or remove that folder",
        );
        return;
    }
    let Some(existing) = target.ancestors().find(|a| a.exists()) else {
        return;
    };
    match free_bytes(existing) {
        Ok(free) if free < bytes => p.add(
            "Destination",
            format!(
                "{} has {} MiB free; the copy needs {} MiB",
                existing.display(),
                free >> 20,
                bytes.div_ceil(1 << 20)
            ),
            "free space there, or copy elsewhere, or import with --register",
        ),
        Ok(_) => {}
        Err(e) => p.add(
            "Destination",
            format!("cannot tell the free space of {}: {e}", existing.display()),
            "check the destination exists and is readable",
        ),
    }
    if let Err(e) = tempfile_probe(existing) {
        p.add(
            "Destination",
            format!("{} is not writable: {e}", existing.display()),
            "choose a writable destination",
        );
    }
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration and `st`
    // is a properly sized, writable statvfs the kernel fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Whether a file can be made in `dir`.
fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".viridian-probe-{}", Uuid::new_v4()));
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// Brings the checked export in: copies the disks (copy mode) and rewrites the
/// chains' parent links, writes the checkpoint files and the tree into `vm_dir`,
/// and returns the settings to register (written by the caller: the commit point).
/// On failure everything written is taken away again.
pub fn carry_out(
    plan: &Plan,
    vm_dir: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<VmSettings, ApiError> {
    let root = plan
        .destination
        .clone()
        .unwrap_or_else(|| vm_dir.to_path_buf());
    let made_root = plan.mode == ImportMode::Copy && root != vm_dir && !root.exists();
    let result = carry_out_inner(plan, vm_dir, &root, progress);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(vm_dir);
        if plan.mode == ImportMode::Copy {
            for f in plan
                .manifest
                .files
                .iter()
                .filter(|f| f.role == FileRole::Disk)
            {
                if let Some(p) = package::inside(&root, &f.path) {
                    let _ = std::fs::remove_file(p);
                }
            }
            if made_root {
                let _ = std::fs::remove_dir_all(&root);
            }
        }
    }
    result
}

fn carry_out_inner(
    plan: &Plan,
    vm_dir: &Path,
    root: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<VmSettings, ApiError> {
    let io = |what: String| move |e: std::io::Error| ApiError::internal(format!("{what}: {e}"));
    std::fs::create_dir_all(vm_dir).map_err(io(format!("cannot create {}", vm_dir.display())))?;
    let disks: Vec<&package::ManifestFile> = plan
        .manifest
        .files
        .iter()
        .filter(|f| f.role == FileRole::Disk)
        .collect();
    let total: u64 = plan.manifest.files.iter().map(|f| f.bytes).sum();
    let mut done = 0u64;
    let cancelled = || {
        ApiError::new(
            api::ErrorCode::InvalidState,
            "the import was cancelled; nothing was left behind",
        )
    };
    let mut copy = |from: &Path, to: &Path, done: &mut u64| -> Result<(), ApiError> {
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d).map_err(io(format!("cannot create {}", d.display())))?;
        }
        let base = *done;
        let n = package::copy_file(from, to, &mut |d| progress(base + d, total)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::Interrupted {
                cancelled()
            } else {
                ApiError::internal(format!(
                    "cannot copy {} to {}: {e}",
                    from.display(),
                    to.display()
                ))
            }
        })?;
        *done += n;
        Ok(())
    };
    let inside = |root: &Path, rel: &str| {
        package::inside(root, rel)
            .ok_or_else(|| ApiError::invalid(format!("{rel:?} leaves the export folder")))
    };
    if plan.mode == ImportMode::Copy {
        for f in &disks {
            copy(
                &inside(&plan.folder, &f.path)?,
                &inside(root, &f.path)?,
                &mut done,
            )?;
        }
    }
    // Parent links: relative and absolute locators for where the files are now,
    // bases first (re-pointing opens the new parent's own chain).
    let mut disks = disks;
    let parent_of = |p: &Path| -> Option<PathBuf> {
        let i = vhd::ops::info::layer_info(p).ok()?;
        i.parent?
            .resolved_path
            .map(|r| std::fs::canonicalize(&r).unwrap_or(r))
    };
    let mut parents: HashMap<PathBuf, Option<PathBuf>> = HashMap::new();
    for f in &disks {
        if let Some(p) = package::inside(&plan.folder, &f.path) {
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            let parent = parent_of(&p);
            parents.insert(p, parent);
        }
    }
    let depth = |f: &package::ManifestFile| {
        let mut n = 0;
        let mut cur =
            package::inside(&plan.folder, &f.path).map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        while let Some(Some(next)) = cur.as_ref().and_then(|c| parents.get(c)) {
            n += 1;
            cur = Some(next.clone());
            if n > 256 {
                break;
            }
        }
        n
    };
    disks.sort_by_cached_key(|f| depth(f));
    for f in &disks {
        let child = inside(root, &f.path)?;
        let source = inside(&plan.folder, &f.path)?;
        let canonical = std::fs::canonicalize(&source).unwrap_or_else(|_| source.clone());
        let parent = parents.get(&canonical).cloned().flatten();
        if let Some(parent) = parent {
            let rel = parent.strip_prefix(&plan.folder).map_err(|_| {
                ApiError::internal(format!(
                    "{}'s parent {} is outside the export",
                    source.display(),
                    parent.display()
                ))
            })?;
            vhd::ops::set_parent::set_parent(&child, &root.join(rel), false).map_err(|e| {
                ApiError::internal(format!(
                    "cannot re-point {}: {}",
                    child.display(),
                    error_chain(&e)
                ))
            })?;
        }
    }
    // Memory states and firmware variables live in the VM's folder.
    for f in plan.manifest.files.iter().filter(|f| {
        matches!(
            f.role,
            FileRole::SavedState | FileRole::CheckpointState | FileRole::Firmware
        )
    }) {
        let from = inside(&plan.folder, &f.path)?;
        let to = inside(vm_dir, &f.path)?;
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d).map_err(io(format!("cannot create {}", d.display())))?;
        }
        if plan.mode == ImportMode::Register && std::fs::hard_link(&from, &to).is_ok() {
            done += f.bytes;
            continue;
        }
        copy(&from, &to, &mut done)?;
    }
    for (id, s) in &plan.node_settings {
        let dir = tree::node_dir(vm_dir, *id);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        vm_config::file::save(&dir.join(SETTINGS_FILE), &resolved(s, root))
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
    }
    // Outside the data dir the imported folder is the VM's storage: new checkpoint
    // layers go there too, and merges may remove the layers in it.
    let layers_dir = (root != vm_dir).then(|| root.join(tree::SNAPSHOTS_FOLDER));
    let tree_to_write = match (&plan.tree, &layers_dir) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(_)) => Some(Tree::default()),
        (None, None) => None,
    };
    if let Some(mut t) = tree_to_write {
        t.layers_dir = layers_dir;
        let place = |p: &mut PathBuf| -> Result<(), ApiError> {
            *p = inside(root, &p.to_string_lossy())?;
            Ok(())
        };
        for d in &mut t.current_disks {
            place(&mut d.path)?;
        }
        for n in &mut t.nodes {
            for d in &mut n.disks {
                place(&mut d.path)?;
            }
        }
        tree::save(vm_dir, &t).map_err(|e| ApiError::internal(error_chain(&e)))?;
    }
    package::sync_dir(vm_dir).map_err(io(format!("cannot sync {}", vm_dir.display())))?;
    progress(total, total);
    Ok(resolved(&plan.settings, root))
}

/// Gives the adapters a copy with new identities received (`new_id`) MAC addresses
/// from `new_mac` (the host's pool) in place of the stand-ins `inspect` chose, the
/// same one to an adapter in the VM and in each of its checkpoints.
pub fn pool_macs<E>(
    plan: &mut Plan,
    mut new_mac: impl FnMut() -> Result<String, E>,
) -> Result<(), E> {
    let mut given: HashMap<String, String> = HashMap::new();
    let mut pooled = |mac: &mut String| -> Result<(), E> {
        let key = mac.to_ascii_lowercase();
        let new = match given.get(&key) {
            Some(m) => m.clone(),
            None => {
                let m = new_mac()?;
                given.insert(key, m.clone());
                m
            }
        };
        *mac = new;
        Ok(())
    };
    for a in &mut plan.settings.network_adapters {
        pooled(&mut a.mac)?;
    }
    for (_, s) in &mut plan.node_settings {
        for a in &mut s.network_adapters {
            pooled(&mut a.mac)?;
        }
    }
    Ok(())
}
