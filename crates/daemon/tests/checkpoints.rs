//! Checkpoint trees through the API of a real `viridiand`, on a VM that is off: the
//! test writes a distinct pattern into the current disks between steps (with the
//! storage engine, as the guest would) and checks what the VM's disks read after
//! each create, apply and delete; libvhdi reads the chains the same way.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{wait_job, Daemon};
use serde_json::{json, Value};

const SIZE: u64 = 8 << 20;

fn make_base(path: &Path) {
    let mut none = vhd::NoProgress;
    if vhd::is_vhdx_name(path) {
        use vhd::vhdx::create::{NewVhdx, VhdxOptions};
        let mut o = VhdxOptions::new(NewVhdx::Dynamic { size: SIZE });
        o.block_size = Some(1 << 20);
        vhd::vhdx::create::create(path, &o, &mut none).unwrap();
    } else {
        use vhd::vhd1::create::{CreateOptions, NewDisk};
        let o = CreateOptions {
            kind: NewDisk::Dynamic {
                size: SIZE,
                block_size: 1 << 20,
            },
            exact_size: true,
        };
        vhd::vhd1::create::create(path, &o, &mut none).unwrap();
    }
}

/// A pattern that differs per step and per place, written at three offsets.
fn write_pattern(path: &Path, step: u8) {
    let d = vhd::open(path, false).unwrap();
    for (i, off) in [0u64, 3 << 20, SIZE - 4096].into_iter().enumerate() {
        d.write_at(&[step.wrapping_mul(7).wrapping_add(i as u8 + 1); 4096], off)
            .unwrap();
    }
    d.flush().unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let d = vhd::open(path, true).unwrap();
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// What a disk holds after the patterns `steps` were written in order.
fn expected(steps: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    for &step in steps {
        for (i, off) in [0u64, 3 << 20, SIZE - 4096].into_iter().enumerate() {
            buf[off as usize..off as usize + 4096]
                .fill(step.wrapping_mul(7).wrapping_add(i as u8 + 1));
        }
    }
    buf
}

fn disks(d: &Daemon, vm: &str) -> Vec<PathBuf> {
    let r = d.get(&format!("/v1/vms/{vm}"));
    r.body["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| PathBuf::from(x["media"]["path"].as_str().unwrap()))
        .collect()
}

fn chain_len(path: &Path) -> usize {
    vhd::ops::info::info(path).unwrap().chain.len()
}

fn run_job(d: &Daemon, method: &str, path: &str, body: Option<Value>) -> Value {
    let r = d.req(method, path, body.map(|b| b.to_string()).as_deref());
    assert_eq!(r.status, 202, "{}", r.raw);
    let job = wait_job(d, r.body["id"].as_str().unwrap());
    assert_eq!(job["state"], "Completed", "{job}");
    job
}

fn create(d: &Daemon, vm: &str, name: &str) -> String {
    let job = run_job(
        d,
        "POST",
        &format!("/v1/vms/{vm}/checkpoints"),
        Some(json!({ "name": name })),
    );
    job["affected_elements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "checkpoint")
        .map(|a| a["id"].as_str().unwrap().to_string())
        .expect("the job names the new checkpoint")
}

fn tree(d: &Daemon, vm: &str) -> Value {
    let r = d.get(&format!("/v1/vms/{vm}/checkpoints"));
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body
}

fn names(t: &Value) -> Vec<String> {
    t["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn check_content(d: &Daemon, vm: &str, steps: &[u8]) {
    let want = expected(steps);
    for p in disks(d, vm) {
        assert!(
            read_all(&p) == want,
            "{} does not read as after steps {steps:?}",
            p.display()
        );
        // libvhdi 20210425 (Debian 12) misreads VHDX chains whose child block is
        // absent and whose parent block is only partly written (it returns zeros
        // for sectors 1-6 of the first 4 KiB even for a freshly made child), so
        // only the VHD chains are compared here; see README "Checkpoints".
        if !vhd::is_vhdx_name(&p) {
            assert_libvhdi_reads_the_same(&p);
        }
    }
}

/// libvhdi (an independent reader) reads the whole chain of `leaf` as we do.
fn assert_libvhdi_reads_the_same(leaf: &Path) {
    let chain = vhd::ops::info::info(leaf).unwrap().chain;
    // Every layer stays referenced: libvhdi does not keep its parents alive.
    let mut script = String::from("import pyvhdi,sys\nprev=None\nkeep=[]\n");
    for layer in chain.iter().rev() {
        script.push_str(&format!(
            "f=pyvhdi.file(); f.open({:?})\nif prev is not None: f.set_parent(prev)\nprev=f\nkeep.append(f)\n",
            layer.to_str().unwrap()
        ));
    }
    script.push_str(
        "sys.stdout.buffer.write(prev.read_buffer_at_offset(prev.get_media_size(), 0))\n",
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = read_all(leaf);
    let first = out.stdout.iter().zip(&ours).position(|(a, b)| a != b);
    assert!(
        out.stdout.len() == ours.len() && first.is_none(),
        "libvhdi reads the chain of {} differently from byte {first:?} (lengths {} and {}): libvhdi {:?}, we {:?}",
        leaf.display(),
        out.stdout.len(),
        ours.len(),
        first.map(|f| &out.stdout[f..f + 8]),
        first.map(|f| &ours[f..f + 8]),
    );
}

#[test]
fn checkpoint_tree_create_apply_delete_merge_on_an_off_vm() {
    let mut d = Daemon::start(&["--checkpoint-limit", "3"]);
    let vm = "ck";
    d.create_vm(vm);
    let base_vhd = d.dir.path().join("base.vhd");
    let base_vhdx = d.dir.path().join("base.vhdx");
    make_base(&base_vhd);
    make_base(&base_vhdx);
    for (loc, p) in [(0, &base_vhd), (1, &base_vhdx)] {
        let r = d.post(
            &format!("/v1/vms/{vm}/drives"),
            json!({"controller": "scsi", "controller_number": 0, "location": loc,
                   "media": {"type": "hard_disk", "path": p}}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    let write = |d: &Daemon, step: u8| {
        for p in disks(d, vm) {
            write_pattern(&p, step);
        }
    };
    write(&d, 1);

    // Create A: the VM continues on new differencing children (.avhd/.avhdx).
    let a = create(&d, vm, "A");
    let now = disks(&d, vm);
    assert!(now[0].extension().unwrap() == "avhd", "{now:?}");
    assert!(now[1].extension().unwrap() == "avhdx", "{now:?}");
    assert!(now
        .iter()
        .all(|p| p.starts_with(d.data.join("vms")) && p.to_string_lossy().contains(&a)));
    check_content(&d, vm, &[1]);
    write(&d, 2);
    let b = create(&d, vm, "B");
    write(&d, 3);
    let t = tree(&d, vm);
    assert_eq!(names(&t), ["A", "B"]);
    assert_eq!(t["current_parent"], b.as_str());
    assert_eq!(t["checkpoints"][1]["parent"], a.as_str());
    assert!(t["checkpoints"][0]["size_on_disk_bytes"].as_u64().unwrap() > 0);
    check_content(&d, vm, &[1, 2, 3]);

    // A duplicate name is refused at once, and a rename works.
    let r = d.post(&format!("/v1/vms/{vm}/checkpoints"), json!({"name": "A"}));
    assert_eq!((r.status, r.code()), (409, "AlreadyExists"), "{}", r.raw);
    let r = d.req(
        "PATCH",
        &format!("/v1/vms/{vm}/checkpoints/B"),
        Some(r#"{"name":"B2"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.raw);

    // Delete B (one descendant: the current state): merged, chain one shorter.
    let before = chain_len(&disks(&d, vm)[0]);
    run_job(&d, "DELETE", &format!("/v1/vms/{vm}/checkpoints/B2"), None);
    assert_eq!(chain_len(&disks(&d, vm)[0]), before - 1);
    assert_eq!(names(&tree(&d, vm)), ["A"]);
    check_content(&d, vm, &[1, 2, 3]);
    assert!(!d
        .data
        .join("vms")
        .join(d.get(&format!("/v1/vms/{vm}")).body["id"].as_str().unwrap())
        .join("Snapshots")
        .join(&b)
        .exists());

    // Apply A: the disks read as at A.
    run_job(
        &d,
        "POST",
        &format!("/v1/vms/{vm}/checkpoints/A/apply"),
        None,
    );
    check_content(&d, vm, &[1]);

    // Branch: write, create C; apply A again → A has two descendants (C and now).
    write(&d, 4);
    let c = create(&d, vm, "C");
    run_job(
        &d,
        "POST",
        &format!("/v1/vms/{vm}/checkpoints/A/apply"),
        None,
    );
    check_content(&d, vm, &[1]);
    write(&d, 5);
    let t = tree(&d, vm);
    assert_eq!(t["current_parent"], a.as_str());
    assert_eq!(t["checkpoints"][0]["children"], json!([c]));

    // Delete A: two descendants → its disks stay, merge pending; survives a restart.
    run_job(&d, "DELETE", &format!("/v1/vms/{vm}/checkpoints/A"), None);
    d.restart();
    let t = tree(&d, vm);
    assert_eq!(names(&t), ["C"]);
    assert_eq!(t["pending_merges"][0]["id"], a.as_str(), "{t}");
    assert_eq!(t["pending_merges"][0]["state"], "Pending");
    let shown = d.get(&format!("/v1/vms/{vm}")).body;
    assert_eq!(shown["pending_merges"][0]["id"], a.as_str(), "{shown}");
    check_content(&d, vm, &[1, 5]);

    // Delete the subtree under the other branch (C): A's merge runs, and the
    // remaining branch (the current state) reads correctly, on the base disks again.
    run_job(
        &d,
        "DELETE",
        &format!("/v1/vms/{vm}/checkpoints/C/subtree"),
        None,
    );
    let t = tree(&d, vm);
    assert_eq!(names(&t), Vec::<String>::new());
    assert_eq!(t["pending_merges"], json!([]));
    assert_eq!(disks(&d, vm), [base_vhd.clone(), base_vhdx.clone()]);
    check_content(&d, vm, &[1, 5]);

    // The limit: three checkpoints, the fourth is refused with a clear error.
    for n in ["x1", "x2", "x3"] {
        create(&d, vm, n);
    }
    let r = d.post(&format!("/v1/vms/{vm}/checkpoints"), json!({}));
    assert_eq!((r.status, r.code()), (409, "InvalidState"), "{}", r.raw);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("checkpoint-limit"),
        "{}",
        r.raw
    );
    // A default name follows Hyper-V's pattern.
    run_job(
        &d,
        "DELETE",
        &format!("/v1/vms/{vm}/checkpoints/x1/subtree"),
        None,
    );
    create_default_named(&d, vm);
    check_content(&d, vm, &[1, 5]);
}

fn create_default_named(d: &Daemon, vm: &str) {
    let r = d.post(&format!("/v1/vms/{vm}/checkpoints"), json!({}));
    assert_eq!(r.status, 202, "{}", r.raw);
    let job = wait_job(d, r.body["id"].as_str().unwrap());
    assert_eq!(job["state"], "Completed", "{job}");
    let t = tree(d, vm);
    let name = names(&t).pop().unwrap();
    assert!(
        name.starts_with("ck - (20") && name.ends_with(')'),
        "{name}"
    );
}
