use std::path::Path;

use super::*;

const V1_HOST: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
33 30 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

const V1_COMBINED: &str = "\
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
";

const V2_HOST: &str = "\
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

#[test]
fn detects_split_v1_mounts_when_the_unified_mount_has_no_cpu() {
    let h = Hierarchy::detect_in(V1_HOST, |_| Some(String::new())).unwrap();
    assert_eq!(
        h,
        Hierarchy::V1 {
            cpu: "/sys/fs/cgroup/cpu".into(),
            cpuacct: "/sys/fs/cgroup/cpuacct".into()
        }
    );
    assert_eq!(h.version(), 1);
}

#[test]
fn detects_combined_v1_and_unescapes_the_mount_point() {
    let h = Hierarchy::detect_in(V1_COMBINED, |_| None).unwrap();
    assert_eq!(
        h,
        Hierarchy::V1 {
            cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
            cpuacct: "/sys/fs/cgroup/cpu,cpuacct".into()
        }
    );
    assert_eq!(unescape(r"/a\040b"), "/a b");
}

#[test]
fn prefers_v2_when_its_root_offers_cpu() {
    let read = |p: &Path| {
        (p == Path::new("/sys/fs/cgroup/cgroup.controllers"))
            .then(|| "cpuset cpu io memory pids\n".to_string())
    };
    let h = Hierarchy::detect_in(V2_HOST, read).unwrap();
    assert_eq!(
        h,
        Hierarchy::V2 {
            root: "/sys/fs/cgroup".into()
        }
    );
}

#[test]
fn no_cpu_controller_is_an_error_naming_what_was_found() {
    let e = Hierarchy::detect_in(V2_HOST, |_| Some("memory pids".into())).unwrap_err();
    assert!(e.to_string().contains("/sys/fs/cgroup"), "{e}");
}

/// A fake v2 root: the files the kernel would offer.
fn fake_v2() -> (tempfile::TempDir, Hierarchy) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
    std::fs::write(dir.path().join("cgroup.subtree_control"), "memory\n").unwrap();
    std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
    let h = Hierarchy::V2 {
        root: dir.path().to_path_buf(),
    };
    (dir, h)
}

#[test]
fn v2_group_writes_cpu_max_and_weight_and_reads_usage() {
    let (dir, h) = fake_v2();
    let g = h.vm_group("1234");
    assert_eq!(g.path(), dir.path().join("viridian.slice/vm-1234"));
    g.create().unwrap();
    assert!(g.exists());
    // The cpu controller is enabled for the children of the root and of the slice.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
        "+cpu"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("viridian.slice/cgroup.subtree_control")).unwrap(),
        "+cpu"
    );
    g.set_cpu(CpuControl {
        count: 2,
        limit_percent: 25,
        weight: 300,
    })
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(g.path().join("cpu.max")).unwrap(),
        "50000 100000"
    );
    assert_eq!(
        std::fs::read_to_string(g.path().join("cpu.weight")).unwrap(),
        "300"
    );
    let read = g.read_cpu().unwrap();
    assert_eq!(read.quota_us, Some(50_000));
    assert_eq!(read.period_us, 100_000);
    assert_eq!(read.weight_or_shares, 300);
    g.set_cpu(CpuControl {
        count: 2,
        limit_percent: 100,
        weight: 100,
    })
    .unwrap();
    assert_eq!(g.read_cpu().unwrap().quota_us, None);

    std::fs::write(
        g.path().join("cpu.stat"),
        "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
    )
    .unwrap();
    assert_eq!(g.usage().unwrap(), Duration::from_millis(2500));

    g.add_process(42).unwrap();
    assert_eq!(g.processes().unwrap(), vec![42]);
    g.release_process(42).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("cgroup.procs")).unwrap(),
        "42"
    );
}

#[test]
fn v2_group_with_garbage_in_cpu_max_names_the_file() {
    let (_dir, h) = fake_v2();
    let g = h.vm_group("x");
    g.create().unwrap();
    std::fs::write(g.path().join("cpu.max"), "lots").unwrap();
    std::fs::write(g.path().join("cpu.weight"), "100").unwrap();
    let e = g.read_cpu().unwrap_err();
    assert!(e.to_string().contains("cpu.max"), "{e}");
}

#[test]
fn v1_split_group_lives_in_both_mounts_and_reads_usage_from_cpuacct() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = dir.path().join("cpu");
    let acct = dir.path().join("cpuacct");
    std::fs::create_dir_all(&cpu).unwrap();
    std::fs::create_dir_all(&acct).unwrap();
    let h = Hierarchy::V1 {
        cpu: cpu.clone(),
        cpuacct: acct.clone(),
    };
    let g = h.vm_group("abc");
    g.create().unwrap();
    assert!(cpu.join("viridian/vm-abc").is_dir());
    assert!(acct.join("viridian/vm-abc").is_dir());
    g.set_cpu(CpuControl {
        count: 1,
        limit_percent: 25,
        weight: 300,
    })
    .unwrap();
    let read = g.read_cpu().unwrap();
    assert_eq!(read.quota_us, Some(25_000));
    assert_eq!(read.period_us, 100_000);
    assert_eq!(read.weight_or_shares, 3072);
    std::fs::write(acct.join("viridian/vm-abc/cpuacct.usage"), "1500000000\n").unwrap();
    assert_eq!(g.usage().unwrap(), Duration::from_millis(1500));
    g.add_process(7).unwrap();
    assert_eq!(
        std::fs::read_to_string(acct.join("viridian/vm-abc/cgroup.procs")).unwrap(),
        "7"
    );
    // A fake directory holds files, so rmdir fails like a real busy group would.
    for d in [cpu.join("viridian/vm-abc"), acct.join("viridian/vm-abc")] {
        for f in std::fs::read_dir(&d).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
    }
    g.remove().unwrap();
    assert!(!g.exists());
    g.remove().unwrap();
}

/// On the real host (root, with a cpu controller): create, set, read back, remove.
#[test]
fn real_hierarchy_group_takes_a_cap_and_is_removed() {
    let Ok(h) = Hierarchy::detect() else {
        eprintln!("SKIP: no cgroup hierarchy with the cpu controller on this host");
        return;
    };
    let g = h.vm_group(&format!("unit-test-{}", std::process::id()));
    if let Err(e) = g.create() {
        eprintln!("SKIP: cannot create a cgroup here (not root?): {e}");
        return;
    }
    g.set_cpu(CpuControl {
        count: 1,
        limit_percent: 30,
        weight: 200,
    })
    .unwrap();
    let read = g.read_cpu().unwrap();
    assert_eq!(read.quota_us, Some(30_000));
    g.usage().unwrap();
    assert!(g.processes().unwrap().is_empty());
    g.remove().unwrap();
    assert!(!g.exists());
}
