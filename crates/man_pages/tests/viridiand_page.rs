//! viridiand(8), made from the service's own command line definition, is roff
//! that groff reads without a warning and documents the service's options.

use std::process::Command;

use clap::CommandFactory;

#[test]
fn viridiand_page_is_clean_roff_with_every_option() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = daemon::config::DaemonConfig::command();
    let longs: Vec<String> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect();
    let written = man_pages::write_pages(cmd, "8", dir.path()).unwrap();
    assert_eq!(written, [dir.path().join("viridiand.8")]);

    let lint = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&written[0])
        .output()
        .expect("groff runs (Debian package groff-base; scripts/setup.sh installs it)");
    let warnings = String::from_utf8_lossy(&lint.stderr);
    assert!(
        lint.status.success() && warnings.trim().is_empty(),
        "viridiand.8 is not clean roff:\n{warnings}"
    );
    let out = Command::new("man")
        .args(["-l", "-P", "cat", "--no-hyphenation", "--no-justification"])
        .arg(&written[0])
        .env("MANWIDTH", "200")
        .env("GROFF_NO_SGR", "1")
        .output()
        .expect("man runs (Debian package man-db)");
    // man-db formats plainly (no bold overstrikes) when its output is not a terminal.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("viridiand"), "{text}");
    assert!(text.contains("viridiand(8)"), "{text}");
    for long in longs {
        assert!(text.contains(&long), "viridiand(8) lacks {long}:\n{text}");
    }
}
