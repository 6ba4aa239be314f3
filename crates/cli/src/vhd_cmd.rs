//! `viridian vhd ...`: offline commands on disk files, with no daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use vhd::ops::{check, info};
use vhd::vhd1::create::{create, CreateOptions, NewDisk, DEFAULT_BLOCK_SIZE};

/// Exit code of `vhd check` when it found problems it did not repair.
const EXIT_PROBLEMS: u8 = 3;

#[derive(Args)]
pub struct VhdArgs {
    #[command(subcommand)]
    command: VhdCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Fixed,
    Dynamic,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FileFormat {
    Vhd,
    Vhdx,
}

#[derive(Subcommand)]
enum VhdCommand {
    /// Create a VHD or VHDX: fixed or dynamic with --size, or differencing with --parent.
    ///
    /// The format follows the extension (.vhdx/.avhdx: VHDX, otherwise VHD) unless
    /// --format says. VHD sizes are rounded up to the nearest size whose CHS
    /// geometry addresses it exactly, so QEMU, Virtual PC and Hyper-V all see the
    /// same disk; the actual size is printed. --exact-size keeps the size as given
    /// (e.g. 1 MiB multiples for Azure); QEMU 7.2 then reports the geometry's size,
    /// which may be smaller. VHDX sizes are exact (whole logical sectors).
    Create {
        path: PathBuf,
        /// Virtual size, e.g. 512M, 20G, 1T.
        #[arg(long, value_parser = crate::size::disk_bytes, required_unless_present = "parent", conflicts_with = "parent")]
        size: Option<u64>,
        #[arg(
            long = "type",
            value_enum,
            default_value = "dynamic",
            conflicts_with = "parent"
        )]
        kind: Kind,
        /// Block size: a power of two. VHD: default 2M. VHDX: 1M to 256M, default
        /// 32M as Hyper-V (2M for a differencing disk). Smaller VHDX blocks are
        /// better for differencing disks and small scattered writes (less space
        /// allocated per write, smaller files); larger ones for big sequential
        /// data (fewer metadata updates).
        #[arg(long, value_parser = crate::size::disk_bytes)]
        block_size: Option<u64>,
        /// File format (default: by extension, .vhdx/.avhdx for VHDX).
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// VHDX logical sector size: 512 or 4096 (a differencing disk takes its parent's).
        #[arg(long, default_value_t = 512, value_parser = sector_size)]
        logical_sector_size: u32,
        /// VHDX physical sector size: 512 or 4096.
        #[arg(long, default_value_t = 4096, value_parser = sector_size)]
        physical_sector_size: u32,
        /// Make a differencing disk on this parent (same size as the parent).
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Keep --size exactly instead of rounding it to a CHS-exact size.
        #[arg(long)]
        exact_size: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show what a disk file is: type, sizes, geometry, creator, parent and chain.
    Info {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Validate a disk file's structure; exit 3 when problems remain.
    Check {
        path: PathBuf,
        /// Repair what is safe to repair (a damaged or differing footer copy).
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Merge a differencing disk into its parent, or into an ancestor (Merge-VHD).
    /// The chain reads the same before, during and after; merged files are removed.
    Merge {
        child: PathBuf,
        /// The ancestor to merge into (default: the parent).
        #[arg(long)]
        into: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Copy a disk or a whole chain into a new file: raw (.raw, .img, ...), VHD
    /// (.vhd) or VHDX (.vhdx), dynamic unless --type fixed. Zero ranges stay
    /// unallocated.
    Convert {
        src: PathBuf,
        dst: PathBuf,
        #[arg(long = "type", value_enum)]
        kind: Option<Kind>,
    },
    /// Drop the all-zero blocks of a dynamic VHD or VHDX (of a differencing VHDX: what its parent reads the same) and shrink its file.
    Compact {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Grow a VHD or VHDX, or shrink a VHDX down to its last block in use (as
    /// Hyper-V allows; a VHD never shrinks). The disk is resized on a copy (its
    /// data only) that replaces it when flushed: a crash leaves the old disk or
    /// the new one, never a mix.
    Resize {
        path: PathBuf,
        /// New virtual size, e.g. 40G (rounded up to a CHS-exact size unless --exact-size).
        #[arg(long, value_parser = crate::size::disk_bytes)]
        size: u64,
        #[arg(long)]
        exact_size: bool,
        /// Change the file itself instead of a copy: no room needed for a copy and
        /// done at once, but a crash part-way can leave the disk damaged.
        #[arg(long)]
        in_place: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-point a differencing disk at its parent after the parent moved.
    SetParent {
        child: PathBuf,
        #[arg(long)]
        parent: PathBuf,
        /// Accept a parent whose unique ID differs from the one the child recorded
        /// (only when you know its content is the same).
        #[arg(long)]
        ignore_id_mismatch: bool,
    },
    /// Export a disk or chain over NBD on a unix socket until Ctrl-C or SIGTERM.
    Serve(crate::vhd_serve::ServeArgs),
}

pub fn run(args: VhdArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        VhdCommand::Create {
            path,
            size,
            kind,
            block_size,
            format,
            logical_sector_size,
            physical_sector_size,
            parent,
            exact_size,
            json,
        } => {
            let vhdx = match format {
                Some(f) => f == FileFormat::Vhdx,
                None => vhd::is_vhdx_name(&path),
            };
            if vhdx {
                use vhd::vhdx::create::{NewVhdx, VhdxOptions};
                let kind = match (parent, size, kind) {
                    (Some(parent), _, _) => NewVhdx::Differencing { parent },
                    (None, Some(size), Kind::Fixed) => NewVhdx::Fixed { size },
                    (None, Some(size), Kind::Dynamic) => NewVhdx::Dynamic { size },
                    (None, None, _) => {
                        anyhow::bail!("give --size (or --parent for a differencing disk)")
                    }
                };
                let mut opts = VhdxOptions::new(kind);
                opts.block_size = block_size
                    .map(|b| {
                        u32::try_from(b)
                            .ok()
                            .filter(|b| b.is_power_of_two() && (1 << 20..=256 << 20).contains(b))
                            .with_context(|| {
                                format!("--block-size {b} is not a power of two from 1M to 256M")
                            })
                    })
                    .transpose()?;
                opts.logical_sector_size = logical_sector_size;
                opts.physical_sector_size = physical_sector_size;
                let created = vhd::vhdx::create::create(&path, &opts, &mut vhd::NoProgress)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&created)?);
                } else {
                    println!("created {} ({} bytes)", path.display(), created.size);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let block_size = match block_size {
                None => DEFAULT_BLOCK_SIZE,
                Some(b) => u32::try_from(b)
                    .ok()
                    .filter(|b| b.is_power_of_two())
                    .with_context(|| {
                        format!("--block-size {b} is not a power of two up to 256M")
                    })?,
            };
            let kind = match (parent, size, kind) {
                (Some(parent), _, _) => NewDisk::Differencing { parent },
                (None, Some(size), Kind::Fixed) => NewDisk::Fixed { size },
                (None, Some(size), Kind::Dynamic) => NewDisk::Dynamic { size, block_size },
                (None, None, _) => {
                    anyhow::bail!("give --size (or --parent for a differencing disk)")
                }
            };
            let created = create(
                &path,
                &CreateOptions { kind, exact_size },
                &mut vhd::NoProgress,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else if created.size != created.requested_size && created.requested_size != 0 {
                println!(
                    "created {} ({} bytes; {} were asked for, rounded up to a CHS-exact size)",
                    path.display(),
                    created.size,
                    created.requested_size
                );
            } else {
                println!("created {} ({} bytes)", path.display(), created.size);
            }
            Ok(ExitCode::SUCCESS)
        }
        VhdCommand::Info { path, json } => {
            let i = info::info(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print_info(&i);
            }
            Ok(ExitCode::SUCCESS)
        }
        VhdCommand::Check { path, repair, json } => {
            let report = check::check(&path, repair)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.problems.is_empty() {
                println!("{}: no problems found", path.display());
            } else {
                for p in &report.problems {
                    let tag = if p.repaired { "repaired" } else { "problem" };
                    println!("{tag}: {}", p.what);
                }
            }
            Ok(if report.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_PROBLEMS)
            })
        }
        VhdCommand::Merge { child, into, json } => {
            let mut bar = crate::progress_bar::ProgressBar::new("merging");
            let r = vhd::ops::merge::merge(&child, into.as_deref(), &mut bar)?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "merged {} bytes into {}; removed {}",
                    r.bytes_merged,
                    r.into.display(),
                    r.removed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VhdCommand::Convert { src, dst, kind } => {
            use vhd::ops::convert::{convert, Target};
            let vhdx = matches!(
                Target::for_path(&dst),
                Target::VhdxDynamic | Target::VhdxFixed
            );
            let target = match (kind, vhdx) {
                (None, _) => Target::for_path(&dst),
                (Some(Kind::Fixed), false) => Target::VhdFixed,
                (Some(Kind::Dynamic), false) => Target::VhdDynamic,
                (Some(Kind::Fixed), true) => Target::VhdxFixed,
                (Some(Kind::Dynamic), true) => Target::VhdxDynamic,
            };
            let mut bar = crate::progress_bar::ProgressBar::new("converting");
            convert(&src, &dst, target, &mut bar)?;
            bar.finish();
            println!("converted {} to {}", src.display(), dst.display());
            Ok(ExitCode::SUCCESS)
        }
        VhdCommand::Compact { path, json } => {
            let mut bar = crate::progress_bar::ProgressBar::new("compacting");
            let r = vhd::ops::compact::compact(&path, &mut bar)?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "compacted {}: {} -> {} bytes",
                    path.display(),
                    r.file_size_before,
                    r.file_size_after
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VhdCommand::Resize {
            path,
            size,
            exact_size,
            in_place,
            json,
        } => {
            let r = if in_place {
                vhd::ops::resize::resize(&path, size, exact_size)?
            } else {
                let tmp = vhd::ops::partial::random_partial_path(&path);
                let mut bar = crate::progress_bar::ProgressBar::new("resizing");
                let r = vhd::ops::resize::resize_via(&path, &tmp, size, exact_size, &mut bar)?;
                bar.finish();
                r
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "resized {}: {} -> {} bytes",
                    path.display(),
                    r.old_size,
                    r.new_size
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VhdCommand::SetParent {
            child,
            parent,
            ignore_id_mismatch,
        } => {
            vhd::ops::set_parent::set_parent(&child, &parent, ignore_id_mismatch)?;
            println!("{} now has parent {}", child.display(), parent.display());
            Ok(ExitCode::SUCCESS)
        }
        VhdCommand::Serve(args) => crate::vhd_serve::run(args),
    }
}

fn print_info(i: &info::DiskInfo) {
    let kind = i
        .disk_type
        .map(|t| format!("{t:?}").to_lowercase())
        .unwrap_or_else(|| "raw".into());
    println!("file:            {}", i.path.display());
    println!("format:          {:?} ({kind})", i.format);
    println!(
        "virtual size:    {} bytes ({})",
        i.virtual_size,
        crate::size::human(i.virtual_size)
    );
    if let (Some(g), Some(gs)) = (i.geometry, i.geometry_size) {
        println!(
            "geometry:        {}/{}/{} (C/H/S) = {} bytes{}",
            g.cylinders,
            g.heads,
            g.sectors_per_track,
            gs,
            if gs != i.virtual_size {
                "  (readers that go by geometry see this size)"
            } else {
                ""
            }
        );
    }
    if let Some(b) = i.block_size {
        println!("block size:      {b} bytes");
    }
    if let (Some(l), Some(p)) = (i.logical_sector_size, i.physical_sector_size) {
        println!("sector size:     {l} bytes logical, {p} bytes physical");
    }
    if let Some(g) = &i.data_write_guid {
        println!("data write guid: {g}");
    }
    if let Some(l) = &i.log_needs_replay {
        println!("log:             needs replay: {l}");
    }
    if let Some(c) = &i.creator {
        println!("creator:         {c:?}");
    }
    if let Some(u) = &i.unique_id {
        println!("unique id:       {u}");
    }
    println!("file size:       {} bytes", i.file_size);
    println!("allocated:       {} bytes", i.allocated_bytes);
    if let Some(p) = &i.parent {
        println!("parent name:     {}", p.name);
        for l in &p.locators {
            println!("parent locator:  {l}");
        }
        println!("parent id:       {}", p.expected_unique_id);
        match (&p.resolved_path, &p.problem) {
            (Some(r), None) => println!("parent:          {} (resolves)", r.display()),
            (_, Some(problem)) => println!("parent:          does not resolve: {problem}"),
            (None, None) => {}
        }
    }
    if i.chain.len() > 1 {
        println!("chain:");
        for c in &i.chain {
            println!("  {}", c.display());
        }
    }
}

fn sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        _ => Err(format!("{s} is not a sector size: give 512 or 4096")),
    }
}
