//! The host's dynamic MAC address pool: adapters added without a MAC get the
//! pool's next address, in order and across restarts; a used-up pool skips what
//! VMs still hold; `PATCH /v1/host` changes the range and refuses bad ones.

mod common;

use common::Daemon;
use serde_json::{json, Value};

fn add_adapter(d: &Daemon, vm: &str) -> common::Reply {
    d.post(&format!("/v1/vms/{vm}/network-adapters"), json!({}))
}

fn mac_of(r: &common::Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.raw);
    r.body["mac"].as_str().unwrap().to_string()
}

fn patch_host(d: &Daemon, body: Value) -> common::Reply {
    d.req("PATCH", "/v1/host", Some(&body.to_string()))
}

#[test]
fn adapters_without_a_mac_take_the_pools_next_address_until_it_is_used_up() {
    let mut d = Daemon::start(&[]);
    // The default pool: locally administered, 65,536 addresses, this host's own.
    let host = d.get("/v1/host").body;
    let min = host["mac_address_pool"]["minimum"]
        .as_str()
        .unwrap()
        .to_string();
    let max = host["mac_address_pool"]["maximum"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(min.starts_with("02:") && min.ends_with(":00:00"), "{min}");
    assert_eq!(min[..12], max[..12]);
    assert!(max.ends_with(":ff:ff"), "{max}");
    d.create_vm("web");
    assert_eq!(mac_of(&add_adapter(&d, "web")), min);
    let second = mac_of(&add_adapter(&d, "web"));
    assert_eq!(second, format!("{}00:01", &min[..12]));

    // A range of two: in order, across a restart.
    let r = patch_host(
        &d,
        json!({"mac_address_minimum": "02:aa:00:00:00:00", "mac_address_maximum": "02:aa:00:00:00:01"}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["mac_address_pool"]["minimum"], "02:aa:00:00:00:00");
    d.create_vm("db");
    assert_eq!(mac_of(&add_adapter(&d, "db")), "02:aa:00:00:00:00");
    d.restart();
    assert_eq!(
        d.get("/v1/host").body["mac_address_pool"]["maximum"],
        "02:aa:00:00:00:01"
    );
    assert_eq!(mac_of(&add_adapter(&d, "db")), "02:aa:00:00:00:01");
    // Used up: both held.
    let r = add_adapter(&d, "db");
    assert_eq!(r.status, 409, "{}", r.raw);
    assert_eq!(r.code(), "InsufficientResources");
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("02:aa:00:00:00:00–02:aa:00:00:00:01"),
        "{}",
        r.raw
    );
    // One freed: the pool hands it out again, and only it.
    let r = d.req(
        "DELETE",
        "/v1/vms/db/network-adapters/02:aa:00:00:00:00",
        None,
    );
    assert_eq!(r.status, 204, "{}", r.raw);
    assert_eq!(mac_of(&add_adapter(&d, "db")), "02:aa:00:00:00:00");
    // A static MAC outside the pool is still the admin's choice.
    let r = d.post(
        "/v1/vms/web/network-adapters",
        json!({"mac": "52:54:00:12:34:56"}),
    );
    assert_eq!(mac_of(&r), "52:54:00:12:34:56");
}

#[test]
fn bad_pools_are_refused_and_change_nothing() {
    let d = Daemon::start(&[]);
    let before = d.get("/v1/host").body["mac_address_pool"].clone();
    for (body, says) in [
        (
            json!({"mac_address_minimum": "02:00:00:00:00:10", "mac_address_maximum": "02:00:00:00:00:01"}),
            "above",
        ),
        (
            json!({"mac_address_minimum": "02:ff:ff:ff:ff:00", "mac_address_maximum": "04:00:00:00:00:00"}),
            "first byte",
        ),
        (
            json!({"mac_address_minimum": "03:00:00:00:00:00"}),
            "multicast",
        ),
        (json!({"mac_address_maximum": "nonsense"}), "not a MAC"),
    ] {
        let r = patch_host(&d, body.clone());
        assert!(r.status == 422 || r.status == 400, "{body}: {}", r.raw);
        assert!(
            r.body["message"].as_str().unwrap_or("").contains(says),
            "{body}: {}",
            r.raw
        );
        assert_eq!(d.get("/v1/host").body["mac_address_pool"], before);
    }
    assert!(
        !d.data.join("host.json").exists()
            || !std::fs::read_to_string(d.data.join("host.json"))
                .unwrap()
                .contains("mac_address_pool")
    );
}
