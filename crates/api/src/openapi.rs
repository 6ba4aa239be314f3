//! The OpenAPI 3.0 document, generated from this crate's types and the route table.

use schemars::gen::{SchemaGenerator, SchemaSettings};
use schemars::schema::Schema;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use crate::{checkpoints, disks, error, events, host, jobs, switches, transfer, vms};
use vm_config::{Drive, NetworkAdapter, ProcessorSettings, VmSettings};

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// One endpoint: method, path, what it takes and what it answers.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub request: Option<SchemaFn>,
    /// Success status and body.
    pub status: u16,
    pub response: Option<SchemaFn>,
    pub query: &'static [&'static str],
}

const fn r(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    request: Option<SchemaFn>,
    status: u16,
    response: Option<SchemaFn>,
) -> Route {
    Route {
        method,
        path,
        summary,
        request,
        status,
        response,
        query: &[],
    }
}

/// Every endpoint of `/v1`. The daemon's router serves exactly these.
pub fn routes() -> Vec<Route> {
    vec![
        r(
            "get",
            "/v1/host",
            "Host version, build, accelerator and limits",
            None,
            200,
            Some(s::<host::HostInfo>),
        ),
        r(
            "patch",
            "/v1/host",
            "Change the processor defaults for new VMs",
            Some(s::<host::UpdateHostRequest>),
            200,
            Some(s::<host::HostInfo>),
        ),
        r("get", "/v1/openapi.json", "This document", None, 200, None),
        r(
            "get",
            "/v1/metrics",
            "Every running VM's counters, in Prometheus text format",
            None,
            200,
            None,
        ),
        r(
            "get",
            "/v1/vms/{vm}/measure",
            "Averages since the VM started (Measure-VM)",
            None,
            200,
            Some(s::<vms::VmMeasurement>),
        ),
        r(
            "get",
            "/v1/vms",
            "List VMs, damaged ones included",
            None,
            200,
            Some(s::<vms::VmList>),
        ),
        r(
            "post",
            "/v1/vms",
            "Create a VM",
            Some(s::<vms::CreateVmRequest>),
            201,
            Some(s::<vms::Vm>),
        ),
        r(
            "get",
            "/v1/vms/{vm}",
            "A VM's settings and runtime",
            None,
            200,
            Some(s::<vms::Vm>),
        ),
        r(
            "patch",
            "/v1/vms/{vm}",
            "Change name, memory, notes or boot order",
            Some(s::<vms::UpdateVmRequest>),
            200,
            Some(s::<vms::Vm>),
        ),
        Route {
            query: &["force", "delete_disks"],
            ..r(
                "delete",
                "/v1/vms/{vm}",
                "Delete a VM (job): checkpoints merged into the kept disks; force=true turns it off (or discards its saved state); delete_disks=true deletes the disks no other VM uses",
                None,
                202,
                Some(s::<jobs::Job>),
            )
        },
        r(
            "post",
            "/v1/vms/{vm}/move-storage",
            "Move the VM's disks and checkpoint disks to another folder (job, cancellable until it commits)",
            Some(s::<vms::MoveStorageRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/upgrade",
            "Move an Off VM to the current configuration version (its virtual hardware; a saved state resumes only on its own version)",
            None,
            200,
            Some(s::<vms::Vm>),
        ),
        r(
            "put",
            "/v1/vms/{vm}/settings",
            "Replace all settings (repairs a damaged VM)",
            Some(s::<VmSettings>),
            200,
            Some(s::<vms::Vm>),
        ),
        r(
            "get",
            "/v1/vms/{vm}/processor",
            "Processor settings",
            None,
            200,
            Some(s::<ProcessorSettings>),
        ),
        r(
            "patch",
            "/v1/vms/{vm}/processor",
            "Change processor count, reserve, limit, weight",
            Some(s::<vms::UpdateProcessorRequest>),
            200,
            Some(s::<ProcessorSettings>),
        ),
        r(
            "get",
            "/v1/vms/{vm}/drives",
            "Drives",
            None,
            200,
            Some(s::<vms::DriveList>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/drives",
            "Attach a hard disk, pass-through disk or DVD drive",
            Some(s::<vms::AddDriveRequest>),
            201,
            Some(s::<Drive>),
        ),
        r(
            "put",
            "/v1/vms/{vm}/drives/{controller}/{number}/{location}",
            "Change a drive's media",
            Some(s::<vms::UpdateDriveRequest>),
            200,
            Some(s::<Drive>),
        ),
        r(
            "delete",
            "/v1/vms/{vm}/drives/{controller}/{number}/{location}",
            "Remove a drive",
            None,
            204,
            None,
        ),
        r(
            "get",
            "/v1/vms/{vm}/network-adapters",
            "Network adapters",
            None,
            200,
            Some(s::<vms::NetworkAdapterList>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/network-adapters",
            "Add a network adapter",
            Some(s::<vms::AddNetworkAdapterRequest>),
            201,
            Some(s::<NetworkAdapter>),
        ),
        r(
            "delete",
            "/v1/vms/{vm}/network-adapters/{mac}",
            "Remove a network adapter",
            None,
            204,
            None,
        ),
        r(
            "patch",
            "/v1/vms/{vm}/network-adapters/{mac}",
            "Change a network adapter's guards and maximum bandwidth (a running VM's port at once)",
            Some(s::<switches::UpdateNetworkAdapterRequest>),
            200,
            Some(s::<NetworkAdapter>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/network-adapters/{mac}/connect",
            "Connect a network adapter to a virtual switch (an Off VM's at its next start; a running or paused VM's at once: its port moves to the switch)",
            Some(s::<switches::ConnectAdapterRequest>),
            200,
            Some(s::<NetworkAdapter>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/network-adapters/{mac}/disconnect",
            "Disconnect a network adapter from its virtual switch (a running VM's at once)",
            None,
            200,
            Some(s::<NetworkAdapter>),
        ),
        r(
            "get",
            "/v1/switches",
            "List virtual switches",
            None,
            200,
            Some(s::<switches::SwitchList>),
        ),
        r(
            "post",
            "/v1/switches",
            "Create a virtual switch (private, internal or NAT) and its bridge on the host",
            Some(s::<switches::CreateSwitchRequest>),
            201,
            Some(s::<switches::Switch>),
        ),
        r(
            "get",
            "/v1/switches/{switch}",
            "A virtual switch, by name or id",
            None,
            200,
            Some(s::<switches::Switch>),
        ),
        r(
            "patch",
            "/v1/switches/{switch}",
            "Rename a virtual switch or replace its host addresses (or a NAT switch's DHCP range)",
            Some(s::<switches::UpdateSwitchRequest>),
            200,
            Some(s::<switches::Switch>),
        ),
        r(
            "get",
            "/v1/switches/{switch}/leases",
            "A NAT switch's DHCP leases, with the VM and adapter owning each MAC (other switches: an empty list and the reason)",
            None,
            200,
            Some(s::<switches::LeaseList>),
        ),
        Route {
            query: &["force"],
            ..r(
                "delete",
                "/v1/switches/{switch}",
                "Delete a virtual switch (InUse while adapters are on it; force=true disconnects them)",
                None,
                204,
                None,
            )
        },
        Route {
            query: &["limit", "after"],
            ..r(
                "get",
                "/v1/jobs",
                "Jobs held in full, oldest first, a page at a time (next_after: the cursor of the next page)",
                None,
                200,
                Some(s::<jobs::JobList>),
            )
        },
        r(
            "get",
            "/v1/jobs/{id}",
            "A job (410 JobExpired with the outcome once expired)",
            None,
            200,
            Some(s::<jobs::Job>),
        ),
        r(
            "delete",
            "/v1/jobs/{id}",
            "Cancel a job",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        Route {
            query: &["timeout"],
            ..r(
                "get",
                "/v1/jobs/{id}/wait",
                "Wait up to timeout seconds for a job to finish (at most 300 by default, viridiand --max-wait; a longer timeout is shortened to it, and the job's state says whether it finished)",
                None,
                200,
                Some(s::<jobs::Job>),
            )
        },
        r(
            "get",
            "/v1/jobs/{id}/outcome",
            "A job's outcome, kept after the job expires",
            None,
            200,
            Some(s::<jobs::JobOutcome>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/start",
            "Start the VM, or resume it from its saved state (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/stop",
            "Turn the VM off at once (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/shutdown",
            "Press the ACPI power button; fails if the guest has not stopped in time (job)",
            Some(s::<vms::VmActionRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/save",
            "Save memory and device state to the VM's folder; state Saved (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/pause",
            "Pause the VM's processors (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/resume",
            "Resume a paused VM (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/restart",
            "Reset the VM (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/export",
            "Export the VM (Off, Saved or Running) with its checkpoints into destination/<name>/ (job)",
            Some(s::<transfer::ExportRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/import",
            "Import an exported VM; every problem found is reported at once (ImportIncompatible, details: ImportReport) before anything changes (job)",
            Some(s::<transfer::ImportRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/vms/import/check",
            "The compatibility report of an import, changing nothing",
            Some(s::<transfer::ImportRequest>),
            200,
            Some(s::<transfer::ImportReport>),
        ),
        r(
            "get",
            "/v1/vms/{vm}/checkpoints",
            "The checkpoint tree: checkpoints, the current state's place, pending merges",
            None,
            200,
            Some(s::<checkpoints::CheckpointTree>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/checkpoints",
            "Take a checkpoint; the job's affected elements name it (job)",
            Some(s::<checkpoints::CreateCheckpointRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "patch",
            "/v1/vms/{vm}/checkpoints/{checkpoint}",
            "Rename a checkpoint",
            Some(s::<checkpoints::RenameCheckpointRequest>),
            200,
            Some(s::<checkpoints::Checkpoint>),
        ),
        r(
            "post",
            "/v1/vms/{vm}/checkpoints/{checkpoint}/apply",
            "Apply a checkpoint (VM Off or Saved; else InvalidState) (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "delete",
            "/v1/vms/{vm}/checkpoints/{checkpoint}",
            "Delete a checkpoint; its disks merge into its only descendant, or wait (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "delete",
            "/v1/vms/{vm}/checkpoints/{checkpoint}/subtree",
            "Delete a checkpoint and every checkpoint below it (job)",
            None,
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "get",
            "/v1/vms/{vm}/console/log",
            "The serial console log, raw bytes (size-capped, kept after the VM stops)",
            None,
            200,
            None,
        ),
        r(
            "post",
            "/v1/diagnostics/sleep-job",
            "Start a job that only waits",
            Some(s::<jobs::SleepJobRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "get",
            "/v1/events",
            "Server-sent events: job and VM changes in order; a listener that falls behind gets a last `event: overflow` frame with {\"reason\"} and the stream ends",
            None,
            200,
            Some(s::<events::Event>),
        ),
        r(
            "post",
            "/v1/disks/create",
            "Create a VHD/VHDX (job)",
            Some(s::<disks::CreateDiskRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/disks/merge",
            "Merge a differencing disk into its parent (job)",
            Some(s::<disks::MergeDiskRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/disks/convert",
            "Convert between VHD/VHDX, fixed/dynamic (job)",
            Some(s::<disks::ConvertDiskRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/disks/compact",
            "Give unused blocks back to the host (job)",
            Some(s::<disks::CompactDiskRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
        r(
            "post",
            "/v1/disks/resize",
            "Change a disk's virtual size (job)",
            Some(s::<disks::ResizeDiskRequest>),
            202,
            Some(s::<jobs::Job>),
        ),
    ]
}

/// The bounds every client meets, as the document states them.
const LIMITS: &str =
    "Limits (viridiand flags, defaults in brackets): request bodies of at most 1 MiB \
(a larger Content-Length is answered 413 PayloadTooLarge before anything is read); a whole body \
within --body-timeout [30 s] (else 408 RequestTimeout); TCP connections --max-connections [1024] \
in all and --max-connections-per-client [64] per address, the unix socket --max-unix-connections \
[256] of its own (a connection over its cap is closed at once, before TLS; caps are lowered to fit \
the file-descriptor limit); the TLS handshake within --tls-handshake-timeout [10 s]; running jobs \
--max-running-jobs [4096] in all and --max-running-jobs-per-client [1024] per client (a TCP \
address; the unix socket is one local client), event listeners --max-event-listeners [64], both \
answered 429 TooManyRequests with Retry-After; a wait of at most --max-wait [300 s]; GET /v1/jobs \
pages of at most 1000 jobs. /v1/diagnostics is served over TCP only with --enable-diagnostics.";

fn query_parameter(name: &str) -> Value {
    let (schema, description) = match name {
        "timeout" => (
            json!({"type": "number", "minimum": 0}),
            "seconds; at most --max-wait (300 by default), a longer one is shortened to it",
        ),
        "limit" => (
            json!({"type": "integer", "minimum": 1, "maximum": u64::MAX}),
            "most jobs in this page: 1000 by default and at most (a bigger limit is shortened to 1000)",
        ),
        "after" => (
            json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}),
            "the next_after of the previous page",
        ),
        _ => (json!({"type": "boolean"}), ""),
    };
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

/// A path segment's schema: what the router takes there.
fn path_parameter(name: &str) -> Value {
    match name {
        "controller" => json!({"type": "string", "enum": ["ide", "scsi"]}),
        "number" | "location" => json!({"type": "integer", "minimum": 0, "maximum": 255}),
        "mac" => json!({"type": "string", "pattern": MAC_PATTERN}),
        "id" => json!({"type": "string", "format": "uuid"}),
        _ => json!({"type": "string", "minLength": 1}),
    }
}

/// The routes whose body may be left out (a default request).
fn body_is_optional(route: &Route) -> bool {
    route.method == "post"
        && (route.path == "/v1/vms/{vm}/checkpoints"
            || [
                "start", "stop", "shutdown", "save", "pause", "resume", "restart",
            ]
            .iter()
            .any(|a| route.path == format!("/v1/vms/{{vm}}/{a}")))
}

/// Six hex bytes with colons, not multicast (the first byte even), not all zero.
pub const MAC_PATTERN: &str =
    "^(?!00:00:00:00:00:00$)[0-9A-Fa-f][02468AaCcEe](:[0-9A-Fa-f]{2}){5}$";

/// A path: not empty, no control characters.
const PATH_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$";
/// An absolute path.
const ABSOLUTE_PATH_PATTERN: &str = "^/[^\\u0000-\\u001f\\u007f-\\u009f]*$";

/// A character class of the characters names may not hold (control, format,
/// private-use, noncharacters: `vm_config::validate::INVISIBLE_RANGES`) in the
/// Basic Multilingual Plane, as `\\uXXXX` escapes. The service also refuses
/// such characters beyond it (format characters, the private-use planes), which
/// ECMA 262 patterns without the `u` flag cannot name, nor can the test
/// generators we hold the document to.
fn invisible_class() -> String {
    let mut class = String::from("\\u0000-\\u001f\\u007f-\\u009f");
    let mut push = |lo: u32, hi: u32| {
        for (i, u) in [lo, hi].into_iter().enumerate() {
            if i == 1 && lo == hi {
                break;
            }
            if i == 1 {
                class.push('-');
            }
            class.push_str(&format!("\\u{u:04x}"));
        }
    };
    for (lo, hi, _) in vm_config::validate::INVISIBLE_RANGES
        .iter()
        .filter(|(_, hi, _)| *hi <= 0xFFFF)
    {
        push(*lo, *hi);
    }
    push(0xFFFE, 0xFFFF);
    class
}

/// A VM name (`vm_config::validate::validate_new_name`): 1–100 visible characters,
/// no path separator, not only dots, no white space at either end, not a UUID
/// (hyphenated, `urn:uuid:` or 32 hex digits; the braced form `{...}`, which the
/// service refuses too, is left out: the generators we test with cannot draw from
/// a pattern that names it).
fn vm_name_pattern() -> String {
    let hex = |n: usize| format!("[0-9A-Fa-f]{{{n}}}");
    let hyphenated = format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12));
    format!(
        "^(?!\\s)(?!.*\\s$)(?!\\.\\.?$)(?!({hyphenated}|urn:uuid:{hyphenated}|{})$)[^/\\\\{}]{{1,{}}}$",
        hex(32),
        invisible_class(),
        vm_config::validate::MAX_NAME_CHARS
    )
}

/// A checkpoint name: 1–100 visible characters, not only white space.
fn checkpoint_name_pattern() -> String {
    format!(
        "^(?!\\s*$)[^{}]{{1,{}}}$",
        invisible_class(),
        vm_config::validate::MAX_CHECKPOINT_NAME_CHARS
    )
}

/// Adds to the generated schemas the limits the handlers enforce that the types
/// do not say: integer widths, MAC, name and path patterns, the shutdown time-out.
fn constrain(schemas: &mut Map<String, Value>) {
    let vm_name = vm_name_pattern();
    let checkpoint_name = checkpoint_name_pattern();
    let rules: Vec<(&str, &str, Value)> = vec![
        ("NetworkAdapter", "mac", json!({"pattern": MAC_PATTERN})),
        (
            "AddNetworkAdapterRequest",
            "mac",
            json!({"pattern": MAC_PATTERN}),
        ),
        ("BootEntry", "mac", json!({"pattern": MAC_PATTERN})),
        (
            "UpdateHostRequest",
            "mac_address_minimum",
            json!({"pattern": MAC_PATTERN}),
        ),
        (
            "UpdateHostRequest",
            "mac_address_maximum",
            json!({"pattern": MAC_PATTERN}),
        ),
        ("CreateVmRequest", "name", json!({"pattern": vm_name})),
        ("UpdateVmRequest", "name", json!({"pattern": vm_name})),
        ("VmSettings", "name", json!({"pattern": vm_name})),
        (
            "ImportRequest",
            "name",
            json!({"pattern": vm_name, "minLength": 1}),
        ),
        (
            "CreateCheckpointRequest",
            "name",
            json!({"pattern": checkpoint_name}),
        ),
        (
            "RenameCheckpointRequest",
            "name",
            json!({"pattern": checkpoint_name}),
        ),
        (
            "CreateDiskRequest",
            "path",
            json!({"pattern": PATH_PATTERN}),
        ),
        (
            "CreateDiskRequest",
            "parent",
            json!({"pattern": PATH_PATTERN}),
        ),
        ("MergeDiskRequest", "path", json!({"pattern": PATH_PATTERN})),
        (
            "ConvertDiskRequest",
            "path",
            json!({"pattern": PATH_PATTERN}),
        ),
        (
            "ConvertDiskRequest",
            "destination",
            json!({"pattern": PATH_PATTERN}),
        ),
        (
            "CompactDiskRequest",
            "path",
            json!({"pattern": PATH_PATTERN}),
        ),
        (
            "ResizeDiskRequest",
            "path",
            json!({"pattern": PATH_PATTERN}),
        ),
        ("DriveMedia", "path", json!({"pattern": PATH_PATTERN})),
        ("DriveMedia", "device", json!({"pattern": PATH_PATTERN})),
        ("DriveMedia", "iso", json!({"pattern": PATH_PATTERN})),
        (
            "ExportRequest",
            "destination",
            json!({"pattern": ABSOLUTE_PATH_PATTERN}),
        ),
        (
            "MoveStorageRequest",
            "destination",
            json!({"pattern": ABSOLUTE_PATH_PATTERN}),
        ),
        (
            "ImportRequest",
            "source",
            json!({"pattern": ABSOLUTE_PATH_PATTERN}),
        ),
        (
            "ImportRequest",
            "destination",
            json!({"pattern": ABSOLUTE_PATH_PATTERN}),
        ),
        (
            "VmActionRequest",
            "timeout_seconds",
            json!({"minimum": 1, "maximum": crate::vms::MAX_SHUTDOWN_TIMEOUT_SECONDS}),
        ),
    ];
    for (name, schema) in schemas.iter_mut() {
        for_each_property(schema, &mut |prop, p| {
            let max = match p.get("format").and_then(Value::as_str) {
                Some("uint8") => Some(json!(u8::MAX)),
                Some("uint16") => Some(json!(u16::MAX)),
                Some("uint32") => Some(json!(u32::MAX)),
                Some("uint64") => Some(json!(u64::MAX)),
                _ => None,
            };
            if let (Some(max), Some(obj)) = (max, p.as_object_mut()) {
                obj.entry("maximum").or_insert(max);
            }
            for (_, _, extra) in rules.iter().filter(|(s, q, _)| s == name && *q == prop) {
                if let (Some(obj), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
                    obj.extend(extra.clone());
                }
            }
        });
    }
}

/// Calls `f` with every property of an object schema, also inside `oneOf`/`allOf`.
fn for_each_property(schema: &mut Value, f: &mut dyn FnMut(&str, &mut Value)) {
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for (k, v) in props.iter_mut() {
            f(k, v);
        }
    }
    for key in ["oneOf", "allOf", "anyOf"] {
        if let Some(parts) = schema.get_mut(key).and_then(Value::as_array_mut) {
            for part in parts {
                for_each_property(part, f);
            }
        }
    }
}

fn json_content(schema: Schema) -> Value {
    json!({ "application/json": { "schema": schema } })
}

/// The whole document as JSON.
/// One server-sent event as a client's reader sees it (`id`, `event`, `data` as
/// text): Open API 3.0 has `schema` describe each event of a stream, its `data` a
/// JSON text (`contentMediaType`) holding an `Event`, or for the last frame of a
/// listener that fell behind, `event: overflow` with an `Overflow`.
fn sse_frame(event: Schema, overflow: Schema) -> Value {
    let data = |content: Schema| json!({"type": "string", "contentMediaType": "application/json", "contentSchema": content});
    json!({
        "oneOf": [
            {
                "type": "object",
                "required": ["id", "event", "data"],
                "properties": {
                    "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the event's `seq`"},
                    "event": {"type": "string", "enum": events::EventBody::NAMES},
                    "data": data(event)
                }
            },
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": [events::OVERFLOW]},
                    "data": data(overflow)
                }
            }
        ]
    })
}

pub fn document() -> Value {
    let mut gen = SchemaSettings::openapi3().into_generator();
    let error_schema = s::<error::ErrorBody>(&mut gen);
    let mut paths: Map<String, Value> = Map::new();
    for route in routes() {
        let mut op = Map::new();
        op.insert("summary".into(), json!(route.summary));
        op.insert(
            "operationId".into(),
            json!(format!(
                "{}{}",
                route.method,
                route.path.replace(['/', '{', '}', '.', '-'], "_")
            )),
        );
        let mut params: Vec<Value> = Vec::new();
        for seg in route.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                params.push(json!({"name": name, "in": "path", "required": true, "schema": path_parameter(name)}));
            }
        }
        for q in route.query {
            params.push(query_parameter(q));
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = route.request {
            op.insert(
                "requestBody".into(),
                json!({"required": !body_is_optional(&route), "content": json_content(req(&mut gen))}),
            );
        }
        let mut ok = json!({"description": "Success"});
        if let Some(resp) = route.response {
            ok["content"] = if route.path == "/v1/events" {
                json!({"text/event-stream": {"schema": sse_frame(resp(&mut gen), s::<events::Overflow>(&mut gen))}})
            } else {
                json_content(resp(&mut gen))
            };
        }
        if route.status == 202 {
            ok["headers"] =
                json!({"Location": {"description": "/v1/jobs/<id>", "schema": {"type": "string"}}});
        }
        let mut responses = Map::new();
        responses.insert(route.status.to_string(), ok);
        if (route.status == 202 && !route.path.starts_with("/v1/jobs"))
            || route.path == "/v1/events"
        {
            responses.insert(
                "429".into(),
                json!({
                    "description": "TooManyRequests: the cap on running jobs (in all or of this client) or on event listeners is reached",
                    "headers": {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}},
                    "content": json_content(error_schema.clone())
                }),
            );
        }
        responses.insert(
            "default".into(),
            json!({"description": "Error with a stable code", "content": json_content(error_schema.clone())}),
        );
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method] = Value::Object(op);
    }
    let mut schemas = serde_json::to_value(gen.definitions()).unwrap_or(Value::Null);
    if let Some(all) = schemas.as_object_mut() {
        constrain(all);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Viridian management API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": LIMITS,
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{}, {"bearer": []}]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_parses_as_openapi_3_and_names_every_route() {
        let doc = document();
        let parsed: openapiv3::OpenAPI =
            serde_json::from_value(doc.clone()).expect("valid OpenAPI 3.0");
        for route in routes() {
            let item = parsed
                .paths
                .paths
                .get(route.path)
                .unwrap_or_else(|| panic!("{} missing", route.path));
            let item = item.as_item().expect("inline path item");
            let op = match route.method {
                "get" => &item.get,
                "post" => &item.post,
                "put" => &item.put,
                "patch" => &item.patch,
                "delete" => &item.delete,
                m => panic!("unexpected method {m}"),
            };
            assert!(op.is_some(), "{} {} missing", route.method, route.path);
        }
    }

    #[test]
    fn every_schema_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "Vm",
            "VmSettings",
            "Job",
            "JobOutcome",
            "ErrorBody",
            "ErrorCode",
            "HostInfo",
            "Event",
            "CreateDiskRequest",
            "VmMeasurement",
            "DriveUse",
            "DriveMeasurement",
            "DriveIoTotals",
        ] {
            assert!(schemas.contains_key(name), "schema {name} missing");
        }
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(schemas.contains_key(name), "dangling $ref to {name}");
        }
    }

    #[test]
    fn the_document_states_the_limits_clients_meet() {
        let doc = document();
        let jobs = &doc["paths"]["/v1/jobs"]["get"]["parameters"];
        let limit = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap();
        assert!(limit["description"].as_str().unwrap().contains("at most"));
        let wait = &doc["paths"]["/v1/jobs/{id}/wait"]["get"]["parameters"][1];
        assert!(wait["description"].as_str().unwrap().contains("at most"));
        for (path, method) in [("/v1/diagnostics/sleep-job", "post"), ("/v1/events", "get")] {
            let r429 = &doc["paths"][path][method]["responses"]["429"];
            assert!(r429["headers"]["Retry-After"].is_object(), "{path}");
        }
        assert!(doc["paths"]["/v1/jobs/{id}"]["delete"]["responses"]["429"].is_null());
        assert!(doc["info"]["description"]
            .as_str()
            .unwrap()
            .contains("--max-connections"));
    }
}
