//! `viridian checkpoint create|list|rename|apply|delete`.

use std::io::{BufRead, IsTerminal, Write};

use api::checkpoints::{
    Checkpoint, CheckpointTree, CreateCheckpointRequest, RenameCheckpointRequest,
};
use clap::Subcommand;
use hyper::Method;

use crate::client::segment;
use crate::connection::Connection;
use crate::failure::Failure;
use crate::job_cmd;
use crate::output;

#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// Take a checkpoint (a running VM's memory is saved with it; the guest pauses briefly).
    Create {
        vm: String,
        /// Default: "<VM name> - (<YYYY-MM-DD> - <HH:MM:SS>)".
        #[arg(long)]
        name: Option<String>,
    },
    /// The checkpoints, oldest first, or as a tree.
    List {
        vm: String,
        #[arg(long)]
        tree: bool,
    },
    /// Rename a checkpoint.
    Rename {
        vm: String,
        checkpoint: String,
        new_name: String,
    },
    /// Go back to a checkpoint (the VM must be Off or Saved; the current state is discarded).
    Apply { vm: String, checkpoint: String },
    /// Delete a checkpoint; its disks are merged into its descendant (or wait while it has several).
    Delete {
        vm: String,
        checkpoint: String,
        /// Also delete every checkpoint below it.
        #[arg(long)]
        subtree: bool,
        /// Do not ask for confirmation (--subtree asks otherwise).
        #[arg(long)]
        yes: bool,
    },
}

fn base(vm: &str) -> String {
    format!("/v1/vms/{}/checkpoints", segment(vm))
}

pub fn run(cmd: CheckpointCmd, conn: &Connection) -> Result<(), Failure> {
    let client = conn.client()?;
    match cmd {
        CheckpointCmd::Create { vm, name } => {
            let job = job_cmd::start_job(
                &client,
                conn,
                Method::POST,
                &base(&vm),
                Some(&CreateCheckpointRequest { name }),
            )?;
            if !conn.json {
                for a in &job.affected_elements {
                    match a.kind.as_str() {
                        "checkpoint" => println!("checkpoint {}", a.id),
                        "guest-downtime-ms" => println!("guest downtime: {} ms", a.id),
                        _ => {}
                    }
                }
            }
            Ok(())
        }
        CheckpointCmd::List { vm, tree } => {
            let t: CheckpointTree = client.get(&base(&vm))?;
            if conn.json {
                output::print_json(&t);
            } else if tree {
                print_tree(&t);
            } else {
                print_table(&t);
            }
            Ok(())
        }
        CheckpointCmd::Rename {
            vm,
            checkpoint,
            new_name,
        } => {
            let (cp, _) = client.call::<Checkpoint>(
                Method::PATCH,
                &format!("{}/{}", base(&vm), segment(&checkpoint)),
                Some(&RenameCheckpointRequest { name: new_name }),
            )?;
            if conn.json {
                output::print_json(&cp);
            } else {
                println!("checkpoint {} is now named {:?}", cp.id, cp.name);
            }
            Ok(())
        }
        CheckpointCmd::Apply { vm, checkpoint } => job_cmd::start_job(
            &client,
            conn,
            Method::POST,
            &format!("{}/{}/apply", base(&vm), segment(&checkpoint)),
            None::<&()>,
        )
        .map(drop),
        CheckpointCmd::Delete {
            vm,
            checkpoint,
            subtree,
            yes,
        } => {
            if subtree && !yes && !confirm(&vm, &checkpoint)? {
                return Err(Failure::Other("nothing deleted".into()));
            }
            let path = format!(
                "{}/{}{}",
                base(&vm),
                segment(&checkpoint),
                if subtree { "/subtree" } else { "" }
            );
            job_cmd::start_job(&client, conn, Method::DELETE, &path, None::<&()>).map(drop)
        }
    }
}

fn confirm(vm: &str, checkpoint: &str) -> Result<bool, Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::Usage(
            "deleting a subtree asks for confirmation; pass --yes when not on a terminal".into(),
        ));
    }
    eprint!("Delete checkpoint {checkpoint:?} of VM {vm:?} and every checkpoint below it? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::Other(format!("cannot read the answer: {e}")))?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

fn size(bytes: u64) -> String {
    crate::size::human(bytes)
}

fn print_table(t: &CheckpointTree) {
    println!(
        "{:<36}  {:<32}  {:<24}  {:>10}  {:<6}  PARENT",
        "ID", "NAME", "CREATED", "ON DISK", "MEMORY"
    );
    for c in &t.checkpoints {
        println!(
            "{:<36}  {:<32}  {:<24}  {:>10}  {:<6}  {}{}",
            c.id,
            c.name,
            c.created,
            size(c.size_on_disk_bytes),
            if c.has_memory_state { "yes" } else { "no" },
            c.parent
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            if c.is_current_parent {
                "  <- current state"
            } else {
                ""
            }
        );
    }
    print_merges(t);
}

fn print_tree(t: &CheckpointTree) {
    let roots: Vec<&Checkpoint> = t
        .checkpoints
        .iter()
        .filter(|c| c.parent.is_none())
        .collect();
    for r in roots {
        print_node(t, r, 0);
    }
    if t.current_parent.is_none() {
        println!("* Now (current state)");
    }
    print_merges(t);
}

fn print_node(t: &CheckpointTree, c: &Checkpoint, depth: usize) {
    let pad = "  ".repeat(depth);
    println!(
        "{pad}- {} ({}, {}, {}{})",
        c.name,
        c.created,
        size(c.size_on_disk_bytes),
        c.id,
        if c.has_memory_state {
            ", with memory"
        } else {
            ""
        }
    );
    for child in &c.children {
        if let Some(cc) = t.checkpoints.iter().find(|x| x.id == *child) {
            print_node(t, cc, depth + 1);
        }
    }
    if c.is_current_parent {
        println!("{pad}  * Now (current state)");
    }
}

fn print_merges(t: &CheckpointTree) {
    for m in &t.pending_merges {
        let pct = m
            .percent_complete
            .map(|p| format!(" {p} %"))
            .unwrap_or_default();
        println!(
            "merge {:?}{pct}: deleted checkpoint {:?} ({}): {}",
            m.state, m.name, m.id, m.reason
        );
    }
}
