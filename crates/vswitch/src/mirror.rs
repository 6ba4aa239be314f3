//! Port mirroring (Hyper-V's `-PortMirroring Source|Destination`): every frame a
//! source port sends or is sent is copied to each destination port of the same
//! switch. One nftables table per switch in the `netdev` family,
//! `viridian-mirror-<8 hex>` (the bridge's hex): per source tap an ingress chain
//! (frames from its VM, before the bridge and its guards) and an egress chain
//! (frames to its VM), each `dup to` every destination tap. A switch without
//! both kinds of port has no table. Written with `nft -f -` in one transaction.

use crate::nat::{NatError, Nft};

/// What every mirror table of ours is called before the switch's hex.
pub const TABLE_PREFIX: &str = "viridian-mirror-";

/// The mirror table of the switch whose bridge is `bridge`.
pub fn table_name(bridge: &str) -> String {
    let hex = bridge.strip_prefix("vsw-").unwrap_or(bridge);
    format!("{TABLE_PREFIX}{hex}")
}

/// The nft script that makes the switch's mirror table exactly this (removed
/// when there is nothing to mirror or nowhere to mirror to). Taps are our names
/// (`vswt-...`), which need no quoting beyond nft's strings.
pub fn ruleset(bridge: &str, sources: &[String], destinations: &[String]) -> String {
    let table = table_name(bridge);
    let mut s = format!("table netdev {table}\ndelete table netdev {table}\n");
    let destinations: Vec<&String> = destinations
        .iter()
        .filter(|d| !sources.contains(d))
        .collect();
    if sources.is_empty() || destinations.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "table netdev {table} {{\n\tcomment \"Viridian port mirroring on the switch {bridge}\"\n"
    ));
    for src in sources {
        for (hook, suffix) in [("ingress", "in"), ("egress", "out")] {
            s.push_str(&format!(
                "\tchain {src}-{suffix} {{\n\t\ttype filter hook {hook} device \"{src}\" priority filter; policy accept;\n"
            ));
            for d in &destinations {
                s.push_str(&format!("\t\tdup to \"{d}\"\n"));
            }
            s.push_str("\t}\n");
        }
    }
    s.push_str("}\n");
    s
}

/// Makes the switch's mirror table what [`ruleset`] says.
pub fn apply(
    nft: &Nft,
    bridge: &str,
    sources: &[String],
    destinations: &[String],
) -> Result<(), NatError> {
    nft.run_script(
        &ruleset(bridge, sources, destinations),
        &format!("set the port mirroring of {bridge}"),
    )
}

/// Our mirror tables (`viridian-mirror-...`) in `nft -j list tables netdev`.
pub fn tables(nft: &Nft) -> Result<Vec<String>, NatError> {
    let json = nft.list_tables_json("netdev")?;
    let doc: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| NatError::Json(e.to_string()))?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("table"))
        .filter_map(|t| t["name"].as_str())
        .filter(|n| n.starts_with(TABLE_PREFIX))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_dup_both_ways_to_every_destination_and_nothing_is_a_removal() {
        let s = ruleset(
            "vsw-1a2b3c4d",
            &["vswt-aa".into()],
            &["vswt-bb".into(), "vswt-cc".into()],
        );
        assert!(s.starts_with(
            "table netdev viridian-mirror-1a2b3c4d\ndelete table netdev viridian-mirror-1a2b3c4d\n"
        ));
        assert!(
            s.contains("chain vswt-aa-in {\n\t\ttype filter hook ingress device \"vswt-aa\""),
            "{s}"
        );
        assert!(
            s.contains("chain vswt-aa-out {\n\t\ttype filter hook egress device \"vswt-aa\""),
            "{s}"
        );
        assert_eq!(s.matches("dup to \"vswt-bb\"").count(), 2, "{s}");
        assert_eq!(s.matches("dup to \"vswt-cc\"").count(), 2, "{s}");
        // Only a removal when either side is missing.
        let gone =
            "table netdev viridian-mirror-1a2b3c4d\ndelete table netdev viridian-mirror-1a2b3c4d\n";
        assert_eq!(ruleset("vsw-1a2b3c4d", &["vswt-aa".into()], &[]), gone);
        assert_eq!(ruleset("vsw-1a2b3c4d", &[], &["vswt-bb".into()]), gone);
    }
}
