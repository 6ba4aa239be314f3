//! Manual pages from clap definitions: a program's own page, and one page per
//! subcommand group (`viridian-vm(1)`) that documents every command below it, so
//! `man viridian-vm` answers "what does `viridian vm nic set` take?".
//!
//! Rendering is `clap_mangen`'s; this crate only decides which pages exist and
//! what goes on a group's page. It knows nothing of Viridian's commands.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

/// One manual page: its file name (`viridian-vm.1`) and its roff source.
#[derive(Debug, Clone)]
pub struct Page {
    pub file_name: String,
    pub roff: Vec<u8>,
}

/// Why pages could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the manual page folder {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the manual page {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A section of the program's own page beyond what clap knows (EXIT STATUS,
/// FILES): a list of tagged paragraphs.
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    pub title: &'a str,
    /// (tag, text): `("4", "NotFound.")`.
    pub items: &'a [(&'a str, &'a str)],
}

/// The program's page, and one page for each visible subcommand of it, all in
/// `section` (`"1"` for user commands, `"8"` for services).
pub fn pages(cmd: Command, section: &str) -> Vec<Page> {
    pages_with(cmd, section, &[])
}

/// [`pages`], with `extra` sections on the program's own page, after its options
/// and subcommands.
pub fn pages_with(cmd: Command, section: &str, extra: &[Section]) -> Vec<Page> {
    // clap's own `help` subcommand would get a page of its own; `--help` stays.
    let mut cmd = cmd.disable_help_subcommand(true);
    // Gives every subcommand its display name (`viridian-vm`) and bin name
    // (`viridian vm`), and copies global arguments down to them.
    cmd.build();
    let mut pages = vec![main_page(
        Man::new(cmd.clone()).section(section),
        &cmd,
        extra,
    )];
    for group in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        pages.push(group_page(group, section));
    }
    for p in &mut pages {
        p.roff = escape_non_ascii(&p.roff);
    }
    pages
}

/// roff input is ASCII: troff reads other characters (the help texts' `—`, `×`)
/// only through a preprocessor, so each is written as its `\[uXXXX]` escape,
/// which groff and mandoc both read.
fn escape_non_ascii(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\[u{:04X}]", u32::from(c)));
        }
    }
    out.into_bytes()
}

/// Writes [`pages`] into `dir` (made if missing); returns the files written.
pub fn write_pages(cmd: Command, section: &str, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    write_pages_with(cmd, section, &[], dir)
}

/// Writes [`pages_with`] into `dir` (made if missing); returns the files written.
pub fn write_pages_with(
    cmd: Command,
    section: &str,
    extra: &[Section],
    dir: &Path,
) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for p in pages_with(cmd, section, extra) {
        let path = dir.join(&p.file_name);
        std::fs::write(&path, &p.roff).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// The program's page as `clap_mangen` writes it, with `extra` before VERSION.
fn main_page(man: Man, cmd: &Command, extra: &[Section]) -> Page {
    let mut out = Vec::new();
    // Rendering into a Vec cannot fail.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let _ = man.render_description_section(&mut out);
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        let _ = man.render_options_section(&mut out);
    }
    if cmd.get_subcommands().any(|c| !c.is_hide_set()) {
        let _ = man.render_subcommands_section(&mut out);
    }
    if cmd.get_after_long_help().is_some() || cmd.get_after_help().is_some() {
        let _ = man.render_extra_section(&mut out);
    }
    for s in extra {
        let mut roff = Roff::new();
        roff.control("SH", [s.title]);
        for (tag, text) in s.items {
            roff.control("TP", []);
            roff.text([bold(*tag)]);
            roff.text([roman(*text)]);
        }
        let _ = roff.to_writer(&mut out);
    }
    if cmd.get_version().is_some() {
        let _ = man.render_version_section(&mut out);
    }
    if cmd.get_author().is_some() {
        let _ = man.render_authors_section(&mut out);
    }
    Page {
        file_name: man.get_filename(),
        roff: out,
    }
}

/// A group's page: its name, synopsis and description as `clap_mangen` writes them,
/// the options every command of the group takes, then a COMMANDS section with each
/// command below it (nested ones too): synopsis, what it does, its own options.
fn group_page(group: &Command, section: &str) -> Page {
    let man = Man::new(group.clone()).section(section);
    let mut out = Vec::new();
    // Rendering into a Vec cannot fail.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let _ = man.render_description_section(&mut out);
    let _ = man.render_options_section(&mut out);
    let mut leaves = Vec::new();
    commands_below(group, &mut leaves);
    if !leaves.is_empty() {
        let mut heading = Roff::new();
        heading.control("SH", ["COMMANDS"]);
        let _ = heading.to_writer(&mut out);
    }
    for cmd in leaves {
        command_entry(&cmd, &mut out);
    }
    if group.get_version().is_some() {
        let _ = man.render_version_section(&mut out);
    }
    Page {
        file_name: man.get_filename(),
        roff: out,
    }
}

/// Every visible command under `cmd`, depth first; a command with subcommands of
/// its own is listed too when it can run by itself (`viridian host`).
fn commands_below(cmd: &Command, out: &mut Vec<Command>) {
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        let has_subs = sub.get_subcommands().any(|c| !c.is_hide_set());
        if !has_subs || !sub.is_subcommand_required_set() {
            out.push(sub.clone());
        }
        commands_below(sub, out);
    }
}

fn command_entry(cmd: &Command, out: &mut Vec<u8>) {
    let name = cmd
        .get_bin_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned();
    let mut roff = Roff::new();
    roff.control("SS", [name.as_str()]);
    let _ = roff.to_writer(out);
    // The group's page lists the global options once; each command shows its own.
    let own = cmd.clone().mut_args(|a| {
        if a.is_global_set() || a.get_id() == "help" {
            a.hide(true)
        } else {
            a
        }
    });
    let man = Man::new(own);
    let mut synopsis = Vec::new();
    let _ = man.render_synopsis_section(&mut synopsis);
    out.extend(drop_section_headings(&synopsis));
    let mut about = Roff::new();
    about.control("PP", []);
    if let Some(text) = cmd.get_long_about().or_else(|| cmd.get_about()) {
        for line in text.to_string().lines() {
            if line.trim().is_empty() {
                about.control("PP", []);
            } else {
                about.text([roman(line)]);
            }
        }
    }
    let subs: Vec<&str> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name())
        .collect();
    if !subs.is_empty() {
        about.control("PP", []);
        about.text([roman("Commands: "), bold(subs.join(", "))]);
    }
    let _ = about.to_writer(out);
    let mut options = Vec::new();
    let _ = man.render_options_section(&mut options);
    out.extend(drop_section_headings(&options));
}

/// A section rendered on its own, without its `.SH` heading (and the prologue the
/// renderer puts before every fragment), to sit under a command's `.SS`.
fn drop_section_headings(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let mut out = Vec::new();
    let mut in_prologue = false;
    for line in text.lines() {
        if line.starts_with(".SH") {
            continue;
        }
        // roff's apostrophe prologue: `.ie \n(.g .ds Aq \(aq` / `.el .ds Aq '`.
        if line.starts_with(".ie \\n(.g .ds Aq") {
            in_prologue = true;
            continue;
        }
        if in_prologue && line.starts_with(".el .ds Aq") {
            in_prologue = false;
            continue;
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool() -> Command {
        Command::new("tool")
            .version("1.0")
            .about("A tool — for 2×2")
            .arg(clap::arg!(--socket <PATH> "Where").global(true))
            .subcommand(
                Command::new("vm")
                    .about("Virtual machines")
                    .subcommand_required(true)
                    .subcommand(
                        Command::new("create")
                            .about("Make one")
                            .arg(clap::arg!(--cpus <N> "How many")),
                    )
                    .subcommand(
                        Command::new("disk")
                            .subcommand_required(true)
                            .subcommand(Command::new("add").about("Attach a disk")),
                    ),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn extra_sections_go_on_the_programs_own_page_only() {
        let exit = Section {
            title: "EXIT STATUS",
            items: &[("0", "Success."), ("4", "NotFound.")],
        };
        let pages = pages_with(tool(), "1", &[exit]);
        let main = String::from_utf8(pages[0].roff.clone()).unwrap();
        let at = main.find(".SH \"EXIT STATUS\"").expect("the section");
        assert!(at < main.find(".SH VERSION").unwrap(), "{main}");
        assert!(main.contains(".TP\n\\fB4\\fR\nNotFound."), "{main}");
        let vm = String::from_utf8(pages[1].roff.clone()).unwrap();
        assert!(!vm.contains("EXIT STATUS"), "{vm}");
    }

    #[test]
    fn a_group_page_documents_every_command_below_it_and_the_globals_once() {
        let pages = pages(tool(), "1");
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(names, ["tool.1", "tool-vm.1"]);
        let main = String::from_utf8(pages[0].roff.clone()).unwrap();
        assert!(main.contains("A tool \\[u2014] for 2\\[u00D7]2"), "{main}");
        let vm = String::from_utf8(pages[1].roff.clone()).unwrap();
        assert!(vm.contains(".SS \"tool vm create\""), "{vm}");
        assert!(vm.contains(".SS \"tool vm disk add\""), "{vm}");
        assert!(!vm.contains(".SS \"tool vm disk\"\n"), "{vm}");
        assert!(vm.contains("\\-\\-cpus"), "{vm}");
        assert_eq!(
            vm.matches("\\-\\-socket").count(),
            2,
            "synopsis and options once: {vm}"
        );
    }
}
