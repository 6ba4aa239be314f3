//! `checkpoints.json` in a VM's folder: the checkpoint tree, versioned, written
//! atomically. Each checkpoint's own files (settings copy, memory state, the
//! differencing disks made when it was taken or applied) live in
//! `Snapshots/<checkpoint-id>/`.
//!
//! A deleted checkpoint whose disks could not be merged yet stays in the tree with
//! `deleted: true`: that flag is the durable merge intent. It is written before a
//! merge starts, and every step of the merge can run again after a crash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_config::Slot;

/// The schema version this build writes. Older versions are upgraded on load.
///
/// - 1: the first.
/// - 2: `layers_dir` (checkpoint layers outside the VM's folder, after a storage
///   move or an import in place); a version-1 tree has none.
pub const SCHEMA_VERSION: u32 = 2;
pub const TREE_FILE: &str = "checkpoints.json";
pub const SNAPSHOTS_FOLDER: &str = "Snapshots";
pub const SETTINGS_FILE: &str = "settings.json";

/// A disk of a tree node: the file holding the disk in `slot` as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDisk {
    pub slot: Slot,
    pub path: PathBuf,
}

/// A checkpoint, or a deleted one whose disks wait to be merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: Uuid,
    pub name: String,
    pub parent: Option<Uuid>,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The frozen disks: read-only parents of the layers above them.
    pub disks: Vec<NodeDisk>,
    /// `Snapshots/<id>/saved-state.bin` holds memory and device state.
    #[serde(default)]
    pub memory_state: bool,
    /// Deleted: settings and memory state are gone; the disks wait to be merged.
    #[serde(default)]
    pub deleted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// The node the VM's current state descends from directly.
    pub current_parent: Option<Uuid>,
    /// The current state's disks as of the last tree change: lets a start after a
    /// crash between writing this file and `vm.json` repair `vm.json`.
    #[serde(default)]
    pub current_disks: Vec<NodeDisk>,
    /// In creation order.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Where the checkpoints' disk layers live when not in the VM's folder (after
    /// `vm move-storage`): `<layers_dir>/<checkpoint-id>/`. Absent: `Snapshots/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_dir: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeFile {
    schema_version: u32,
    #[serde(flatten)]
    tree: Tree,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("cannot read the checkpoint tree {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the checkpoint tree {path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("the checkpoint tree {path} has schema_version {found}, newer than this Viridian understands (up to {SCHEMA_VERSION}); upgrade Viridian")]
    TooNew { path: PathBuf, found: u64 },
    #[error("cannot write the checkpoint tree {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn tree_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(TREE_FILE)
}

pub fn node_dir(vm_dir: &Path, id: Uuid) -> PathBuf {
    vm_dir.join(SNAPSHOTS_FOLDER).join(id.to_string())
}

/// The folder holding checkpoint `id`'s disk layers.
pub fn layer_dir(vm_dir: &Path, t: &Tree, id: Uuid) -> PathBuf {
    match &t.layers_dir {
        Some(d) => d.join(id.to_string()),
        None => node_dir(vm_dir, id),
    }
}

/// Whether `path` is a disk layer the checkpoint code made (and may delete): under
/// the VM's `Snapshots/` or under the tree's `layers_dir`. Never a disk the user gave.
/// Paths resolved from relative parent locators (`a/b/../../x.vhd`) count where
/// they lead.
pub fn owns_layer(vm_dir: &Path, t: &Tree, path: &Path) -> bool {
    let path = lexical(path);
    path.starts_with(lexical(&vm_dir.join(SNAPSHOTS_FOLDER)))
        || t.layers_dir
            .as_ref()
            .is_some_and(|d| path.starts_with(lexical(d)))
}

/// `path` with `.` and `..` resolved without looking at the file system.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Reads the tree of the VM in `vm_dir`; an absent file is an empty tree.
pub fn load(vm_dir: &Path) -> Result<Tree, TreeError> {
    let path = tree_path(vm_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tree::default()),
        Err(source) => return Err(TreeError::Read { path, source }),
    };
    let parse = |reason: String| TreeError::Parse {
        path: path.clone(),
        reason,
    };
    let (value, _version) =
        vm_config::file::versioned(&bytes, SCHEMA_VERSION).map_err(|e| match e {
            vm_config::file::Versioned::Parse(reason) => parse(reason),
            vm_config::file::Versioned::TooNew(found) => TreeError::TooNew {
                path: path.clone(),
                found,
            },
        })?;
    // Version 1 is the first; later versions add upgrade steps here, oldest first.
    let file: TreeFile = serde_json::from_value(value).map_err(|e| parse(e.to_string()))?;
    file.tree.check().map_err(parse)?;
    Ok(file.tree)
}

/// Writes the tree atomically (temp file, fsync, rename, fsync of the folder).
pub fn save(vm_dir: &Path, tree: &Tree) -> Result<(), TreeError> {
    let path = tree_path(vm_dir);
    let file = TreeFile {
        schema_version: SCHEMA_VERSION,
        tree: tree.clone(),
    };
    let write = |source| TreeError::Write {
        path: path.clone(),
        source,
    };
    vm_config::file::write_json_atomic(&path, &file).map_err(write)
}

impl Tree {
    /// Every parent named exists, and no node is its own ancestor.
    fn check(&self) -> Result<(), String> {
        for n in &self.nodes {
            let mut seen = 0;
            let mut cur = n.parent;
            while let Some(p) = cur {
                let Some(parent) = self.node(p) else {
                    return Err(format!(
                        "checkpoint {} names a parent {p} that is not in the tree",
                        n.id
                    ));
                };
                seen += 1;
                if seen > self.nodes.len() {
                    return Err(format!("checkpoint {} is its own ancestor", n.id));
                }
                cur = parent.parent;
            }
        }
        if let Some(p) = self.current_parent {
            if self.node(p).is_none() {
                return Err(format!("the current state's parent {p} is not in the tree"));
            }
        }
        Ok(())
    }

    pub fn node(&self, id: Uuid) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn node_mut(&mut self, id: Uuid) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.id == id)
    }

    /// Direct children: the nodes whose parent is `id`, and the current state
    /// (`Child::Current`) when it descends from `id`.
    pub fn children(&self, id: Uuid) -> Vec<Child> {
        let mut out: Vec<Child> = self
            .nodes
            .iter()
            .filter(|n| n.parent == Some(id))
            .map(|n| Child::Node(n.id))
            .collect();
        if self.current_parent == Some(id) {
            out.push(Child::Current);
        }
        out
    }

    /// `id` and every node below it.
    pub fn subtree(&self, id: Uuid) -> Vec<Uuid> {
        let mut out = vec![id];
        let mut i = 0;
        while i < out.len() {
            let cur = out[i];
            out.extend(
                self.nodes
                    .iter()
                    .filter(|n| n.parent == Some(cur))
                    .map(|n| n.id),
            );
            i += 1;
        }
        out
    }

    /// The nearest visible (not deleted) node at or above `id`.
    pub fn visible_at_or_above(&self, mut id: Option<Uuid>) -> Option<Uuid> {
        while let Some(i) = id {
            let n = self.node(i)?;
            if !n.deleted {
                return Some(i);
            }
            id = n.parent;
        }
        None
    }

    pub fn visible(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.deleted)
    }

    /// Whether any node's disk or the current state's disk is `path`.
    pub fn uses(&self, path: &Path) -> bool {
        self.nodes
            .iter()
            .flat_map(|n| &n.disks)
            .chain(&self.current_disks)
            .any(|d| d.path == path)
    }
}

/// A direct descendant in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child {
    Node(Uuid),
    Current,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_round_trips_and_an_absent_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Tree::default());
        let a = Uuid::new_v4();
        let tree = Tree {
            current_parent: Some(a),
            current_disks: vec![],
            layers_dir: None,
            nodes: vec![Node {
                id: a,
                name: "A".into(),
                parent: None,
                created_ms: 1,
                disks: vec![],
                memory_state: false,
                deleted: false,
            }],
        };
        save(dir.path(), &tree).unwrap();
        assert_eq!(load(dir.path()).unwrap(), tree);
        let text = std::fs::read_to_string(tree_path(dir.path())).unwrap();
        assert!(text.contains(&format!("\"schema_version\": {SCHEMA_VERSION}")));
    }

    #[test]
    fn a_newer_schema_or_a_dangling_parent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(tree_path(dir.path()), r#"{"schema_version": 9}"#).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(TreeError::TooNew { found: 9, .. })
        ));
        std::fs::write(
            tree_path(dir.path()),
            format!(
                r#"{{"schema_version": 1, "current_parent": "{}"}}"#,
                Uuid::new_v4()
            ),
        )
        .unwrap();
        assert!(matches!(load(dir.path()), Err(TreeError::Parse { .. })));
    }

    /// A tree written by the schema-1 daemon (kept in vm_config's test data) loads.
    #[test]
    fn a_schema1_tree_loads_with_its_nodes_and_no_layers_dir() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../vm_config/tests/data/v1/web01.checkpoints.json");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&fixture, tree_path(dir.path())).unwrap();
        let t = load(dir.path()).unwrap();
        let names: Vec<&str> = t.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["base", "two"]);
        assert_eq!(t.current_disks.len(), 2);
        assert_eq!(t.layers_dir, None);
        save(dir.path(), &t).unwrap();
        assert_eq!(load(dir.path()).unwrap(), t);
    }
}
