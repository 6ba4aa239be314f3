//! `viridian vm export` and `viridian vm import`.

use api::transfer::{ExportRequest, ImportMode, ImportReport, ImportRequest};
use hyper::Method;

use crate::client::segment;
use crate::connection::Connection;
use crate::failure::Failure;
use crate::job_cmd;
use crate::output;

pub fn export(
    conn: &Connection,
    vm: &str,
    dir: String,
    no_checkpoints: bool,
    checkpoint: Option<String>,
) -> Result<(), Failure> {
    let client = conn.client()?;
    let req = ExportRequest {
        destination: conn.host_path(dir),
        no_checkpoints,
        checkpoint,
    };
    let job = job_cmd::start_job(
        &client,
        conn,
        Method::POST,
        &format!("/v1/vms/{}/export", segment(vm)),
        Some(&req),
    )?;
    if !conn.json && !conn.no_wait {
        if let Some(a) = job.affected_elements.iter().find(|a| a.kind == "export") {
            println!("exported VM {vm} to {}", a.id);
        }
    }
    Ok(())
}

pub struct ImportArgs {
    pub dir: String,
    /// `Some("")`: copy into the data directory; `Some(dest)`: copy there.
    pub copy: Option<String>,
    pub new_id: bool,
    pub name: Option<String>,
    pub check: bool,
}

pub fn import(conn: &Connection, args: ImportArgs) -> Result<(), Failure> {
    let client = conn.client()?;
    let req = ImportRequest {
        source: conn.host_path(args.dir),
        mode: if args.copy.is_some() {
            ImportMode::Copy
        } else {
            ImportMode::Register
        },
        destination: args
            .copy
            .filter(|d| !d.is_empty())
            .map(|d| conn.host_path(d)),
        new_id: args.new_id,
        name: args.name,
    };
    if args.check {
        let (report, _) =
            client.call::<ImportReport>(Method::POST, "/v1/vms/import/check", Some(&req))?;
        if conn.json {
            output::print_json(&report);
        } else {
            print!("{}", report_text(&report));
        }
        return if report.problems.is_empty() {
            Ok(())
        } else {
            Err(Failure::Api(api::ErrorBody {
                code: api::ErrorCode::ImportIncompatible,
                message: format!("{} problem(s) stop this import", report.problems.len()),
                details: None,
            }))
        };
    }
    let job = job_cmd::start_job(&client, conn, Method::POST, "/v1/vms/import", Some(&req))?;
    if !conn.json && !conn.no_wait {
        if let Some(a) = job.affected_elements.iter().find(|a| a.kind == "vm") {
            println!("imported VM {}", a.id);
        }
    }
    Ok(())
}

/// The compatibility report as text: what comes in, then every problem and its fix.
pub fn report_text(r: &ImportReport) -> String {
    let mut s = format!("export:      {}\n", r.source);
    if let Some(name) = &r.vm_name {
        s.push_str(&format!("VM:          {name}"));
        if let Some(id) = r.vm_id {
            s.push_str(&format!(" ({id})"));
        }
        s.push('\n');
    }
    if let Some(state) = &r.state {
        s.push_str(&format!("arrives:     {state}\n"));
    }
    s.push_str(&format!(
        "checkpoints: {}\ndisks:       {} ({} MiB in all)\n",
        r.checkpoints,
        r.disks.len(),
        r.bytes.div_ceil(1 << 20)
    ));
    if r.problems.is_empty() {
        s.push_str("problems:    none; the import can go ahead\n");
    } else {
        s.push_str(&format!("problems:    {}\n", r.problems.len()));
        for p in &r.problems {
            s.push_str(&format!(
                "  - [{}] {}\n      fix: {}\n",
                p.kind, p.message, p.fix
            ));
        }
    }
    s
}
