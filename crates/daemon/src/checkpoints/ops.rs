//! Checkpoint operations on a VM's folder, as plain blocking file work: create,
//! apply, delete (which only marks), and `settle`, which carries out what deletes
//! left to do (remove the files of a deleted checkpoint with no descendants, merge
//! the disks of one with exactly one).
//!
//! The disks form a tree beside the checkpoints. A checkpoint's disks are frozen:
//! each is the read-only parent of the layer above it in every direct descendant
//! (a child checkpoint, or the VM's current state). Taking or applying checkpoint
//! C makes new layers in `Snapshots/<C>/`; only files under `Snapshots/` are ever
//! deleted, never a disk the user gave the VM.
//!
//! Merging a deleted checkpoint C into its only descendant D, per disk: copy D's
//! layer L into C's disk X (`merge_keeping_layers`: the chain through L reads the
//! same at every moment), re-point L's own children at X, make D's disk X (in the
//! tree, and in `vm.json` when D is the current state), then remove L. Each step
//! can run again after a crash; `deleted: true` in the tree is the intent that
//! makes the next start run them.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use api::ErrorCode;
use uuid::Uuid;
use vm_config::{DriveMedia, Slot, VmSettings};

use super::tree::{self, Child, Node, NodeDisk, Tree, SETTINGS_FILE};
use crate::error::ApiError;
use crate::vms::store::error_chain;

/// The memory and device state file, in a VM's folder and in a checkpoint's.
pub const SAVED_STATE_FILE: &str = worker::spec::SAVED_STATE_FILE;

/// Called before each step that changes files; an error stops the operation
/// there, as a crash would (the crash tests use it).
pub type Hook<'a> = &'a mut dyn FnMut(&str) -> Result<(), ApiError>;

pub fn no_hook(_: &str) -> Result<(), ApiError> {
    Ok(())
}

fn io(what: String, e: std::io::Error) -> ApiError {
    ApiError::internal(format!("{what}: {e}"))
}

fn engine(what: String, e: &vhd::Error) -> ApiError {
    let code = match e {
        vhd::Error::Locked { .. } => ErrorCode::InUse,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, format!("{what}: {}", error_chain(e)))
}

fn tree_err(e: tree::TreeError) -> ApiError {
    ApiError::internal(error_chain(&e))
}

pub fn load(vm_dir: &Path) -> Result<Tree, ApiError> {
    tree::load(vm_dir).map_err(tree_err)
}

fn save(vm_dir: &Path, t: &Tree) -> Result<(), ApiError> {
    tree::save(vm_dir, t).map_err(tree_err)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Hyper-V's default: `<VM name> - (<YYYY-MM-DD> - <HH:MM:SS>)` (UTC here), made
/// unique within the VM with ` (2)`, ` (3)`, ...
pub fn default_name(vm_name: &str, t: &Tree, at: SystemTime) -> String {
    let stamp = crate::convert::rfc3339(at);
    let base = format!("{vm_name} - ({} - {})", &stamp[..10], &stamp[11..19]);
    let mut name = base.clone();
    let mut n = 2;
    while t.visible().any(|c| c.name == name) {
        name = format!("{base} ({n})");
        n += 1;
    }
    name
}

/// A checkpoint name: 1–100 characters, visible ones only (no control, format or
/// bidirectional characters), not a UUID (checkpoints are found by id or name),
/// unique in the VM.
pub fn check_name(t: &Tree, name: &str, except: Option<Uuid>) -> Result<(), ApiError> {
    let max = vm_config::validate::MAX_CHECKPOINT_NAME_CHARS;
    if name.trim().is_empty() || name.chars().count() > max {
        return Err(ApiError::invalid(format!(
            "{name:?} is not a valid checkpoint name: use 1 to {max} characters, not only white space"
        )));
    }
    if let Some((c, what)) = vm_config::validate::invisible_character(name) {
        return Err(ApiError::invalid(format!(
            "the checkpoint name {name:?} contains U+{:04X}, {what}; a checkpoint name may hold only visible characters",
            u32::from(c)
        )));
    }
    if vm_config::validate::looks_like_uuid(name) {
        return Err(ApiError::invalid(format!(
            "the checkpoint name {name:?} reads as a UUID; checkpoints are found by id or by name, so a name may not look like an id: choose another name"
        )));
    }
    if let Some(other) = t.visible().find(|c| c.name == name && Some(c.id) != except) {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!(
                "the VM already has a checkpoint named {name:?} ({}); checkpoint names are unique within a VM",
                other.id
            ),
        ));
    }
    Ok(())
}

/// Finds a visible checkpoint by id or name.
pub fn find<'a>(t: &'a Tree, key: &str) -> Result<&'a Node, ApiError> {
    let by_id = Uuid::parse_str(key)
        .ok()
        .and_then(|id| t.visible().find(|n| n.id == id));
    by_id
        .or_else(|| t.visible().find(|n| n.name == key))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "the VM has no checkpoint named or with the id {key:?}; `viridian checkpoint list` shows them"
            ))
        })
}

/// The hard disks of `settings` that get a layer per checkpoint.
fn hard_disks(settings: &VmSettings) -> Result<Vec<NodeDisk>, ApiError> {
    let mut out = Vec::new();
    for d in &settings.drives {
        match &d.media {
            DriveMedia::HardDisk { path } => out.push(NodeDisk {
                slot: d.slot,
                path: PathBuf::from(path),
            }),
            DriveMedia::PassThrough { device } => {
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "VM {} has the pass-through disk {device} in {}; a pass-through disk cannot be checkpointed (as in Hyper-V): remove it first",
                        settings.name, d.slot
                    ),
                ))
            }
            DriveMedia::Dvd { .. } => {}
        }
    }
    Ok(out)
}

/// `web_<GUID>.avhdx` for parent `web.vhdx` (or `web_<older GUID>.avhdx`).
fn layer_name(parent: &Path) -> String {
    let stem = parent
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let stem = match stem.rsplit_once('_') {
        Some((head, tail)) if tail.len() == 36 && Uuid::parse_str(tail).is_ok() => head.to_string(),
        _ => stem,
    };
    let vhdx = vhd::detect_format(parent)
        .map(|f| f == vhd::Format::Vhdx)
        .unwrap_or_else(|_| vhd::is_vhdx_name(parent));
    let guid = Uuid::new_v4().to_string().to_uppercase();
    format!("{stem}_{guid}.{}", if vhdx { "avhdx" } else { "avhd" })
}

/// Makes a differencing child of `parent` in `dir`.
fn new_layer(dir: &Path, parent: &Path) -> Result<PathBuf, ApiError> {
    let path = dir.join(layer_name(parent));
    vhd::create_child(&path, parent).map_err(|e| {
        engine(
            format!("cannot make a differencing disk on {}", parent.display()),
            &e,
        )
    })?;
    Ok(path)
}

/// A new layer over each of `disks`, in `dir`, all at once: each creation waits for
/// its own fsyncs, and run side by side the file system commits them together (a
/// checkpoint of a VM with four disks costs about the fsyncs of one). On failure
/// the layers made are removed again.
fn new_layers(dir: &Path, disks: &[NodeDisk]) -> Result<Vec<NodeDisk>, ApiError> {
    let made: Vec<Result<PathBuf, ApiError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = disks
            .iter()
            .map(|d| scope.spawn(move || new_layer(dir, &d.path)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ApiError::internal(
                        "making a disk layer failed unexpectedly",
                    ))
                })
            })
            .collect()
    });
    if let Some(e) = made.iter().find_map(|r| r.as_ref().err()).cloned() {
        for p in made.into_iter().flatten() {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    Ok(disks
        .iter()
        .zip(made.into_iter().flatten())
        .map(|(d, path)| NodeDisk { slot: d.slot, path })
        .collect())
}

fn with_disks(settings: &VmSettings, disks: &[NodeDisk]) -> VmSettings {
    let mut s = settings.clone();
    for d in &mut s.drives {
        if let Some(nd) = disks.iter().find(|nd| nd.slot == d.slot) {
            if let DriveMedia::HardDisk { path } = &mut d.media {
                *path = nd.path.to_string_lossy().into_owned();
            }
        }
    }
    s
}

fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_err() {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, to)?;
    }
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// What a create produced.
pub struct Created {
    pub node: Node,
    /// The VM's settings with its disks on the new layers; the caller writes them.
    pub settings: VmSettings,
}

/// Takes a checkpoint of the VM in `vm_dir` whose settings are `settings`. With
/// `memory_state`, that saved-state file is kept with the checkpoint.
pub fn create(
    vm_dir: &Path,
    settings: &VmSettings,
    name: Option<String>,
    memory_state: Option<&Path>,
    limit: usize,
) -> Result<Created, ApiError> {
    let memory = match memory_state {
        Some(p) => Memory::File(p),
        None => Memory::None,
    };
    create_with(vm_dir, settings, name, memory, limit, None)
}

/// The memory and device state a new checkpoint keeps.
#[derive(Debug, Clone, Copy)]
pub enum Memory<'a> {
    /// None: applied, the checkpoint's VM is Off.
    None,
    /// This saved-state file, linked (or copied) into the checkpoint's folder.
    File(&'a Path),
    /// Written into the checkpoint's folder ([`memory_path`]) after this
    /// returns, by the VM's worker while the guest runs: a background
    /// checkpoint. Only with planned layers (the intent records it).
    ToCome,
}

/// Where checkpoint `node`'s memory and device state lives.
pub fn memory_path(vm_dir: &Path, node: Uuid) -> PathBuf {
    tree::node_dir(vm_dir, node).join(SAVED_STATE_FILE)
}

/// How a checkpoint of a running VM makes its layers: the VM's worker makes
/// them over the leaves it holds open ([`Intent`]).
pub type PlannedLayers<'a> = &'a dyn Fn(&Intent) -> Result<(), ApiError>;

/// A checkpoint of a running VM under way, written before the tree names its
/// layers and removed once `vm.json` does: the layer each slot's disk gets.
/// After a crash, [`recover_intent`] finishes it (every layer exists: the
/// worker switched to them) or takes it back (it did not).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Intent {
    pub node: Uuid,
    pub layers: Vec<PlannedLayer>,
    /// The worker writes the checkpoint's memory state too ([`Memory::ToCome`]).
    #[serde(default)]
    pub memory_to_come: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlannedLayer {
    pub slot: Slot,
    /// The disk the VM runs on now, the new layer's parent.
    pub parent: PathBuf,
    pub layer: PathBuf,
}

/// `checkpoint-intent.json` in the VM's folder.
pub fn intent_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("checkpoint-intent.json")
}

/// Like [`create`]; with `planned`, the layers are not made here: their
/// names are decided, `planned` hears them (the caller records the intent
/// and has the worker make them after this returns), and the tree names them.
pub fn create_with(
    vm_dir: &Path,
    settings: &VmSettings,
    name: Option<String>,
    memory_state: Memory<'_>,
    limit: usize,
    planned: Option<PlannedLayers<'_>>,
) -> Result<Created, ApiError> {
    if matches!(memory_state, Memory::ToCome) && planned.is_none() {
        return Err(ApiError::internal(
            "a checkpoint whose memory is still to be written needs its layers planned",
        ));
    }
    let mut t = load(vm_dir)?;
    let count = t.visible().count();
    if count >= limit {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "VM {} already has {count} checkpoints, the most allowed (viridiand --checkpoint-limit {limit}); delete one first",
                settings.name
            ),
        ));
    }
    let name = match name {
        Some(n) => n,
        None => default_name(&settings.name, &t, SystemTime::now()),
    };
    check_name(&t, &name, None)?;
    let disks = hard_disks(settings)?;
    let id = Uuid::new_v4();
    let dir = tree::node_dir(vm_dir, id);
    std::fs::create_dir_all(&dir).map_err(|e| io(format!("cannot create {}", dir.display()), e))?;
    let layer_dir = tree::layer_dir(vm_dir, &t, id);
    std::fs::create_dir_all(&layer_dir)
        .map_err(|e| io(format!("cannot create {}", layer_dir.display()), e))?;
    let take_away = || {
        // Nothing refers to the folders yet: take them away again.
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&layer_dir);
    };
    // The folder's files are made side by side (see `new_layers`); each is durable,
    // with its name, when its step returns.
    let (files, layers) = std::thread::scope(|scope| {
        let files = scope.spawn(|| -> Result<(), ApiError> {
            vm_config::file::save(&dir.join(SETTINGS_FILE), settings)
                .map_err(|e| ApiError::internal(error_chain(&e)))?;
            if let Memory::File(state) = memory_state {
                link_or_copy(state, &dir.join(SAVED_STATE_FILE)).map_err(|e| {
                    io(
                        format!("cannot keep {} with the checkpoint", state.display()),
                        e,
                    )
                })?;
            }
            // The new folders' own names, in their `Snapshots/`.
            for made in [&dir, &layer_dir] {
                let parent = made.parent().unwrap_or(vm_dir);
                sync_dir(parent).map_err(|e| io(format!("cannot sync {}", parent.display()), e))?;
            }
            Ok(())
        });
        let layers = match planned {
            None => new_layers(&layer_dir, &disks),
            Some(tell) => {
                let intent = Intent {
                    memory_to_come: matches!(memory_state, Memory::ToCome),
                    node: id,
                    layers: disks
                        .iter()
                        .map(|d| PlannedLayer {
                            slot: d.slot,
                            parent: d.path.clone(),
                            layer: layer_dir.join(layer_name(&d.path)),
                        })
                        .collect(),
                };
                tell(&intent).map(|()| {
                    intent
                        .layers
                        .iter()
                        .map(|l| NodeDisk {
                            slot: l.slot,
                            path: l.layer.clone(),
                        })
                        .collect()
                })
            }
        };
        let files = files.join().unwrap_or_else(|_| {
            Err(ApiError::internal(
                "writing the checkpoint's settings failed unexpectedly",
            ))
        });
        (files, layers)
    });
    let layers = match files.and(layers) {
        Ok(l) => l,
        Err(e) => {
            take_away();
            return Err(e);
        }
    };
    let node = Node {
        id,
        name,
        parent: t.current_parent,
        created_ms: now_ms(),
        disks,
        memory_state: !matches!(memory_state, Memory::None),
        deleted: false,
    };
    t.nodes.push(node.clone());
    t.current_parent = Some(id);
    t.current_disks = layers.clone();
    save(vm_dir, &t)?;
    Ok(Created {
        node,
        settings: with_disks(settings, &layers),
    })
}

/// Writes `intent` durably into the VM's folder.
pub fn write_intent(vm_dir: &Path, intent: &Intent) -> Result<(), ApiError> {
    vm_config::file::write_json_atomic(&intent_path(vm_dir), intent).map_err(|e| {
        ApiError::internal(format!(
            "cannot record the checkpoint under way in {}: {}",
            intent_path(vm_dir).display(),
            error_chain(&e)
        ))
    })
}

/// Takes back checkpoint `intent.node` of a running VM whose worker did not
/// make its layers: the tree forgets it and the current state is on the old
/// disks again; its folder and any layer made go.
pub fn undo_intent(vm_dir: &Path, intent: &Intent) -> Result<(), ApiError> {
    let mut t = load(vm_dir)?;
    if let Some(node) = t.node(intent.node).cloned() {
        t.nodes.retain(|n| n.id != intent.node);
        t.current_parent = node.parent;
        t.current_disks = node.disks;
        save(vm_dir, &t)?;
    }
    for l in &intent.layers {
        let _ = std::fs::remove_file(&l.layer);
    }
    remove_node_dir(vm_dir, &t, intent.node);
    let _ = std::fs::remove_file(intent_path(vm_dir));
    Ok(())
}

/// After a crash during a checkpoint of a running VM: finishes it when every
/// layer exists (the worker serves them: `vm.json` is re-pointed at them
/// through `write_current`), or takes it back. Returns whether it finished.
pub fn recover_intent(
    vm_dir: &Path,
    write_current: WriteCurrent<'_>,
) -> Result<Option<bool>, ApiError> {
    let path = intent_path(vm_dir);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let intent: Intent = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("{} is unreadable: {e}", path.display())))?;
    let t = load(vm_dir)?;
    let recorded = t.node(intent.node).is_some();
    if recorded && intent.layers.iter().all(|l| l.layer.exists()) {
        if intent.memory_to_come && !memory_path(vm_dir, intent.node).exists() {
            // The disks switched but the memory never arrived: the checkpoint
            // keeps the disks of its instant and, applied, starts the VM Off.
            let mut t = t;
            if let Some(n) = t.nodes.iter_mut().find(|n| n.id == intent.node) {
                n.memory_state = false;
            }
            save(vm_dir, &t)?;
        }
        for l in &intent.layers {
            write_current(l.slot, &l.parent, &l.layer)?;
        }
        let _ = std::fs::remove_file(&path);
        return Ok(Some(true));
    }
    undo_intent(vm_dir, &intent)?;
    Ok(Some(false))
}

/// What an apply produced.
pub struct Applied {
    /// The VM's new settings (the checkpoint's, on new layers); the caller writes them.
    pub settings: VmSettings,
    /// The checkpoint's memory state, to become the VM's saved state.
    pub memory_state: Option<PathBuf>,
    /// The discarded current state's layers, deleted once `vm.json` is written.
    pub discard: Vec<PathBuf>,
}

/// Applies checkpoint `key` to the VM (which the caller has checked is Off or Saved).
pub fn apply(vm_dir: &Path, current: &VmSettings, key: &str) -> Result<Applied, ApiError> {
    let mut t = load(vm_dir)?;
    let node = find(&t, key)?.clone();
    let dir = tree::node_dir(vm_dir, node.id);
    let saved = vm_config::file::load(&dir.join(SETTINGS_FILE))
        .map_err(|e| ApiError::new(ErrorCode::Damaged, error_chain(&e)))?;
    let layer_dir = tree::layer_dir(vm_dir, &t, node.id);
    std::fs::create_dir_all(&layer_dir)
        .map_err(|e| io(format!("cannot create {}", layer_dir.display()), e))?;
    let layers = new_layers(&layer_dir, &node.disks)?;
    let discard: Vec<PathBuf> = hard_disks(current)
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.path)
        .filter(|p| tree::owns_layer(vm_dir, &t, p) && !used_by_nodes(&t, p))
        .collect();
    t.current_parent = Some(node.id);
    t.current_disks = layers.clone();
    save(vm_dir, &t)?;
    let mut settings = with_disks(&saved, &layers);
    settings.id = current.id;
    settings.name = current.name.clone();
    Ok(Applied {
        settings,
        memory_state: node
            .memory_state
            .then(|| dir.join(SAVED_STATE_FILE))
            .filter(|p| p.exists()),
        discard,
    })
}

fn used_by_nodes(t: &Tree, path: &Path) -> bool {
    t.nodes
        .iter()
        .flat_map(|n| &n.disks)
        .any(|d| d.path == path)
}

/// Removes files of a discarded current state (after `vm.json` no longer names them).
pub fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a discarded disk layer");
            }
        }
    }
}

/// Renames a checkpoint.
pub fn rename(vm_dir: &Path, key: &str, name: &str) -> Result<Node, ApiError> {
    let mut t = load(vm_dir)?;
    let id = find(&t, key)?.id;
    check_name(&t, name, Some(id))?;
    let node = t
        .node_mut(id)
        .ok_or_else(|| ApiError::internal("checkpoint vanished"))?;
    node.name = name.to_string();
    let node = node.clone();
    save(vm_dir, &t)?;
    Ok(node)
}

/// Marks checkpoint `key` (and with `subtree` every checkpoint below it) deleted:
/// settings and memory state go at once, the disks wait for [`settle`]. Returns
/// the ids marked.
pub fn delete(vm_dir: &Path, key: &str, subtree: bool) -> Result<Vec<Uuid>, ApiError> {
    let mut t = load(vm_dir)?;
    let id = find(&t, key)?.id;
    let ids: Vec<Uuid> = if subtree { t.subtree(id) } else { vec![id] };
    let mut marked = Vec::new();
    for i in ids {
        if let Some(n) = t.node_mut(i) {
            if !n.deleted {
                n.deleted = true;
                n.memory_state = false;
                marked.push(i);
            }
        }
    }
    // The intent first, then the files it no longer needs.
    save(vm_dir, &t)?;
    for i in &marked {
        let dir = tree::node_dir(vm_dir, *i);
        for f in [SETTINGS_FILE, SAVED_STATE_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    Ok(marked)
}

/// What `settle` may do to the current state's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    /// The VM is Off or Saved: its disks may be merged and re-pointed.
    Idle,
    /// The VM runs but cannot merge now (starting, stopping, saving, or its
    /// worker cannot merge live): merges that touch its chain wait.
    Running,
    /// The VM runs and its worker merges the layers of its chain live.
    Live,
}

/// One layer of a running VM's chain for its worker to merge into its parent
/// while the VM runs: `(slot, layer, into, marker, progress)`. The worker
/// creates `marker` once the parent holds the disk's current data (for the
/// running leaf); [`settle`] reads it after a crash.
pub type LiveMerge<'a> = dyn FnMut(Slot, &Path, &Path, Option<&Path>, &mut dyn vhd::Progress) -> Result<(), ApiError>
    + 'a;

/// Where the worker records that the current state's layer in `slot` was
/// merged live into deleted checkpoint `id`'s disk.
pub fn live_marker(vm_dir: &Path, id: Uuid, slot: Slot) -> PathBuf {
    tree::node_dir(vm_dir, id).join(format!(
        "merged-live-{}{}-{}.json",
        match slot.controller {
            vm_config::ControllerKind::Ide => "ide",
            vm_config::ControllerKind::Scsi => "scsi",
        },
        slot.controller_number,
        slot.location
    ))
}

/// A merge `settle` would run or runs now: the deleted node and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    pub node: Uuid,
    pub kind: WorkKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkKind {
    /// No descendants: remove its files.
    Remove,
    /// Exactly one descendant: merge into it.
    Merge,
}

/// The next thing `settle` can do, if any.
pub fn next_work(t: &Tree, current: Current) -> Option<Work> {
    // Deepest first, so a chain of deleted nodes merges from the bottom.
    for n in t.nodes.iter().rev().filter(|n| n.deleted) {
        let children = t.children(n.id);
        match children.as_slice() {
            [] => {
                return Some(Work {
                    node: n.id,
                    kind: WorkKind::Remove,
                })
            }
            [only] => {
                let touches_running = match only {
                    Child::Current => true,
                    Child::Node(c) => descends_to_current(t, *c),
                };
                if current != Current::Running || !touches_running {
                    return Some(Work {
                        node: n.id,
                        kind: WorkKind::Merge,
                    });
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether the current state descends from `id`.
fn descends_to_current(t: &Tree, id: Uuid) -> bool {
    let mut cur = t.current_parent;
    while let Some(c) = cur {
        if c == id {
            return true;
        }
        cur = t.node(c).and_then(|n| n.parent);
    }
    false
}

/// Why a deleted checkpoint still waits.
pub fn waiting_reason(t: &Tree, id: Uuid, current: Current) -> String {
    match t.children(id).len() {
        0 | 1 if current == Current::Running => {
            "its disks are in the running VM's chain and the VM cannot merge them now; they are merged when the VM stops or the next time a checkpoint operation runs".into()
        }
        0 | 1 => "about to be merged".into(),
        n => format!("it has {n} descendants; its disks are merged once only one remains"),
    }
}

/// Points the hard disk in `slot` of `settings` at `new` if it names `old`;
/// returns whether it did.
pub fn repoint_drive(settings: &mut VmSettings, slot: Slot, old: &Path, new: &Path) -> bool {
    let mut changed = false;
    for d in settings.drives.iter_mut().filter(|d| d.slot == slot) {
        if let DriveMedia::HardDisk { path } = &mut d.media {
            if Path::new(path.as_str()) == old {
                *path = new.to_string_lossy().into_owned();
                changed = true;
            }
        }
    }
    changed
}

/// Re-points the current state's drive in a slot from one file to another in `vm.json`.
pub type WriteCurrent<'a> = &'a mut dyn FnMut(Slot, &Path, &Path) -> Result<(), ApiError>;

/// Carries out every merge and removal deleted checkpoints wait for, as far as
/// `current` allows. `write_current` re-points the current state's drives in
/// `vm.json`; `on_work` hears each piece of work before it starts. Progress counts
/// bytes of the merge under way.
/// In [`Current::Live`], `live` merges the layers in the running chain; when
/// it fails, that merge (and every other touching the running chain) waits
/// for the VM to stop, and `settle` returns what it did.
pub fn settle(
    vm_dir: &Path,
    mut current: Current,
    write_current: WriteCurrent<'_>,
    mut live: Option<&mut LiveMerge<'_>>,
    on_work: &mut dyn FnMut(&Work),
    progress: &mut dyn vhd::Progress,
    hook: Hook<'_>,
) -> Result<Vec<Work>, ApiError> {
    let mut done = Vec::new();
    if live.is_none() && current == Current::Live {
        current = Current::Running;
    }
    loop {
        let t = load(vm_dir)?;
        let Some(work) = next_work(&t, current) else {
            return Ok(done);
        };
        on_work(&work);
        match work.kind {
            WorkKind::Remove => remove_node(vm_dir, t, work.node, hook)?,
            WorkKind::Merge => {
                let live_now = if current == Current::Live {
                    live.as_deref_mut()
                } else {
                    None
                };
                match merge_node(
                    vm_dir,
                    t,
                    work.node,
                    write_current,
                    live_now,
                    progress,
                    hook,
                ) {
                    Ok(()) => {}
                    Err(MergeFailure::Live(e)) => {
                        tracing::warn!(node = %work.node, error = %e.message,
                            "a live merge did not run; it waits for the VM to stop");
                        current = Current::Running;
                        continue;
                    }
                    Err(MergeFailure::Other(e)) => return Err(e),
                }
            }
        }
        done.push(work);
    }
}

/// Why [`merge_node`] stopped.
enum MergeFailure {
    /// The running VM's worker could not merge live: the chain reads as before.
    Live(ApiError),
    Other(ApiError),
}

impl From<ApiError> for MergeFailure {
    fn from(e: ApiError) -> Self {
        MergeFailure::Other(e)
    }
}

/// Whether the chain on top of `top` holds `layer`.
fn chain_has(top: &Path, layer: &Path) -> bool {
    vhd::ops::info::info(top)
        .map(|i| i.chain.iter().any(|c| same(c, layer)))
        .unwrap_or(false)
}

fn remove_node(vm_dir: &Path, mut t: Tree, id: Uuid, hook: Hook<'_>) -> Result<(), ApiError> {
    let node = t
        .node(id)
        .cloned()
        .ok_or_else(|| ApiError::internal("node vanished"))?;
    for d in &node.disks {
        let used_elsewhere = t
            .nodes
            .iter()
            .filter(|n| n.id != id)
            .flat_map(|n| &n.disks)
            .chain(&t.current_disks)
            .any(|o| o.path == d.path);
        if tree::owns_layer(vm_dir, &t, &d.path) && !used_elsewhere {
            hook("remove-disk")?;
            remove_files(std::slice::from_ref(&d.path));
        }
    }
    hook("forget")?;
    t.nodes.retain(|n| n.id != id);
    save(vm_dir, &t)?;
    remove_node_dir(vm_dir, &t, id);
    Ok(())
}

/// Removes a forgotten node's folder unless a disk still in use lives there.
fn remove_node_dir(vm_dir: &Path, t: &Tree, id: Uuid) {
    let mut dirs = vec![tree::node_dir(vm_dir, id)];
    if t.layers_dir.is_some() {
        dirs.push(tree::layer_dir(vm_dir, t, id));
    }
    for dir in dirs {
        let in_use = t
            .nodes
            .iter()
            .flat_map(|n| &n.disks)
            .chain(&t.current_disks)
            .any(|d| d.path.starts_with(&dir));
        if in_use {
            tracing::warn!(folder = %dir.display(), "a deleted checkpoint's folder still holds a disk in use; left in place");
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(folder = %dir.display(), error = %e, "cannot remove a deleted checkpoint's folder");
            }
        }
    }
}

fn parent_of(path: &Path) -> Option<PathBuf> {
    vhd::ops::info::layer_info(path)
        .ok()?
        .parent?
        .resolved_path
        .map(|p| p.canonicalize().unwrap_or(p))
}

fn same(a: &Path, b: &Path) -> bool {
    let c = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    c(a) == c(b)
}

fn disk_in(disks: &[NodeDisk], slot: Slot) -> Option<PathBuf> {
    disks
        .iter()
        .find(|d| d.slot == slot)
        .map(|d| d.path.clone())
}

fn merge_node(
    vm_dir: &Path,
    mut t: Tree,
    id: Uuid,
    write_current: WriteCurrent<'_>,
    mut live: Option<&mut LiveMerge<'_>>,
    progress: &mut dyn vhd::Progress,
    hook: Hook<'_>,
) -> Result<(), MergeFailure> {
    let node = t
        .node(id)
        .cloned()
        .ok_or_else(|| ApiError::internal("node vanished"))?;
    let [only] = t.children(id)[..] else {
        return Err(ApiError::internal("merge of a node without exactly one child").into());
    };
    for x in &node.disks {
        let child_disks = match only {
            Child::Node(c) => t.node(c).map(|n| n.disks.clone()).unwrap_or_default(),
            Child::Current => t.current_disks.clone(),
        };
        let Some(l) = disk_in(&child_disks, x.slot) else {
            continue;
        };
        if same(&l, &x.path) {
            continue; // merged before a crash; only the bookkeeping was left
        }
        if !parent_of(&l).is_some_and(|p| same(&p, &x.path)) {
            // The descendant's disk in this slot is not a layer on ours (the drive
            // was changed after the checkpoint): nothing to merge.
            continue;
        }
        // The children of L: the layers of the descendant's own descendants.
        let grandchildren: Vec<PathBuf> = match only {
            Child::Current => Vec::new(),
            Child::Node(c) => t
                .children(c)
                .into_iter()
                .filter_map(|g| match g {
                    Child::Node(g) => t.node(g).and_then(|n| disk_in(&n.disks, x.slot)),
                    Child::Current => disk_in(&t.current_disks, x.slot),
                })
                // Already re-pointed at X before a crash counts too (the merge
                // below gives X a new identity, so they are re-pointed again), and
                // so does one whose link a crash mid-merge left unresolvable.
                .filter(|g| {
                    g.exists() && parent_of(g).is_none_or(|p| same(&p, &l) || same(&p, &x.path))
                })
                .collect(),
        };
        // The running VM's worker merges what is in its chain; a merge of its
        // leaf it finished before a crash left the marker.
        let marker = live_marker(vm_dir, id, x.slot);
        let leaf = only == Child::Current;
        let in_running_chain = leaf
            || matches!(only, Child::Node(c) if descends_to_current(&t, c))
                && disk_in(&t.current_disks, x.slot).is_some_and(|top| chain_has(&top, &l));
        let merged_live = match (leaf && marker.exists(), live.as_mut()) {
            (true, _) => true,
            (false, Some(live)) if in_running_chain => {
                hook("merge")?;
                if leaf {
                    std::fs::create_dir_all(tree::node_dir(vm_dir, id)).map_err(|e| {
                        io(
                            format!("cannot create the folder of {}", marker.display()),
                            e,
                        )
                    })?;
                }
                live(
                    x.slot,
                    &l,
                    &x.path,
                    leaf.then_some(marker.as_path()),
                    progress,
                )
                .map_err(MergeFailure::Live)?;
                true
            }
            _ => {
                hook("merge")?;
                vhd::ops::merge::merge_keeping_layers(&l, &x.path, progress).map_err(|e| {
                    engine(
                        format!("cannot merge {} into {}", l.display(), x.path.display()),
                        &e,
                    )
                })?;
                false
            }
        };
        // A live merge keeps the parent's identity and re-points the running
        // chain's child itself; the others still link to the merged layer.
        let grandchildren: Vec<PathBuf> = grandchildren
            .into_iter()
            .filter(|g| !merged_live || !parent_of(g).is_some_and(|p| same(&p, &x.path)))
            .collect();
        for g in &grandchildren {
            hook("reparent")?;
            vhd::ops::set_parent::set_parent(g, &x.path, true).map_err(|e| {
                engine(
                    format!("cannot re-point {} at {}", g.display(), x.path.display()),
                    &e,
                )
            })?;
        }
        hook("repoint")?;
        let repoint = |disks: &mut Vec<NodeDisk>| {
            for d in disks.iter_mut().filter(|d| d.slot == x.slot) {
                d.path = x.path.clone();
            }
        };
        match only {
            Child::Node(c) => {
                if let Some(n) = t.node_mut(c) {
                    repoint(&mut n.disks);
                }
            }
            Child::Current => repoint(&mut t.current_disks),
        }
        save(vm_dir, &t)?;
        if only == Child::Current {
            write_current(x.slot, &l, &x.path)?;
        }
        if tree::owns_layer(vm_dir, &t, &l) {
            hook("remove-layer")?;
            remove_files(std::slice::from_ref(&l));
        }
        if leaf {
            let _ = std::fs::remove_file(&marker);
        }
    }
    hook("forget")?;
    match only {
        Child::Node(c) => {
            if let Some(n) = t.node_mut(c) {
                n.parent = node.parent;
            }
        }
        Child::Current => t.current_parent = node.parent,
    }
    t.nodes.retain(|n| n.id != id);
    save(vm_dir, &t)?;
    remove_node_dir(vm_dir, &t, id);
    Ok(())
}

/// After a crash between writing the tree and `vm.json`: a drive of the current
/// state that still names a layer under `Snapshots/` other than the tree's
/// current disk in that slot is pointed at the tree's. Returns the repaired
/// settings, if anything changed.
pub fn reconcile(vm_dir: &Path, settings: &VmSettings) -> Result<Option<VmSettings>, ApiError> {
    let t = load(vm_dir)?;
    if t.nodes.is_empty() {
        return Ok(None);
    }
    let mut fixed = settings.clone();
    let mut changed = false;
    for d in &mut fixed.drives {
        let DriveMedia::HardDisk { path } = &mut d.media else {
            continue;
        };
        let Some(want) = disk_in(&t.current_disks, d.slot) else {
            continue;
        };
        let stale = Path::new(path.as_str()) != want
            && (tree::owns_layer(vm_dir, &t, Path::new(path.as_str()))
                || used_by_nodes(&t, Path::new(path.as_str())));
        if stale {
            tracing::warn!(slot = %d.slot, from = %path, to = %want.display(), "vm.json names an older disk layer than the checkpoint tree; repaired");
            *path = want.to_string_lossy().into_owned();
            changed = true;
        }
    }
    Ok(changed.then_some(fixed))
}

/// Bytes a file takes on the host's disk (0 when it is gone).
pub fn size_on_disk(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod crash_tests {
    //! A merge stopped at every step (as a crash of the daemon would stop it, with
    //! everything written so far on disk) finishes when `settle` runs again, and the
    //! disks read as they should: the current state and every remaining checkpoint.
    use std::cell::RefCell;

    use vm_config::{ControllerKind, Drive, MemorySettings, ProcessorSettings};

    use super::*;

    const SIZE: u64 = 4 << 20;

    fn settings(disks: &[PathBuf]) -> VmSettings {
        VmSettings {
            configuration_version: vm_config::CURRENT_CONFIGURATION_VERSION,
            id: Uuid::new_v4(),
            name: "crash".into(),
            generation: 2,
            processor: ProcessorSettings::with_count(1),
            memory: MemorySettings { startup_mib: 128 },
            drives: disks
                .iter()
                .enumerate()
                .map(|(i, p)| Drive {
                    slot: Slot {
                        controller: ControllerKind::Scsi,
                        controller_number: 0,
                        location: i as u8,
                    },
                    media: DriveMedia::HardDisk {
                        path: p.to_string_lossy().into_owned(),
                    },
                })
                .collect(),
            network_adapters: vec![],
            boot_order: vec![],
            notes: String::new(),
        }
    }

    fn paths(s: &VmSettings) -> Vec<PathBuf> {
        s.drives
            .iter()
            .filter_map(|d| d.media.host_path().map(PathBuf::from))
            .collect()
    }

    fn write(s: &VmSettings, step: u8) {
        for p in paths(s) {
            let d = vhd::open(&p, false).unwrap();
            d.write_at(&vec![step; 300_000], u64::from(step) * 100_000)
                .unwrap();
            d.flush().unwrap();
        }
    }

    fn hash(p: &Path) -> Vec<u8> {
        let d = vhd::open(p, true).unwrap();
        let mut buf = vec![0u8; d.size() as usize];
        d.read_at(&mut buf, 0).unwrap();
        buf
    }

    /// Builds A → B → now with data written between, in a fresh VM folder.
    fn build(root: &Path) -> (PathBuf, VmSettings) {
        let vm_dir = root.join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let vhd_base = root.join("base.vhd");
        let vhdx_base = root.join("base.vhdx");
        use vhd::vhd1::create::{CreateOptions, NewDisk};
        vhd::vhd1::create::create(
            &vhd_base,
            &CreateOptions {
                kind: NewDisk::Dynamic {
                    size: SIZE,
                    block_size: 1 << 20,
                },
                exact_size: true,
            },
            &mut vhd::NoProgress,
        )
        .unwrap();
        use vhd::vhdx::create::{NewVhdx, VhdxOptions};
        let mut o = VhdxOptions::new(NewVhdx::Dynamic { size: SIZE });
        o.block_size = Some(1 << 20);
        vhd::vhdx::create::create(&vhdx_base, &o, &mut vhd::NoProgress).unwrap();
        let mut s = settings(&[vhd_base, vhdx_base]);
        write(&s, 1);
        s = create(&vm_dir, &s, Some("A".into()), None, 50)
            .unwrap()
            .settings;
        write(&s, 2);
        s = create(&vm_dir, &s, Some("B".into()), None, 50)
            .unwrap()
            .settings;
        write(&s, 3);
        (vm_dir, s)
    }

    /// Deletes `victim`, stops the merge at step `stop_at`, then settles fully.
    /// Returns whether the stop was reached (false: the merge has fewer steps).
    fn run(victim: &str, stop_at: usize) -> bool {
        let root = tempfile::tempdir().unwrap();
        let (vm_dir, s) = build(root.path());
        let current = RefCell::new(s);
        let want_now: Vec<Vec<u8>> = paths(&current.borrow()).iter().map(|p| hash(p)).collect();
        let t = load(&vm_dir).unwrap();
        let keep = if victim == "A" { "B" } else { "A" };
        let kept = t.visible().find(|n| n.name == keep).unwrap().clone();
        let want_kept: Vec<Vec<u8>> = kept.disks.iter().map(|d| hash(&d.path)).collect();
        delete(&vm_dir, victim, false).unwrap();
        let mut write_current = |slot: Slot, old: &Path, new: &Path| {
            repoint_drive(&mut current.borrow_mut(), slot, old, new);
            Ok(())
        };
        let mut steps = 0;
        let mut hook = |_: &str| {
            steps += 1;
            if steps == stop_at {
                return Err(ApiError::internal("crash"));
            }
            Ok(())
        };
        let first = settle(
            &vm_dir,
            Current::Idle,
            &mut write_current,
            None,
            &mut |_| {},
            &mut vhd::NoProgress,
            &mut hook,
        );
        let stopped = first.is_err();
        // "Restart": repair vm.json from the tree, then settle to the end.
        if let Some(fixed) = reconcile(&vm_dir, &current.borrow()).unwrap() {
            *current.borrow_mut() = fixed;
        }
        settle(
            &vm_dir,
            Current::Idle,
            &mut write_current,
            None,
            &mut |_| {},
            &mut vhd::NoProgress,
            &mut no_hook,
        )
        .unwrap();
        let t = load(&vm_dir).unwrap();
        assert!(t.nodes.iter().all(|n| !n.deleted), "stop {stop_at}: {t:?}");
        let now: Vec<Vec<u8>> = paths(&current.borrow()).iter().map(|p| hash(p)).collect();
        assert!(
            now == want_now,
            "stop {stop_at}: the current state reads differently"
        );
        let kept = t.node(kept.id).unwrap();
        let kept_now: Vec<Vec<u8>> = kept.disks.iter().map(|d| hash(&d.path)).collect();
        assert!(
            kept_now == want_kept,
            "stop {stop_at}: checkpoint {keep} reads differently"
        );
        for p in paths(&current.borrow()) {
            assert!(vhd::ops::check::check(&p, false).unwrap().clean());
        }
        stopped
    }

    #[test]
    fn a_merge_into_a_child_checkpoint_stopped_at_any_step_finishes_on_the_next_settle() {
        let mut n = 1;
        while run("A", n) {
            n += 1;
        }
        assert!(n > 6, "the merge has only {n} steps");
    }

    #[test]
    fn a_merge_into_the_current_state_stopped_at_any_step_finishes_on_the_next_settle() {
        let mut n = 1;
        while run("B", n) {
            n += 1;
        }
        assert!(n > 6, "the merge has only {n} steps");
    }

    /// A checkpoint of a running VM recorded with its layers planned, then a
    /// crash: before the worker made the layers it is taken back, after it
    /// is finished (vm.json re-pointed), and the disks read the same.
    #[test]
    fn a_checkpoint_of_a_running_vm_cut_by_a_crash_is_finished_or_taken_back() {
        for worker_made_them in [false, true] {
            let root = tempfile::tempdir().unwrap();
            let (vm_dir, s) = build(root.path());
            let before: Vec<Vec<u8>> = paths(&s).iter().map(|p| hash(p)).collect();
            let tree_before = load(&vm_dir).unwrap();
            let tell = |intent: &Intent| write_intent(&vm_dir, intent);
            let created =
                create_with(&vm_dir, &s, Some("C".into()), Memory::None, 50, Some(&tell)).unwrap();
            assert!(intent_path(&vm_dir).exists());
            let t = load(&vm_dir).unwrap();
            assert!(t.node(created.node.id).is_some());
            let planned = paths(&created.settings);
            assert!(
                planned.iter().all(|p| !p.exists()),
                "planned only: {planned:?}"
            );
            if worker_made_them {
                for (layer, parent) in planned.iter().zip(paths(&s)) {
                    vhd::create_child(layer, &parent).unwrap();
                }
            }
            // The daemon restarts: vm.json still names the old disks.
            let current = RefCell::new(s.clone());
            let mut write_current = |slot: Slot, old: &Path, new: &Path| {
                repoint_drive(&mut current.borrow_mut(), slot, old, new);
                Ok(())
            };
            let finished = recover_intent(&vm_dir, &mut write_current).unwrap();
            assert_eq!(finished, Some(worker_made_them));
            assert!(!intent_path(&vm_dir).exists());
            let t = load(&vm_dir).unwrap();
            if worker_made_them {
                assert_eq!(paths(&current.borrow()), planned);
                assert_eq!(t.current_parent, Some(created.node.id));
            } else {
                assert_eq!(paths(&current.borrow()), paths(&s));
                assert_eq!(t, tree_before);
                assert!(!tree::node_dir(&vm_dir, created.node.id).exists());
            }
            let now: Vec<Vec<u8>> = paths(&current.borrow()).iter().map(|p| hash(p)).collect();
            assert_eq!(now, before);
            // Nothing left to recover.
            assert_eq!(recover_intent(&vm_dir, &mut write_current).unwrap(), None);
        }
    }

    /// A background checkpoint (memory to come from the worker) cut by a
    /// crash after the worker made the layers: finished, with its memory
    /// state when the file arrived and without it when it did not.
    #[test]
    fn a_background_checkpoint_cut_by_a_crash_keeps_its_memory_only_if_it_arrived() {
        for arrived in [false, true] {
            let root = tempfile::tempdir().unwrap();
            let (vm_dir, s) = build(root.path());
            let tell = |intent: &Intent| write_intent(&vm_dir, intent);
            let created = create_with(&vm_dir, &s, None, Memory::ToCome, 50, Some(&tell)).unwrap();
            assert!(created.node.memory_state);
            let memory = memory_path(&vm_dir, created.node.id);
            assert!(!memory.exists(), "the worker writes it");
            if arrived {
                std::fs::write(&memory, b"state").unwrap();
            }
            for (layer, parent) in paths(&created.settings).iter().zip(paths(&s)) {
                vhd::create_child(layer, &parent).unwrap();
            }
            let current = RefCell::new(s.clone());
            let mut write_current = |slot: Slot, old: &Path, new: &Path| {
                repoint_drive(&mut current.borrow_mut(), slot, old, new);
                Ok(())
            };
            assert_eq!(
                recover_intent(&vm_dir, &mut write_current).unwrap(),
                Some(true)
            );
            let t = load(&vm_dir).unwrap();
            let node = t.node(created.node.id).unwrap();
            assert_eq!(node.memory_state, arrived);
            assert_eq!(paths(&current.borrow()), paths(&created.settings));
        }
    }

    #[test]
    fn memory_to_come_without_planned_layers_is_refused_and_changes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let (vm_dir, s) = build(root.path());
        let before = load(&vm_dir).unwrap();
        let e = create(&vm_dir, &s, None, None, 50).map(drop);
        assert!(e.is_ok());
        let after_one = load(&vm_dir).unwrap();
        assert_ne!(after_one, before);
        let r = create_with(&vm_dir, &s, None, Memory::ToCome, 50, None);
        assert!(r.is_err());
        assert_eq!(load(&vm_dir).unwrap(), after_one);
    }
}
