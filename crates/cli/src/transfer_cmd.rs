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
    /// `--switch OLD=NEW`, in the order given.
    pub switch_mapping: Vec<(String, String)>,
}

/// Parses one `--switch OLD=NEW`.
pub fn parse_switch_mapping(text: &str) -> Result<(String, String), String> {
    let Some((old, new)) = text.split_once('=') else {
        return Err(format!(
            "{text:?} is not OLD=NEW: give the exported switch's name, `=`, and a switch of this host (or none), like lab=lan or lab=none"
        ));
    };
    let (old, new) = (old.trim(), new.trim());
    if old.is_empty() || new.is_empty() {
        return Err(format!(
            "{text:?} leaves out the {} switch: give OLD=NEW, like lab=lan or lab=none",
            if old.is_empty() { "exported" } else { "new" }
        ));
    }
    Ok((old.to_string(), new.to_string()))
}

/// The `--switch` mappings as the request carries them; an OLD given twice is refused.
fn switch_mapping(
    given: Vec<(String, String)>,
) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    let mut out = std::collections::BTreeMap::new();
    for (old, new) in given {
        if let Some(before) = out.insert(old.clone(), new.clone()) {
            return Err(Failure::Usage(format!(
                "--switch maps {old} twice (to {before} and to {new}); give each exported switch once"
            )));
        }
    }
    Ok(out)
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
        switch_mapping: switch_mapping(args.switch_mapping)?,
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
    for (i, sw) in r.switches.iter().enumerate() {
        let to = match (&sw.switch_name, sw.matched_by.as_str()) {
            (Some(name), how) => format!("switch {name} (by {how})"),
            (None, "mapping") => "disconnected (by mapping)".to_string(),
            (None, _) => "no switch here".to_string(),
        };
        s.push_str(&format!(
            "{:<13}{} -> {to}: {}\n",
            if i == 0 { "switches:" } else { "" },
            sw.exported,
            sw.adapters.join(", ")
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_mappings_are_old_equals_new_each_old_once() {
        assert_eq!(
            parse_switch_mapping("lab=here"),
            Ok(("lab".into(), "here".into()))
        );
        assert_eq!(
            parse_switch_mapping("backend=none"),
            Ok(("backend".into(), "none".into()))
        );
        let no_eq = parse_switch_mapping("lab").unwrap_err();
        assert!(no_eq.contains("is not OLD=NEW"), "{no_eq}");
        let no_new = parse_switch_mapping("lab=").unwrap_err();
        assert!(no_new.contains("leaves out the new switch"), "{no_new}");
        let no_old = parse_switch_mapping("=here").unwrap_err();
        assert!(
            no_old.contains("leaves out the exported switch"),
            "{no_old}"
        );
        let twice = switch_mapping(vec![("lab".into(), "a".into()), ("lab".into(), "b".into())])
            .unwrap_err();
        assert!(twice.to_string().contains("maps lab twice"), "{twice}");
        assert_eq!(twice.exit_code(), 2);
    }
}
