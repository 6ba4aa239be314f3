//! What a host without `nft` or `tc` is told. A file of its own, so its change
//! of PATH is its process's alone (under `cargo test` as under nextest).

use vswitch::{bridge_name, tap_name, Host};

/// Runs `f` on a thread of its own in a new network namespace.
fn in_new_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
    })
    .join()
    .unwrap();
}

#[test]
fn without_nft_or_tc_the_errors_name_what_to_install() {
    use vswitch::guards::{self, PortGuards};
    in_new_netns(|| async {
        let host = Host::connect().unwrap();
        let br = bridge_name(0x1a2b3c4d << 96);
        host.ensure_bridge(&br).await.unwrap();
        let tap = tap_name(9);
        host.create_tap(&tap, &br).await.unwrap();
        // This file's only test: PATH is its own.
        std::env::set_var("PATH", "/nonexistent");
        let g = PortGuards {
            mac: "52:54:00:00:00:09".into(),
            mac_address_spoofing: false,
            dhcp_guard: false,
            router_guard: false,
        };
        let e = guards::apply(&tap, &g).await.unwrap_err().to_string();
        assert!(
            e.contains("nftables") && e.contains("apt-get install nftables"),
            "{e}"
        );
        let e = vswitch::shaping::set_bandwidth(&host, &tap, Some(1_000_000))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("iproute2"), "{e}");
    });
}
