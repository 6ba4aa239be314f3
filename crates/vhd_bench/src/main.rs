//! `vhd-bench`: drives the storage engine through its public API and a raw file
//! through the same loop (same request size, queue depth 1, same cache mode),
//! so `scripts/bench-storage.sh` can put them side by side with `qemu-img bench`.
//!
//! Each subcommand does one thing; the script times whole processes, the same
//! way for every contender. `run` and `merge` also print their own elapsed time
//! (I/O and the final flush only) on stdout.

mod direct;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use vhd::vhd1::create::{create, CreateOptions, NewDisk, DEFAULT_BLOCK_SIZE};
use vhd::vhdx::create::{NewVhdx, VhdxOptions};
use vhd::{Disk, HostStorage, NoProgress, Storage};

use direct::{DirectStorage, PlainDisk};
use workload::Pattern;

#[derive(Parser)]
#[command(
    name = "vhd-bench",
    about = "Storage engine benchmarks (engine vs raw file)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The file through `vhd::open` (a VHD or VHDX with its whole chain).
    Vhd,
    /// The file through `vhd::open` (a VHDX with its whole chain).
    Vhdx,
    /// The file as a raw image, read and written in place.
    Raw,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cache {
    /// Page cache; the run ends with the disk's flush (fdatasync).
    Buffered,
    /// O_DIRECT on the image file (the leaf only, for chains); ends with a flush.
    Direct,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MergeCopy {
    FileToFile,
    Buffered,
}

#[derive(Subcommand)]
enum Command {
    /// Creates an empty dynamic VHD of exactly SIZE bytes (2 MiB blocks), or a
    /// dynamic VHDX when PATH ends in .vhdx (32 MiB blocks unless --block-size).
    CreateDynamic {
        path: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
    },
    /// Creates an empty differencing VHD over PARENT, or a VHDX (2 MiB blocks)
    /// when PATH ends in .vhdx or .avhdx.
    CreateDiff {
        path: PathBuf,
        #[arg(long)]
        parent: PathBuf,
    },
    /// Times one workload on one file and prints `seconds=S mb_per_s=R bytes=N`.
    Run {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, value_enum)]
        format: Format,
        #[arg(long, value_enum)]
        cache: Cache,
        #[arg(long, value_enum)]
        pattern: Pattern,
        /// Request size in bytes (K/M/G suffixes allowed).
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        bs: u64,
        /// Number of requests.
        #[arg(long)]
        count: u64,
        /// Seed of the random offsets (rand-write).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Builds a chain of DEPTH VHD layers in DIR (a dynamic base, DEPTH-1
    /// differencing children) holding SIZE bytes of data, block i in layer
    /// i mod DEPTH, written in BS requests; prints the leaf's path.
    Chain {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        depth: u32,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        bs: u64,
    },
    /// Prints the offsets `run --pattern rand-write` uses, one a line (to give
    /// another tool the same requests).
    Offsets {
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        bs: u64,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Merges CHILD into its parent (`vhd::ops::merge`), prints `seconds=S bytes=N`.
    Merge {
        child: PathBuf,
        /// How the data moves: file to file (`copy_file_range`, the default)
        /// or through a buffer (the path before it).
        #[arg(long, value_enum, default_value_t = MergeCopy::FileToFile)]
        copy: MergeCopy,
        /// Leave CHILD in place (`merge_keeping_layers`, as checkpoint deletion
        /// merges), instead of removing it after the merge.
        #[arg(long)]
        keep_layers: bool,
    },
}

/// Parses `65536`, `64K`, `1G`, ... (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("not a size: {s:?} (use bytes or a K/M/G suffix)"))
}

fn create_dynamic(path: &Path, size: u64) -> Result<()> {
    if vhd::is_vhdx_name(path) {
        return create_vhdx(path, NewVhdx::Dynamic { size }, None);
    }
    let opts = CreateOptions {
        kind: NewDisk::Dynamic {
            size,
            block_size: DEFAULT_BLOCK_SIZE,
        },
        exact_size: true,
    };
    create(path, &opts, &mut NoProgress).with_context(|| format!("creating {}", path.display()))?;
    Ok(())
}

/// A VHDX with the given block size, or Hyper-V's default (32 MiB dynamic, 2 MiB
/// differencing).
fn create_vhdx(path: &Path, kind: NewVhdx, block_size: Option<u64>) -> Result<()> {
    let mut opts = VhdxOptions::new(kind);
    opts.block_size = block_size
        .map(|b| u32::try_from(b).context("the block size is at most 256 MiB"))
        .transpose()?;
    vhd::vhdx::create::create(path, &opts, &mut NoProgress)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(())
}

fn create_diff(path: &Path, parent: &Path) -> Result<()> {
    if vhd::is_vhdx_name(path) {
        let parent = parent.to_path_buf();
        return create_vhdx(path, NewVhdx::Differencing { parent }, None);
    }
    let opts = CreateOptions {
        kind: NewDisk::Differencing {
            parent: parent.to_path_buf(),
        },
        exact_size: true,
    };
    create(path, &opts, &mut NoProgress).with_context(|| format!("creating {}", path.display()))?;
    Ok(())
}

fn open(file: &Path, format: Format, cache: Cache) -> Result<Box<dyn Disk>> {
    let storage: &dyn Storage = match cache {
        Cache::Buffered => &HostStorage,
        Cache::Direct => &DirectStorage,
    };
    let disk: Box<dyn Disk> = match (format, cache) {
        (Format::Vhd | Format::Vhdx, _) => vhd::open_on(storage, file, false)?,
        (Format::Raw, Cache::Buffered) => Box::new(vhd::RawDisk::open(file, false)?),
        (Format::Raw, Cache::Direct) => Box::new(PlainDisk::open(storage, file)?),
    };
    if format == Format::Vhd && vhd::detect_format(file)? == vhd::Format::Raw {
        bail!("{} is not a VHD or VHDX", file.display());
    }
    if format == Format::Vhdx && vhd::detect_format(file)? != vhd::Format::Vhdx {
        bail!("{} is not a VHDX", file.display());
    }
    Ok(disk)
}

fn chain(dir: &Path, depth: u32, size: u64, bs: u64) -> Result<PathBuf> {
    if depth == 0 {
        bail!("a chain has at least one layer");
    }
    let block = u64::from(DEFAULT_BLOCK_SIZE);
    if !block.is_multiple_of(bs) {
        bail!("the request size must divide the 2 MiB block");
    }
    let mut buf = direct::AlignedBuf::new(bs as usize);
    workload::fill_pattern(buf.as_mut_slice(), 1);
    let mut leaf = dir.join("layer0.vhd");
    create_dynamic(&leaf, size)?;
    for layer in 0..depth {
        if layer > 0 {
            let child = dir.join(format!("layer{layer}.vhd"));
            create_diff(&child, &leaf)?;
            leaf = child;
        }
        let disk = vhd::open(&leaf, false)?;
        for b in (0..size.div_ceil(block)).filter(|b| b % u64::from(depth) == u64::from(layer)) {
            let start = b * block;
            let end = (start + block).min(size);
            let mut off = start;
            while off < end {
                disk.write_at(buf.as_slice(), off)?;
                off += bs;
            }
        }
        disk.flush()?;
    }
    Ok(leaf)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::CreateDynamic {
            path,
            size,
            block_size,
        } if vhd::is_vhdx_name(&path) => create_vhdx(&path, NewVhdx::Dynamic { size }, block_size),
        Command::CreateDynamic { path, size, .. } => create_dynamic(&path, size),
        Command::CreateDiff { path, parent } => create_diff(&path, &parent),
        Command::Run {
            file,
            format,
            cache,
            pattern,
            bs,
            count,
            seed,
        } => {
            let disk = open(&file, format, cache)?;
            let r = workload::run(disk.as_ref(), pattern, bs, count, seed)?;
            println!(
                "seconds={:.3} mb_per_s={:.1} bytes={}",
                r.seconds,
                r.bytes as f64 / r.seconds / 1e6,
                r.bytes
            );
            Ok(())
        }
        Command::Chain {
            dir,
            depth,
            size,
            bs,
        } => {
            println!("{}", chain(&dir, depth, size, bs)?.display());
            Ok(())
        }
        Command::Offsets {
            size,
            bs,
            count,
            seed,
        } => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for off in workload::random_offsets(size, bs, count, seed)? {
                writeln!(out, "{off}")?;
            }
            Ok(())
        }
        Command::Merge {
            child,
            copy,
            keep_layers,
        } => {
            use vhd::ops::merge::{merge_with, CopyPath, MergeOptions};
            let copy = match copy {
                MergeCopy::FileToFile => CopyPath::FileToFile,
                MergeCopy::Buffered => CopyPath::Buffered,
            };
            let options = MergeOptions { copy, keep_layers };
            let t = Instant::now();
            let r = merge_with(&HostStorage, &child, None, options, &mut NoProgress)?;
            println!(
                "seconds={:.3} bytes={}",
                t.elapsed().as_secs_f64(),
                r.bytes_merged
            );
            Ok(())
        }
    }
}
