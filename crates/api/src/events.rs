//! `GET /v1/events`: server-sent events, one JSON `Event` per `data:` line.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::jobs::Job;
use crate::vms::VmSummary;

/// One change. `seq` increases by one per event; a gap never happens: a listener
/// that falls behind is disconnected instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// A job was submitted or changed state or percent.
    Job { job: Job },
    /// A VM was created or its settings or state changed.
    Vm { vm: VmSummary },
    /// A VM was deleted.
    VmDeleted { id: Uuid },
}

/// The data of the last frame a listener that fell behind gets (`event: overflow`),
/// after which the stream ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Overflow {
    pub reason: String,
}

/// The SSE `event:` name of the overflow frame.
pub const OVERFLOW: &str = "overflow";

impl EventBody {
    /// Every `event:` name an `Event` frame carries (`name` of each variant).
    pub const NAMES: [&'static str; 3] = ["job", "vm", "vm_deleted"];

    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            EventBody::Job { .. } => "job",
            EventBody::Vm { .. } => "vm",
            EventBody::VmDeleted { .. } => "vm_deleted",
        }
    }
}
