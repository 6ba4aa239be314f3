//! `viridian disk ...`: the storage engine's operations, run by viridiand as jobs
//! (so they work on a remote host too). `viridian vhd` is the offline tool.

use api::disks::{
    CompactDiskRequest, ConvertDiskRequest, CreateDiskRequest, DiskKind, ImageFormat,
    MergeDiskRequest, ResizeDiskRequest,
};
use clap::{Subcommand, ValueEnum};

use crate::connection::Connection;
use crate::failure::Failure;
use crate::job_cmd::start;
use crate::size::disk_bytes;

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Kind {
    Fixed,
    Dynamic,
    Differencing,
}

impl From<Kind> for DiskKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Fixed => DiskKind::Fixed,
            Kind::Dynamic => DiskKind::Dynamic,
            Kind::Differencing => DiskKind::Differencing,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum SourceFormat {
    Vhd,
    Vhdx,
    Raw,
}

impl From<SourceFormat> for ImageFormat {
    fn from(f: SourceFormat) -> Self {
        match f {
            SourceFormat::Vhd => ImageFormat::Vhd,
            SourceFormat::Vhdx => ImageFormat::Vhdx,
            SourceFormat::Raw => ImageFormat::Raw,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Create a VHD/VHDX (the extension picks the format).
    Create {
        path: String,
        /// Virtual size, e.g. 10G (not for differencing disks).
        #[arg(long, value_parser = disk_bytes)]
        size: Option<u64>,
        #[arg(long, value_enum, default_value = "dynamic")]
        kind: Kind,
        /// Parent disk, for --kind differencing.
        #[arg(long)]
        parent: Option<String>,
        /// Block size, e.g. 2M.
        #[arg(long, value_parser = disk_bytes)]
        block_size: Option<u64>,
    },
    /// Merge a differencing disk into its parent.
    Merge { path: String },
    /// Convert to another format or kind, into a new file.
    Convert {
        path: String,
        destination: String,
        #[arg(long, value_enum)]
        kind: Option<Kind>,
        /// The source's format; `raw` reads a raw image (without it the source must
        /// be a VHD or VHDX).
        #[arg(long, value_enum)]
        source_format: Option<SourceFormat>,
    },
    /// Give unused blocks back to the host.
    Compact { path: String },
    /// Change the virtual size.
    Resize {
        path: String,
        #[arg(long, value_parser = disk_bytes)]
        size: u64,
    },
}

pub fn run(cmd: DiskCmd, conn: &Connection) -> Result<(), Failure> {
    let client = conn.client()?;
    match cmd {
        DiskCmd::Create {
            path,
            size,
            kind,
            parent,
            block_size,
        } => {
            let block_size_bytes = block_size
                .map(|b| {
                    u32::try_from(b)
                        .map_err(|_| Failure::Usage(format!("block size {b} is too large")))
                })
                .transpose()?;
            let path = conn.host_path(path);
            let parent = parent.map(|p| conn.host_path(p));
            let req = CreateDiskRequest {
                path,
                kind: kind.into(),
                size_bytes: size,
                parent,
                block_size_bytes,
            };
            start(&client, conn, "/v1/disks/create", &req)
        }
        DiskCmd::Merge { path } => start(
            &client,
            conn,
            "/v1/disks/merge",
            &MergeDiskRequest {
                path: conn.host_path(path),
            },
        ),
        DiskCmd::Convert {
            path,
            destination,
            kind,
            source_format,
        } => start(
            &client,
            conn,
            "/v1/disks/convert",
            &ConvertDiskRequest {
                path: conn.host_path(path),
                destination: conn.host_path(destination),
                kind: kind.map(Into::into),
                source_format: source_format.map(Into::into),
            },
        ),
        DiskCmd::Compact { path } => start(
            &client,
            conn,
            "/v1/disks/compact",
            &CompactDiskRequest {
                path: conn.host_path(path),
            },
        ),
        DiskCmd::Resize { path, size } => start(
            &client,
            conn,
            "/v1/disks/resize",
            &ResizeDiskRequest {
                path: conn.host_path(path),
                size_bytes: size,
            },
        ),
    }
}
