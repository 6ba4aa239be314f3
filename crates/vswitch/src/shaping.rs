//! A port's maximum bandwidth, both ways, with the kernel's traffic control
//! driven through `tc` (rtnetlink has no builder for the token bucket filter).
//!
//! - Toward the VM the frames leave the tap: a token bucket filter (`tbf`) is
//!   the tap's root qdisc.
//! - From the VM the frames arrive on the tap's ingress, where nothing can be
//!   queued (and this kernel has no policing action): an `ingress` qdisc with a
//!   u32 match-all filter redirects them (`mirred`) to the port's own `ifb` link
//!   (`vswi-...`, made over netlink), whose root `tbf` shapes them; the ifb hands
//!   each frame back to the tap's receive path, so the bridge and the guards see
//!   it arrive on the tap as before.
//!
//! The ifb is deleted with the limit; the tap's qdiscs go with the tap.

use std::process::Stdio;

use crate::{Host, SwitchError};

#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("a maximum bandwidth needs `tc` from iproute2, which is not installed; install the iproute2 package")]
    TcMissing,
    #[error("cannot run `tc`")]
    Spawn(#[source] std::io::Error),
    #[error("traffic control refused to {action}: {stderr}")]
    Refused { action: String, stderr: String },
    #[error(transparent)]
    Link(#[from] SwitchError),
}

/// The ifb link that shapes what the port `tap` receives from its VM.
pub fn ifb_for(tap: &str) -> String {
    match tap.strip_prefix("vswt-") {
        Some(rest) => format!("{}i-{rest}", crate::PREFIX),
        None => format!(
            "{}i-{}",
            crate::PREFIX,
            tap.trim_start_matches(crate::PREFIX)
        ),
    }
}

async fn tc(action: &str, args: &[&str], absent_ok: bool) -> Result<(), ShapingError> {
    let out = tokio::process::Command::new("tc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ShapingError::TcMissing
            } else {
                ShapingError::Spawn(e)
            }
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // Deleting what is not there: the kernel says so in one of these words.
    if absent_ok
        && (stderr.contains("Cannot find device")
            || stderr.contains("No such file or directory")
            || stderr.contains("Cannot find specified qdisc")
            || stderr.contains("Invalid handle")
            || stderr.contains("Cannot delete qdisc with handle of zero"))
    {
        return Ok(());
    }
    Err(ShapingError::Refused {
        action: action.into(),
        stderr,
    })
}

/// `tbf` arguments for `bits_per_second`: a burst of 20 ms of traffic (at least
/// 16 KiB, so a few full frames pass at low rates; at most 32 MiB) and 50 ms of
/// queue.
fn tbf_args(bits_per_second: u64) -> [String; 6] {
    let bytes = bits_per_second / 8;
    let burst = (bytes / 50).clamp(16 * 1024, 32 * 1024 * 1024);
    [
        "rate".into(),
        format!("{bits_per_second}bit"),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        "50ms".into(),
    ]
}

async fn root_tbf(dev: &str, bits: u64) -> Result<(), ShapingError> {
    let tbf = tbf_args(bits);
    let mut args = vec!["qdisc", "replace", "dev", dev, "root", "tbf"];
    args.extend(tbf.iter().map(String::as_str));
    tc(&format!("limit {dev} to {bits} bits/s"), &args, false).await
}

/// Limits the port `tap` to `bits_per_second` each way, or (`None`) takes its
/// limit away. Changing a limit replaces the old one.
pub async fn set_bandwidth(
    host: &Host,
    tap: &str,
    bits_per_second: Option<u64>,
) -> Result<(), ShapingError> {
    crate::check_ours(tap)?;
    let ifb = ifb_for(tap);
    let Some(bits) = bits_per_second else {
        return clear(host, tap).await;
    };
    host.ensure_ifb(&ifb).await?;
    root_tbf(tap, bits).await?;
    root_tbf(&ifb, bits).await?;
    // The redirect, made afresh (its filter goes with the ingress qdisc).
    tc(
        &format!("reset the ingress of {tap}"),
        &["qdisc", "del", "dev", tap, "ingress"],
        true,
    )
    .await?;
    tc(
        &format!("add an ingress qdisc to {tap}"),
        &["qdisc", "add", "dev", tap, "handle", "ffff:", "ingress"],
        false,
    )
    .await?;
    tc(
        &format!("redirect what {tap} receives to {ifb}"),
        &[
            "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", &ifb,
        ],
        false,
    )
    .await
}

/// Takes every limit off the port `tap` (a tap that is gone is fine) and deletes
/// its ifb.
pub async fn clear(host: &Host, tap: &str) -> Result<(), ShapingError> {
    crate::check_ours(tap)?;
    if host.link(tap).await?.is_some() {
        tc(
            &format!("remove the limit of {tap}"),
            &["qdisc", "del", "dev", tap, "root"],
            true,
        )
        .await?;
        tc(
            &format!("remove the ingress of {tap}"),
            &["qdisc", "del", "dev", tap, "ingress"],
            true,
        )
        .await?;
    }
    host.delete_link(&ifb_for(tap)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifb_names_follow_their_taps_and_are_ours() {
        let i = ifb_for("vswt-0123456789");
        assert_eq!(i, "vswi-0123456789");
        assert!(crate::is_ours(&i) && i.len() <= crate::MAX_NAME_BYTES);
    }

    #[test]
    fn bursts_scale_with_the_rate_within_bounds() {
        assert_eq!(tbf_args(8_000)[3], (16 * 1024).to_string());
        assert_eq!(tbf_args(100_000_000)[3], "250000");
        assert_eq!(
            tbf_args(1_000_000_000_000)[3],
            (32 * 1024 * 1024).to_string()
        );
        assert_eq!(tbf_args(10_000_000)[1], "10000000bit");
    }
}
