//! The VLAN probe says what this kernel offers, with reasons, and leaves the
//! network namespace it runs from as it was.

use std::process::Command;

fn links() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn the_probe_reports_each_feature_with_its_reason_and_touches_no_link_here() {
    let before = links();
    let found = vswitch::vlan::detect();
    assert_eq!(links(), before, "the probe changed this namespace's links");
    assert!(!found.bridge_vlan_filtering_reason.is_empty());
    assert!(!found.dot1q_reason.is_empty());
    if !found.bridge_vlan_filtering {
        assert!(
            found
                .bridge_vlan_filtering_reason
                .contains(vswitch::vlan::FILTERING_OPTION),
            "{found:?}"
        );
    }
    if !found.dot1q {
        assert!(
            found.dot1q_reason.contains("CONFIG_VLAN_8021Q"),
            "{found:?}"
        );
    }
    // Where the kernel's config is readable, the probe agrees with it.
    let release = Command::new("uname").arg("-r").output().unwrap().stdout;
    let release = String::from_utf8_lossy(&release).trim().to_string();
    let config = std::fs::read_to_string(format!("/boot/config-{release}")).or_else(|_| {
        Command::new("zcat")
            .arg("/proc/config.gz")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .ok_or(())
    });
    if let Ok(config) = config {
        let has = |opt: &str| {
            config
                .lines()
                .any(|l| l == format!("{opt}=y") || l == format!("{opt}=m"))
        };
        assert_eq!(
            found.bridge_vlan_filtering,
            has("CONFIG_BRIDGE_VLAN_FILTERING"),
            "{found:?}"
        );
        assert_eq!(found.dot1q, has("CONFIG_VLAN_8021Q"), "{found:?}");
    }
    eprintln!("{found:?}");
}
