//! Writes seed inputs for the VHDX fuzz targets into `corpus/<target>/`: small
//! fixed, dynamic, differencing and 4096-byte-sector VHDX files made by the
//! engine's create API (what `viridian vhd create` calls) and, when
//! `qemu-img` is installed, by `qemu-img create -f vhdx -o block_size=1M`;
//! one file caught with its log still to replay; and from each of them the
//! file identifier, a header, the region table, the metadata region and the
//! log. Run from `fuzz/`: `cargo +nightly run --example make_vhdx_seeds`.

use std::path::{Path, PathBuf};
use std::process::Command;

use vhd::vhdx::create::{create, NewVhdx, VhdxOptions};
use vhd::vhdx::header::{Header, FILE_ID_SIZE, HEADER_OFFSETS, HEADER_SIZE};
use vhd::vhdx::metadata::{self, TABLE_SIZE};
use vhd::vhdx::region::{RegionTable, METADATA_GUID, TABLE_OFFSETS};
use vhd::vhdx::MIB;
use vhd::NoProgress;
use viridian_fuzz::vhdx_input::{encode, FIX_HEADERS, FIX_LOG};

/// Writes `(offset, length, byte)` into the disk, flushes, and returns the
/// file's bytes: after the flush with the session still open (the log not
/// yet emptied) when `mid_session`, else after a clean close.
fn write(path: &Path, writes: &[(u64, usize, u8)], mid_session: bool) -> Vec<u8> {
    let disk = vhd::open(path, false).expect("open");
    for &(at, len, byte) in writes {
        disk.write_at(&vec![byte; len], at).expect("write");
    }
    disk.flush().expect("flush");
    let bytes = std::fs::read(path).expect("read back");
    drop(disk);
    if mid_session {
        bytes
    } else {
        std::fs::read(path).expect("read back")
    }
}

fn make(path: &Path, kind: NewVhdx, sector: u32, writes: &[(u64, usize, u8)]) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    let opts = VhdxOptions {
        block_size: Some(MIB as u32),
        logical_sector_size: sector,
        physical_sector_size: sector.max(4096),
        ..VhdxOptions::new(kind)
    };
    create(path, &opts, &mut NoProgress).expect("create");
    write(path, writes, false)
}

fn qemu(path: &Path, subformat: &str, size: &str, writes: &[&str]) -> Option<Vec<u8>> {
    let _ = std::fs::remove_file(path);
    let opts = format!("block_size=1M,subformat={subformat}");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o", &opts])
        .arg(path)
        .arg(size)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("qemu-img not usable: no qemu-made seeds");
        return None;
    }
    for w in writes {
        let ok = Command::new("qemu-io")
            .args(["-f", "vhdx", "-c", w])
            .arg(path)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("qemu-io {w} failed");
        }
    }
    std::fs::read(path).ok()
}

fn save(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

/// `b` without its trailing zeros.
fn trim(b: &[u8]) -> &[u8] {
    &b[..b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1)]
}

fn with_flags(flags: u8, b: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(b);
    out
}

fn structures(name: &str, img: &[u8]) {
    save(
        "vhdx_header",
        &format!("{name}-id"),
        &with_flags(0, trim(&img[..FILE_ID_SIZE])),
    );
    for (i, at) in HEADER_OFFSETS.iter().enumerate() {
        let b = &img[*at as usize..*at as usize + HEADER_SIZE];
        save(
            "vhdx_header",
            &format!("{name}-header{i}"),
            &with_flags(0, trim(b)),
        );
    }
    let at = TABLE_OFFSETS[0] as usize;
    let table = &img[at..at + vhd::vhdx::region::TABLE_SIZE];
    save("vhdx_region", name, &with_flags(0, trim(table)));

    let regions = RegionTable::parse(table).expect("region table");
    let meta = regions.find(&METADATA_GUID).expect("metadata region");
    let region = &img[meta.file_offset as usize..meta.end() as usize];
    let entries = metadata::parse_table(region, region.len() as u64).expect("metadata table");
    let items_end = entries
        .iter()
        .map(|e| e.offset as usize + e.length as usize)
        .max()
        .unwrap_or(TABLE_SIZE)
        .max(TABLE_SIZE);
    let table = trim(&region[..TABLE_SIZE]);
    let mut seed = (table.len() as u16).to_le_bytes().to_vec();
    seed.extend_from_slice(table);
    seed.extend_from_slice(&region[TABLE_SIZE..items_end]);
    save("vhdx_metadata", name, &seed);

    let h = Header::parse(&img[HEADER_OFFSETS[0] as usize..][..HEADER_SIZE]).expect("header");
    let log = &img[h.log_offset as usize..][..h.log_length as usize];
    let log = trim(log);
    if !log.is_empty() {
        let log = &img[h.log_offset as usize..][..log.len().div_ceil(4096) * 4096];
        save("vhdx_log", name, &with_flags(0, log));
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("viridian-vhdx-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();

    let parent = dir.join("parent.vhdx");
    images.push((
        "dynamic".into(),
        make(
            &parent,
            NewVhdx::Dynamic { size: 4 * MIB },
            512,
            &[(0, 4096, 1), (MIB + 512, 1000, 2)],
        ),
    ));
    images.push((
        "fixed".into(),
        make(
            &dir.join("fixed.vhdx"),
            NewVhdx::Fixed { size: 2 * MIB },
            512,
            &[(512, 1024, 3), (MIB + 4096, 512, 4)],
        ),
    ));
    images.push((
        "sector4k".into(),
        make(
            &dir.join("sector4k.vhdx"),
            NewVhdx::Dynamic { size: 3 * MIB },
            4096,
            &[(4096, 8192, 5)],
        ),
    ));
    images.push((
        "differencing".into(),
        make(
            &dir.join("child.avhdx"),
            NewVhdx::Differencing {
                parent: parent.clone(),
            },
            512,
            &[(1024, 512, 6), (2 * MIB + 4096, 4096, 7)],
        ),
    ));
    // Caught between a flush and the clean close: LogGuid set, one entry to replay.
    let live = dir.join("live.vhdx");
    let _ = std::fs::remove_file(&live);
    let opts = VhdxOptions {
        block_size: Some(MIB as u32),
        ..VhdxOptions::new(NewVhdx::Dynamic { size: 2 * MIB })
    };
    create(&live, &opts, &mut NoProgress).expect("create");
    images.push(("live-log".into(), write(&live, &[(MIB, 512, 8)], true)));

    if let Some(img) = qemu(
        &dir.join("q-dyn.vhdx"),
        "dynamic",
        "4M",
        &["write -P 0x55 512 4k"],
    ) {
        images.push(("qemu-dynamic".into(), img));
    }
    if let Some(img) = qemu(
        &dir.join("q-fixed.vhdx"),
        "fixed",
        "2M",
        &["write -P 0x66 1M 2k"],
    ) {
        images.push(("qemu-fixed".into(), img));
    }

    for (name, img) in &images {
        println!("{name}: {} bytes", img.len());
        save("vhdx_image", name, &encode(0, img));
        save(
            "vhdx_image",
            &format!("{name}-fix"),
            &encode(FIX_HEADERS | FIX_LOG, img),
        );
        structures(name, img);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("seeds written under corpus/");
}
