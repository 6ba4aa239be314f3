//! `viridian`: the command-line tool. `viridian vhd ...` works on disk files
//! directly, with no daemon; every other command talks to `viridiand`.

mod checkpoint_cmd;
mod client;
mod connection;
mod disk_cmd;
mod failure;
mod job_cmd;
mod job_wait;
mod output;
mod progress_bar;
mod size;
mod switch_cmd;
mod transfer_cmd;
mod vhd_cmd;
mod vhd_serve;
mod vm_cmd;
mod vm_lifecycle;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "viridian",
    version,
    about = "Viridian: virtual machines on Linux, Hyper-V style"
)]
struct Cli {
    #[command(flatten)]
    connection: connection::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work on VHD/VHDX files directly (offline; no daemon needed).
    Vhd(vhd_cmd::VhdArgs),
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        cmd: vm_cmd::VmCmd,
    },
    /// Checkpoints of a VM: create, list, rename, apply, delete.
    Checkpoint {
        #[command(subcommand)]
        cmd: checkpoint_cmd::CheckpointCmd,
    },
    /// Jobs (long operations run by viridiand).
    Job {
        #[command(subcommand)]
        cmd: job_cmd::JobCmd,
    },
    /// Disk operations run by viridiand as jobs (works on remote hosts too).
    Disk {
        #[command(subcommand)]
        cmd: disk_cmd::DiskCmd,
    },
    /// Virtual switches.
    Switch {
        #[command(subcommand)]
        cmd: switch_cmd::SwitchCmd,
    },
    /// The host: version, build, accelerator, limits, processor control and what
    /// running VMs reserve; `host set` changes the defaults for new VMs.
    Host {
        #[command(subcommand)]
        cmd: Option<HostCmd>,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages, viridian(1) and viridian-GROUP(1), into a folder.
    #[command(hide = true)]
    Man {
        /// The folder to write them to (made if missing).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // `viridian host | head` ends quietly, as other command-line tools do, instead
    // of panicking on the closed pipe: the default SIGPIPE action ends the process.
    // SAFETY: signal(2) with SIG_DFL, before any thread starts; no handler is
    // installed, so nothing runs in signal context.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let conn = cli.connection;
    let result = match cli.command {
        Command::Vhd(args) => {
            return match vhd_cmd::run(args) {
                Ok(code) => code,
                Err(err) => {
                    eprintln!("error: {err}");
                    for cause in err.chain().skip(1) {
                        eprintln!("  caused by: {cause}");
                    }
                    ExitCode::from(1)
                }
            }
        }
        Command::Vm { cmd } => vm_cmd::run(cmd, &conn),
        Command::Job { cmd } => job_cmd::run(cmd, &conn),
        Command::Checkpoint { cmd } => checkpoint_cmd::run(cmd, &conn),
        Command::Disk { cmd } => disk_cmd::run(cmd, &conn),
        Command::Switch { cmd } => switch_cmd::run(cmd, &conn),
        Command::Host { cmd: None } => host(&conn),
        Command::Host {
            cmd:
                Some(HostCmd::Set {
                    default_reserve,
                    default_limit,
                    default_weight,
                    mac_address_minimum,
                    mac_address_maximum,
                }),
        } => host_set(
            &conn,
            api::host::UpdateHostRequest {
                default_reserve_percent: default_reserve,
                default_limit_percent: default_limit,
                default_relative_weight: default_weight,
                mac_address_minimum,
                mac_address_maximum,
            },
        ),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "viridian",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => {
            let exit_status = man_pages::Section {
                title: "EXIT STATUS",
                items: failure::EXIT_STATUS,
            };
            return match man_pages::write_pages_with(Cli::command(), "1", &[exit_status], &out) {
                Ok(written) => {
                    for path in written {
                        println!("{}", path.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    if let Some(cause) = std::error::Error::source(&err) {
                        eprintln!("  caused by: {cause}");
                    }
                    ExitCode::from(1)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if conn.json {
                eprintln!("{}", failure.to_json());
            } else {
                eprintln!("error: {failure}");
                if let Some(more) = failure.details_text() {
                    eprint!("{more}");
                }
            }
            ExitCode::from(failure.exit_code())
        }
    }
}

#[derive(clap::Subcommand, Debug)]
enum HostCmd {
    /// Processor settings every new VM gets (existing VMs keep theirs; use
    /// `viridian vm processor set --all` for them), and the pool adapters added
    /// without a MAC address take theirs from.
    Set {
        /// Percent of one logical processor reserved per virtual processor, 0-100.
        #[arg(long)]
        default_reserve: Option<u8>,
        /// Percent limit per virtual processor, 0-100.
        #[arg(long)]
        default_limit: Option<u8>,
        /// Relative weight, 1-10000.
        #[arg(long)]
        default_weight: Option<u32>,
        /// The first address of the dynamic MAC pool, e.g. 02:15:5d:00:00:00.
        #[arg(long)]
        mac_address_minimum: Option<String>,
        /// The last address of the dynamic MAC pool (the same first byte).
        #[arg(long)]
        mac_address_maximum: Option<String>,
    },
}

fn host_set(
    conn: &connection::Connection,
    req: api::host::UpdateHostRequest,
) -> Result<(), failure::Failure> {
    let (info, _) =
        conn.client()?
            .call::<api::host::HostInfo>(hyper::Method::PATCH, "/v1/host", Some(&req))?;
    print_host(conn, &info);
    Ok(())
}

fn host(conn: &connection::Connection) -> Result<(), failure::Failure> {
    let info: api::host::HostInfo = conn.client()?.get("/v1/host")?;
    print_host(conn, &info);
    Ok(())
}

fn print_host(conn: &connection::Connection, info: &api::host::HostInfo) {
    if conn.json {
        output::print_json(&info);
        return;
    }
    println!("viridian {} ({})", info.version, info.build);
    println!(
        "accelerator: {} ({})",
        info.accelerator.kind, info.accelerator.reason
    );
    println!("data dir:    {}", info.data_dir);
    println!(
        "storage:     {} (the storage roots)",
        info.storage_roots.join(", ")
    );
    let f = &info.firmware;
    println!(
        "firmware:    generation 1: {} ({})",
        f.generation1, f.generation1_reason
    );
    println!("             generation 2: {}", f.generation2);
    println!(
        "network:     {} ({})",
        info.network.data_path, info.network.reason
    );
    let v = &info.network.vlan;
    println!("vlans:       access: {}; trunk: {}", v.access, v.trunk);
    println!(
        "             bridge VLAN filtering: {} ({})",
        if v.bridge_vlan_filtering { "yes" } else { "no" },
        v.bridge_vlan_filtering_reason
    );
    println!(
        "             802.1Q: {} ({})",
        if v.dot1q { "yes" } else { "no" },
        v.dot1q_reason
    );
    let l = &info.limits;
    println!(
        "limits:      up to {} processors per VM, {}-{} MiB memory",
        l.max_processors_per_vm, l.min_memory_mib, l.max_memory_mib
    );
    println!(
        "             IDE {}×{}, SCSI {}×{}",
        l.ide_controllers, l.ide_locations, l.scsi_controllers, l.scsi_locations
    );
    println!(
        "jobs:        kept {} s after finishing, at most {} finished",
        l.job_retention_seconds, l.job_limit
    );
    let r = &info.resources;
    println!("processors:  {}", info.processor_control);
    println!(
        "             running VMs reserve {} % of {} % ({} logical processors × 100 % − {} % host reserve)",
        r.processor_reserved_percent,
        r.processor_capacity_percent,
        r.logical_processors,
        r.host_reserve_percent
    );
    println!(
        "memory:      running VMs hold {} MiB of {} MiB ({} MiB − {} MiB headroom)",
        r.memory_assigned_mib, r.memory_capacity_mib, r.memory_total_mib, r.memory_headroom_mib
    );
    let d = &info.new_vm_defaults;
    println!(
        "new VMs:     reserve {} %, limit {} %, weight {}",
        d.reserve_percent, d.limit_percent, d.relative_weight
    );
    println!(
        "MAC pool:    {} – {} (for adapters added without a MAC address)",
        info.mac_address_pool.minimum, info.mac_address_pool.maximum
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_import_takes_repeated_switch_mappings_and_refuses_one_without_equals() {
        let cli = Cli::try_parse_from([
            "viridian",
            "vm",
            "import",
            "/e/web",
            "--check",
            "--switch",
            "lab=here",
            "--switch",
            "backend=none",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Vm {
            cmd:
                vm_cmd::VmCmd::Import {
                    switch_mapping,
                    check,
                    ..
                },
        } = cli.command
        else {
            panic!("not parsed as vm import");
        };
        assert!(check);
        assert_eq!(
            switch_mapping,
            vec![
                ("lab".to_string(), "here".to_string()),
                ("backend".to_string(), "none".to_string())
            ]
        );
        let err =
            match Cli::try_parse_from(["viridian", "vm", "import", "/e/web", "--switch", "lab"]) {
                Ok(_) => panic!("--switch lab was accepted"),
                Err(e) => e.to_string(),
            };
        assert!(err.contains("is not OLD=NEW"), "{err}");
    }
}
