//! Writes seed inputs for every fuzz target into `corpus/<target>/`: small
//! fixed, dynamic and differencing VHDs made by the engine, and their footers,
//! headers, BATs and locators. Run from `fuzz/`:
//! `cargo +nightly run --example make_seeds`. The committed corpus started
//! from these and was then grown by fuzzing and minimized with `cargo fuzz cmin`.

use std::path::{Path, PathBuf};

use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::vhd1::header::{
    encode_locator_path, DynamicHeader, Locator, PLATFORM_W2KU, PLATFORM_W2RU,
};
use vhd::NoProgress;

fn make(path: &Path, kind: NewDisk, writes: &[(u64, usize, u8)]) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    create(
        path,
        &CreateOptions {
            kind,
            exact_size: true,
        },
        &mut NoProgress,
    )
    .expect("create");
    {
        let disk = vhd::open(path, false).expect("open");
        for &(at, len, byte) in writes {
            disk.write_at(&vec![byte; len], at).expect("write");
        }
        disk.flush().expect("flush");
    }
    std::fs::read(path).expect("read back")
}

fn save(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn main() {
    let dir = std::env::temp_dir().join(format!("viridian-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let fixed = make(
        &dir.join("fixed.vhd"),
        NewDisk::Fixed { size: 8192 },
        &[(512, 1024, 0xab)],
    );
    let dynamic = make(
        &dir.join("dynamic.vhd"),
        NewDisk::Dynamic {
            size: 64 << 10,
            block_size: 4096,
        },
        &[(0, 4096, 1), (5 * 4096 + 512, 1000, 2), (60 << 10, 4096, 3)],
    );
    let small_blocks = make(
        &dir.join("small.vhd"),
        NewDisk::Dynamic {
            size: 16 << 10,
            block_size: 512,
        },
        &[(512, 512, 4), (4096, 1536, 5)],
    );
    let parent = dir.join("parent.vhd");
    make(
        &parent,
        NewDisk::Dynamic {
            size: 64 << 10,
            block_size: 4096,
        },
        &[(0, 8192, 6)],
    );
    let child = make(
        &dir.join("child.avhd"),
        NewDisk::Differencing {
            parent: parent.clone(),
        },
        &[
            (100, 300, 7),
            (4096 * 3, 4096, 8),
            (4096 * 7 + 1024, 513, 9),
        ],
    );

    for (name, img) in [
        ("fixed", &fixed),
        ("dynamic", &dynamic),
        ("small-blocks", &small_blocks),
        ("differencing", &child),
    ] {
        save("vhd_image", name, img);
        let mut footer = img[img.len() - 512..].to_vec();
        footer.extend_from_slice(&(10u64 << 30).to_be_bytes());
        save("vhd_footer", name, &footer);
        if name != "fixed" {
            let header: [u8; 1024] = img[512..1536].try_into().expect("1024 bytes");
            save("vhd_header", name, &header);
            let h = DynamicHeader::parse(&header).expect("header");
            let at = h.table_offset as usize;
            let bat = &img[at..at + h.max_table_entries as usize * 4];
            let mut seed = vec![12u8]; // 2 MiB blocks
            seed.extend_from_slice(bat);
            save("vhd_bat", name, &seed);
        }
    }

    // Locator seeds: the locator data follows the header in the target's
    // layout, at file offset 2048 (see fuzz_targets/vhd_locator.rs).
    for (name, relative, absolute, parent_name) in [
        (
            "windows",
            ".\\parent.vhd",
            "C:\\VMs\\Disks\\parent.vhd",
            "parent.vhd",
        ),
        (
            "unix",
            "../base/parent.vhd",
            "/var/lib/viridian/parent.vhd",
            "/var/lib/viridian/parent.vhd",
        ),
    ] {
        let rel = encode_locator_path(relative);
        let abs = encode_locator_path(absolute);
        let mut locators: [Locator; 8] = Default::default();
        locators[0] = Locator {
            platform_code: PLATFORM_W2RU,
            data_space: 512,
            data_length: rel.len() as u32,
            data_offset: 2048,
        };
        locators[1] = Locator {
            platform_code: PLATFORM_W2KU,
            data_space: 1,
            data_length: abs.len() as u32,
            data_offset: 2048 + 512,
        };
        let h = DynamicHeader {
            table_offset: 1536,
            header_version: 0x0001_0000,
            max_table_entries: 16,
            block_size: 4096,
            parent_unique_id: [1; 16],
            parent_timestamp: 0,
            parent_name: parent_name.into(),
            locators,
        };
        let mut seed = h.serialize().to_vec();
        let mut data = rel.clone();
        data.resize(512, 0);
        data.extend_from_slice(&abs);
        data.resize(1024, 0);
        seed.extend_from_slice(&data);
        save("vhd_locator", name, &seed);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("seeds written under corpus/");
}
