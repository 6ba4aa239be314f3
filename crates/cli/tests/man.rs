//! `viridian man --out DIR`: the manual pages exist, are roff that groff reads
//! without a warning, and each group's page documents every command of the group.

use std::path::Path;
use std::process::Command;

fn viridian(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "viridian {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The command names under "Commands:" in clap's help text (without `help`).
fn commands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The page as a reader sees it, after groff has checked it: every warning
/// (`-ww`) fails the test.
fn render(page: &Path) -> String {
    let lint = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .output()
        .expect("groff runs (Debian package groff-base; scripts/setup.sh installs it)");
    let warnings = String::from_utf8_lossy(&lint.stderr);
    assert!(
        lint.status.success() && warnings.trim().is_empty(),
        "{} is not clean roff:\n{warnings}",
        page.display()
    );
    // `man -l` is what a user runs; plain text, no bold or underline overstrikes.
    let out = Command::new("man")
        .args(["-l", "-P", "cat", "--no-hyphenation", "--no-justification"])
        .arg(page)
        .env("MANWIDTH", "200")
        .env("GROFF_NO_SGR", "1")
        .output()
        .expect("man runs (Debian package man-db)");
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // man-db formats plainly (no bold overstrikes) when its output is not a terminal.
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn man_writes_a_page_per_command_group_each_naming_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let listed = viridian(&["man", "--out", out.to_str().unwrap()]);

    let groups = commands_in_help(&viridian(&["--help"]));
    assert!(groups.contains(&"vm".to_string()), "{groups:?}");
    assert!(
        !groups.contains(&"man".to_string()),
        "man is hidden: {groups:?}"
    );

    let main = render(&out.join("viridian.1"));
    assert!(listed.contains("viridian.1"), "{listed}");
    let exit_status = main
        .split("EXIT STATUS")
        .nth(1)
        .unwrap_or_else(|| panic!("viridian(1) has no EXIT STATUS:\n{main}"));
    for code in 0..=15 {
        assert!(
            exit_status
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))
                    || l.trim() == code.to_string()),
            "EXIT STATUS lacks {code}:\n{exit_status}"
        );
    }
    for group in &groups {
        assert!(
            main.contains(&format!("viridian-{group}(1)")),
            "viridian(1) does not point at viridian-{group}(1):\n{main}"
        );
        let page = out.join(format!("viridian-{group}.1"));
        assert!(page.exists(), "no page for {group}; wrote:\n{listed}");
        let text = render(&page);
        for command in commands_in_help(&viridian(&[group, "--help"])) {
            assert!(
                text.contains(&format!("viridian {group} {command}")),
                "viridian-{group}(1) does not document `{group} {command}`:\n{text}"
            );
        }
    }

    // Nested groups are documented down to their commands, with their options.
    let vm = render(&out.join("viridian-vm.1"));
    assert!(vm.contains("viridian vm disk add"), "{vm}");
    assert!(vm.contains("--controller"), "{vm}");
    // The global options are on the group's page once, not on every command.
    assert_eq!(
        vm.matches("VIRIDIAN_SOCKET").count(),
        1,
        "--socket is documented more than once:\n{vm}"
    );
}

#[test]
fn man_reports_a_folder_it_cannot_make() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["man", "--out"])
        .arg(file.join("man1"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot create the manual page folder") && err.contains("caused by"),
        "{err}"
    );
}
