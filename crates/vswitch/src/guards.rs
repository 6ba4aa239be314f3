//! Per-port guards (Hyper-V's MAC address spoofing, DHCP guard and router guard)
//! as nftables rules in the bridge family, driven through `nft -j` (JSON in and
//! out, never the human syntax).
//!
//! One table of ours, `bridge viridian`:
//! - `ports`, a base chain on the bridge's prerouting hook (every frame entering
//!   any bridge on a port, before it is forwarded or delivered to the host),
//!   whose one rule looks the input port up in the verdict map `port`;
//! - `port`: tap name → `jump <tap name>`;
//! - a chain per port named after its tap, with the rules of its guards;
//! - three named counters per port, `<tap>-mac`, `<tap>-dhcp`, `<tap>-router`,
//!   that its rules count dropped frames in. They are kept when the guards
//!   change, so the counts run for the life of the port.
//!
//! The table is made with the first port and deleted with the last, so a host
//! with no ports has nothing of ours in `nft list ruleset`.

use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// The family and name of our table.
pub const FAMILY: &str = "bridge";
pub const TABLE: &str = "viridian";
const BASE_CHAIN: &str = "ports";
const PORT_MAP: &str = "port";

/// What a port lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGuards {
    /// The adapter's own MAC (six colon-separated hex bytes).
    pub mac: String,
    /// Frames with another source MAC pass.
    pub mac_address_spoofing: bool,
    /// DHCPv4 (UDP source port 67) and DHCPv6 (547) server messages are dropped.
    pub dhcp_guard: bool,
    /// ICMPv6 router advertisements and redirects, and ICMP redirects, are dropped.
    pub router_guard: bool,
}

/// Frames a guard dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub packets: u64,
    pub bytes: u64,
}

/// A port's drops by guard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardDrops {
    pub mac_spoofing: Dropped,
    pub dhcp_guard: Dropped,
    pub router_guard: Dropped,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("adapter guards need nftables, and its `nft` command is not installed; install the nftables package (`apt-get install nftables`)")]
    NftMissing,
    #[error("cannot run `nft`")]
    Spawn(#[source] std::io::Error),
    #[error("nftables refused to {action}: {stderr}")]
    Refused { action: String, stderr: String },
    #[error("nftables answered with JSON this service does not understand ({0})")]
    Output(String),
    #[error(transparent)]
    Name(#[from] crate::SwitchError),
}

fn counter_names(tap: &str) -> [String; 3] {
    [
        format!("{tap}-mac"),
        format!("{tap}-dhcp"),
        format!("{tap}-router"),
    ]
}

/// Runs `nft -j -f -` with `commands`, one transaction: all or nothing.
async fn transact(action: &str, commands: Vec<Value>) -> Result<(), GuardError> {
    let input = json!({ "nftables": commands }).to_string();
    let mut child = tokio::process::Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(GuardError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(GuardError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GuardError::Refused {
            action: action.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn spawn_error(e: std::io::Error) -> GuardError {
    if e.kind() == std::io::ErrorKind::NotFound {
        GuardError::NftMissing
    } else {
        GuardError::Spawn(e)
    }
}

/// Our table as `nft -j list table` gives it (its objects), or `None` when it is
/// not there.
async fn list_table() -> Result<Option<Vec<Value>>, GuardError> {
    let out = tokio::process::Command::new("nft")
        .args(["-j", "list", "table", FAMILY, TABLE])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(spawn_error)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(GuardError::Refused {
            action: format!("list the table {FAMILY} {TABLE}"),
            stderr: stderr.trim().to_string(),
        });
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| GuardError::Output(e.to_string()))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| GuardError::Output("no `nftables` array".into()))?;
    Ok(Some(items))
}

fn obj(kind: &str, name: &str) -> Value {
    json!({ kind: { "family": FAMILY, "table": TABLE, "name": name } })
}

fn rule(chain: &str, expr: Value) -> Value {
    json!({ "add": { "rule": { "family": FAMILY, "table": TABLE, "chain": chain, "expr": expr } } })
}

fn drop_counted(matches: Value, counter: &str) -> Value {
    let mut expr = matches.as_array().cloned().unwrap_or_default();
    expr.push(json!({ "counter": counter }));
    expr.push(json!({ "drop": null }));
    Value::Array(expr)
}

fn eq(protocol: &str, field: &str, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": { "payload": { "protocol": protocol, "field": field } }, "right": right } })
}

/// The commands that make the port `tap`'s chain exactly `g` (and the table,
/// its base chain and the port's counters, where missing).
fn port_commands(tap: &str, g: &PortGuards) -> Vec<Value> {
    let [mac_c, dhcp_c, router_c] = counter_names(tap);
    let mut c = vec![
        json!({ "add": { "table": { "family": FAMILY, "name": TABLE } } }),
        json!({ "add": { "chain": { "family": FAMILY, "table": TABLE, "name": BASE_CHAIN,
            "type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept" } } }),
        json!({ "add": { "map": { "family": FAMILY, "table": TABLE, "name": PORT_MAP,
            "type": "ifname", "map": "verdict" } } }),
        // The base chain's one rule, made again so it is there exactly once.
        json!({ "flush": obj("chain", BASE_CHAIN) }),
        rule(
            BASE_CHAIN,
            json!([{ "vmap": { "key": { "meta": { "key": "iifname" } }, "data": format!("@{PORT_MAP}") } }]),
        ),
        json!({ "add": obj("chain", tap) }),
        json!({ "flush": obj("chain", tap) }),
    ];
    for name in [&mac_c, &dhcp_c, &router_c] {
        // `add` keeps an existing counter's values.
        c.push(json!({ "add": obj("counter", name) }));
    }
    if !g.mac_address_spoofing {
        c.push(rule(
            tap,
            drop_counted(
                json!([{ "match": { "op": "!=", "left": { "payload": { "protocol": "ether", "field": "saddr" } }, "right": g.mac.to_ascii_lowercase() } }]),
                &mac_c,
            ),
        ));
    }
    if g.dhcp_guard {
        for port in [67, 547] {
            c.push(rule(
                tap,
                drop_counted(json!([eq("udp", "sport", json!(port))]), &dhcp_c),
            ));
        }
    }
    if g.router_guard {
        c.push(rule(
            tap,
            drop_counted(
                json!([eq(
                    "icmpv6",
                    "type",
                    json!({ "set": ["nd-router-advert", "nd-redirect"] })
                )]),
                &router_c,
            ),
        ));
        c.push(rule(
            tap,
            drop_counted(json!([eq("icmp", "type", json!("redirect"))]), &router_c),
        ));
    }
    c.push(
        json!({ "add": { "element": { "family": FAMILY, "table": TABLE, "name": PORT_MAP,
        "elem": [[tap, { "jump": { "target": tap } }]] } } }),
    );
    c
}

/// Makes the port `tap`'s guards `g`, in one transaction: at the port's making
/// and at every change (its drop counts are kept).
pub async fn apply(tap: &str, g: &PortGuards) -> Result<(), GuardError> {
    crate::check_ours(tap)?;
    transact(
        &format!("set the guards of the port {tap}"),
        port_commands(tap, g),
    )
    .await
}

/// The ports that have guards now (tap names).
pub async fn ports() -> Result<Vec<String>, GuardError> {
    let Some(items) = list_table().await? else {
        return Ok(Vec::new());
    };
    Ok(port_names(&items))
}

fn port_names(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| i.get("map"))
        .filter(|m| m.get("name").and_then(Value::as_str) == Some(PORT_MAP))
        .flat_map(|m| {
            m.get("elem")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|e| e.get(0).and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// Removes the port `tap`'s guards and counters; with the last port, the whole
/// table. A port without guards is fine.
pub async fn remove(tap: &str) -> Result<(), GuardError> {
    crate::check_ours(tap)?;
    let Some(items) = list_table().await? else {
        return Ok(());
    };
    let ports = port_names(&items);
    let action = format!("remove the guards of the port {tap}");
    if ports.iter().all(|p| p == tap) {
        return transact(
            &action,
            vec![json!({ "delete": { "table": { "family": FAMILY, "name": TABLE } } })],
        )
        .await;
    }
    let has = |kind: &str, name: &str| {
        items
            .iter()
            .filter_map(|i| i.get(kind))
            .any(|o| o.get("name").and_then(Value::as_str) == Some(name))
    };
    let mut c = Vec::new();
    if ports.iter().any(|p| p == tap) {
        c.push(json!({ "delete": { "element": { "family": FAMILY, "table": TABLE, "name": PORT_MAP, "elem": [tap] } } }));
    }
    if has("chain", tap) {
        c.push(json!({ "flush": obj("chain", tap) }));
        c.push(json!({ "delete": obj("chain", tap) }));
    }
    for name in counter_names(tap) {
        if has("counter", &name) {
            c.push(json!({ "delete": obj("counter", &name) }));
        }
    }
    if c.is_empty() {
        return Ok(());
    }
    transact(&action, c).await
}

/// Every port's drops by guard, by tap name.
pub async fn drops() -> Result<Vec<(String, GuardDrops)>, GuardError> {
    let Some(items) = list_table().await? else {
        return Ok(Vec::new());
    };
    let counter = |name: &str| {
        items
            .iter()
            .filter_map(|i| i.get("counter"))
            .find(|o| o.get("name").and_then(Value::as_str) == Some(name))
            .map(|o| Dropped {
                packets: o.get("packets").and_then(Value::as_u64).unwrap_or(0),
                bytes: o.get("bytes").and_then(Value::as_u64).unwrap_or(0),
            })
            .unwrap_or_default()
    };
    Ok(port_names(&items)
        .into_iter()
        .map(|tap| {
            let [m, d, r] = counter_names(&tap);
            let drops = GuardDrops {
                mac_spoofing: counter(&m),
                dhcp_guard: counter(&d),
                router_guard: counter(&r),
            };
            (tap, drops)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_without_guards_drops_only_other_source_macs() {
        let g = PortGuards {
            mac: "52:54:00:AA:BB:CC".into(),
            mac_address_spoofing: false,
            dhcp_guard: false,
            router_guard: false,
        };
        let text = Value::Array(port_commands("vswt-0000000001", &g)).to_string();
        assert!(text.contains("\"right\":\"52:54:00:aa:bb:cc\""), "{text}");
        assert!(!text.contains("sport"), "{text}");
        assert!(!text.contains("nd-router-advert"), "{text}");
        let g = PortGuards {
            mac_address_spoofing: true,
            dhcp_guard: true,
            router_guard: true,
            ..g
        };
        let text = Value::Array(port_commands("vswt-0000000001", &g)).to_string();
        assert!(!text.contains("saddr"), "{text}");
        assert!(
            text.contains("547") && text.contains("nd-redirect"),
            "{text}"
        );
    }
}
