//! The guide cannot go stale: every fenced block in `docs/*.md` whose info string
//! is `sh runnable` is run, as `docs/README.md` describes, against a real
//! `viridiand` started for its page. A block that fails fails the test with its
//! file, line and output.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The longest one block may take; the runnable examples boot no guest OS, so
/// most take about a second (running-vms.md's whole lifecycle about 5 s).
const BLOCK_TIME_LIMIT: Duration = Duration::from_secs(120);

/// `expect_exit CODE COMMAND...`: what the docs write for a command meant to fail
/// (`docs/README.md`); the block fails unless COMMAND exits with CODE.
const EXPECT_EXIT: &str = r#"expect_exit() {
    local want=$1 got=0
    shift
    "$@" || got=$?
    if [ "$got" -ne "$want" ]; then
        echo "expected exit code $want from: $*; it exited with $got" >&2
        return 1
    fi
}
"#;

/// `viridiand`, and the `viridian-worker` it runs VMs with, next to `viridian`;
/// built on demand when only this crate was built.
fn viridiand() -> PathBuf {
    let cli = Path::new(env!("CARGO_BIN_EXE_viridian"));
    for (package, bin) in [("worker", "viridian-worker"), ("daemon", "viridiand")] {
        if cli.with_file_name(bin).exists() {
            continue;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", bin]);
        if cli.to_string_lossy().contains("/release/") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cannot build {bin} for the docs test"
        );
    }
    cli.with_file_name("viridiand")
}

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

/// A fenced block of a Markdown file.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    info: String,
    code: String,
}

impl Block {
    fn runnable(&self) -> bool {
        let mut words = self.info.split_whitespace();
        words.next() == Some("sh") && words.any(|w| w == "runnable")
    }
}

/// The fenced blocks of `markdown` (backtick fences of three or more, as
/// CommonMark; a block left open runs to the end of the file).
fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String, usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let ticks = trimmed.chars().take_while(|&c| c == '`').count();
        match &mut open {
            None if ticks >= 3 => {
                open = Some((
                    i + 1,
                    trimmed[ticks..].trim().to_string(),
                    ticks,
                    String::new(),
                ));
            }
            Some((start, info, fence, code)) => {
                if ticks >= *fence && trimmed[ticks..].trim().is_empty() {
                    out.push(Block {
                        line: *start,
                        info: std::mem::take(info),
                        code: std::mem::take(code),
                    });
                    open = None;
                } else {
                    code.push_str(line);
                    code.push('\n');
                }
            }
            None => {}
        }
    }
    if let Some((line, info, _, code)) = open {
        out.push(Block { line, info, code });
    }
    out
}

/// A `viridiand` of one page's own: a temporary data dir, its socket, and its own
/// network namespace (`unshare --net`), so the switches a page makes never touch
/// the host's network.
struct Daemon {
    dir: tempfile::TempDir,
    socket: PathBuf,
    work: PathBuf,
    child: Child,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("viridian.sock");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let log = std::fs::File::create(dir.path().join("viridiand.log")).unwrap();
        // `unshare` execs the daemon: the child's pid is the daemon's.
        let child = Command::new("unshare")
            .args(["--net", "--"])
            .arg(viridiand())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(&socket)
            // The examples keep their files in the folder they run in.
            .arg("--storage-root")
            .arg(&work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("unshare runs (util-linux)");
        let mut d = Daemon {
            dir,
            socket,
            work,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&d.socket).is_err() {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("viridiand exited with {status}; log:\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "viridiand did not come up; log:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The last lines of the daemon's log.
    fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("viridiand.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs one block with bash (`-e -u -o pipefail`, each command traced) in the
    /// page's working folder; returns whether it succeeded and what it printed.
    fn run(&self, block: &Block) -> (bool, String) {
        let script = self.dir.path().join("block.sh");
        let mut text = String::from(EXPECT_EXIT);
        text.push_str("exec 2>&1\nset -euxo pipefail\n");
        text.push_str(&block.code);
        std::fs::write(&script, text).unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_viridian")).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = self.dir.path().join("block.out");
        let mut child = Command::new("bash")
            .arg("--noprofile")
            .arg("--norc")
            .arg(&script)
            .current_dir(&self.work)
            .env("PATH", path)
            .env("VIRIDIAN_SOCKET", &self.socket)
            .env_remove("VIRIDIAN_HOST")
            .env_remove("VIRIDIAN_TOKEN")
            .env_remove("VIRIDIAN_CA_CERT")
            .env("PS4", "+ ")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&output).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + BLOCK_TIME_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut printed = String::new();
        let _ = std::fs::File::open(&output)
            .and_then(|mut f| f.read_to_string(&mut printed).map(|_| ()));
        match status {
            Some(s) if s.success() => (true, printed),
            Some(s) => (false, format!("{printed}\n(exited with {s})")),
            None => (
                false,
                format!("{printed}\n(still running after {BLOCK_TIME_LIMIT:?}; killed)"),
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Workers outlive the service by design: turn off what a page left running
        // (a block that failed half way), so no QEMU outlives the test.
        let cli = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_viridian"))
                .env("VIRIDIAN_SOCKET", &self.socket)
                .args(args)
                .stderr(Stdio::null())
                .output()
        };
        if let Ok(out) = cli(&["--json", "vm", "list"]) {
            let list: api::vms::VmList = match serde_json::from_slice(&out.stdout) {
                Ok(list) => list,
                Err(_) => api::vms::VmList { vms: Vec::new() },
            };
            for vm in list.vms {
                if vm.state != api::vms::VmState::Off {
                    let _ = cli(&["vm", "stop", &vm.id.to_string()]);
                }
            }
        }
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `PROGRAM WORDS... --help`, remembered: the commands and flags that exist.
struct Helps {
    programs: HashMap<&'static str, PathBuf>,
    seen: HashMap<(String, Vec<String>), String>,
}

impl Helps {
    fn new() -> Helps {
        let mut programs = HashMap::new();
        programs.insert("viridian", PathBuf::from(env!("CARGO_BIN_EXE_viridian")));
        programs.insert("viridiand", viridiand());
        Helps {
            programs,
            seen: HashMap::new(),
        }
    }

    fn help(&mut self, program: &str, path: &[String]) -> String {
        let key = (program.to_string(), path.to_vec());
        if let Some(h) = self.seen.get(&key) {
            return h.clone();
        }
        let out = Command::new(&self.programs[program])
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        let h = String::from_utf8_lossy(&out.stdout).into_owned();
        self.seen.insert(key, h.clone());
        h
    }

    /// What is wrong with one command line of the docs: a flag its command does
    /// not have (global flags count for every command).
    fn check(&mut self, line: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        };
        for segment in code.split(['|', ';', '&', '(', '`']) {
            let words: Vec<&str> = segment.split_whitespace().collect();
            let Some(&program) = words.first() else {
                continue;
            };
            if !self.programs.contains_key(program) {
                continue;
            }
            let mut path: Vec<String> = Vec::new();
            for w in &words[1..] {
                if w.starts_with('-') {
                    continue;
                }
                let help = self.help(program, &path);
                if commands_in_help(&help).iter().any(|c| c == w) {
                    path.push(w.to_string());
                } else {
                    break;
                }
            }
            let own = self.help(program, &path);
            let global = self.help(program, &[]);
            for w in &words[1..] {
                let Some(flag) = w.trim_start_matches('[').strip_prefix("--") else {
                    continue;
                };
                let name: String = flag
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                let needle = format!("--{name}");
                if !name.is_empty() && !own.contains(&needle) && !global.contains(&needle) {
                    let mut shown = vec![program.to_string()];
                    shown.extend(path.iter().cloned());
                    problems.push(format!(
                        "`{}` has no {needle} (see `{} --help`)",
                        shown.join(" "),
                        shown.join(" ")
                    ));
                }
            }
        }
        problems
    }
}

/// The command names under "Commands:" in clap's help text.
fn commands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn fences_are_found_with_their_lines_and_markers() {
    let md = "# t\n\n```sh runnable\nviridian host\n```\n\n````sh\n```\n````\n```sh\nopen";
    let found = blocks(md);
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!((found[0].line, found[0].runnable()), (3, true), "{found:?}");
    assert_eq!(found[0].code, "viridian host\n");
    assert_eq!(found[1].code, "```\n", "a longer fence holds a shorter one");
    assert!(!found[1].runnable());
    assert_eq!((found[2].line, found[2].code.as_str()), (10, "open\n"));
}

#[test]
fn expect_exit_passes_only_the_exit_code_it_names() {
    let daemon = Daemon::start();
    let block = |code: &str| Block {
        line: 1,
        info: "sh runnable".into(),
        code: code.into(),
    };
    let (ok, out) = daemon.run(&block("expect_exit 4 viridian vm show nosuch\n"));
    assert!(ok, "{out}");
    let (ok, out) = daemon.run(&block("expect_exit 4 viridian vm list\n"));
    assert!(!ok && out.contains("it exited with 0"), "{out}");
    let (ok, out) = daemon.run(&block(
        "expect_exit 5 viridian vm show nosuch\necho after\n",
    ));
    assert!(!ok && out.contains("it exited with 4"), "{out}");
    assert!(!out.contains("\nafter\n"), "the block went on: {out}");
}

#[test]
fn every_command_in_docs_names_flags_that_exist() {
    let mut helps = Helps::new();
    assert!(helps
        .check("viridian vm create a --cpus 1 --memory 1G")
        .is_empty());
    assert!(helps
        .check("viridian --json vm list   # --nothing in a comment")
        .is_empty());
    assert_eq!(
        helps.check("viridian vm create a --cpus 1 --no-such-flag"),
        ["`viridian vm create` has no --no-such-flag (see `viridian vm create --help`)"]
    );
    assert_eq!(helps.check("viridiand [--no-such-flag N]").len(), 1);

    let mut problems = Vec::new();
    let mut pages: Vec<PathBuf> = std::fs::read_dir(docs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.push(docs_dir().join("../README.md"));
    for page in &pages {
        let markdown = std::fs::read_to_string(page).unwrap();
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        for b in blocks(&markdown) {
            if b.info.split_whitespace().next() != Some("sh") {
                continue;
            }
            for (i, line) in b.code.lines().enumerate() {
                for p in helps.check(line.trim()) {
                    problems.push(format!("{name}:{}: {p}", b.line + 1 + i));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "commands in the docs use flags that do not exist:\n{}",
        problems.join("\n")
    );
}

#[test]
fn jobs_and_api_lists_every_route_the_service_serves() {
    let page = std::fs::read_to_string(docs_dir().join("jobs-and-api.md")).unwrap();
    let rows: Vec<(String, String)> = page
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let path = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((cells[1].to_string(), path.to_string()))
        })
        .collect();
    let routes = api::openapi::routes();
    let mut missing = Vec::new();
    for r in &routes {
        let row = (r.method.to_uppercase(), r.path.to_string());
        if !rows.contains(&row) {
            missing.push(format!("| {} | `{}` | {} |", row.0, row.1, r.summary));
        }
    }
    let stale: Vec<&(String, String)> = rows
        .iter()
        .filter(|(m, p)| {
            !routes
                .iter()
                .any(|r| r.method.eq_ignore_ascii_case(m) && r.path == p)
        })
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/jobs-and-api.md's table of paths differs from api::openapi::routes():\nmissing rows:\n{}\nrows the service does not serve: {stale:?}",
        missing.join("\n")
    );
}

#[test]
fn every_runnable_example_in_docs_runs() {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(docs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    let mut ran = 0;
    let mut failures = Vec::new();
    for page in &pages {
        let markdown = std::fs::read_to_string(page).unwrap();
        let name = format!("docs/{}", page.file_name().unwrap().to_string_lossy());
        let all = blocks(&markdown);
        for b in &all {
            // A marker on anything but a shell block is a typo that would hide an example.
            if b.info.split_whitespace().skip(1).any(|w| w == "runnable") && !b.runnable() {
                failures.push(format!(
                    "{name}:{}: `runnable` is only for ```sh blocks (info string: {:?})",
                    b.line, b.info
                ));
            }
        }
        let runnable: Vec<&Block> = all.iter().filter(|b| b.runnable()).collect();
        if runnable.is_empty() {
            continue;
        }
        // One daemon per page: a page's blocks run in order and share its state.
        let daemon = Daemon::start();
        eprintln!("{name}: {} runnable examples", runnable.len());
        for b in runnable {
            ran += 1;
            let (ok, printed) = daemon.run(b);
            if !ok {
                failures.push(format!(
                    "{name}:{}: the example failed:\n{}\n--- output ---\n{printed}\n--- viridiand's log ---\n{}",
                    b.line,
                    b.code,
                    daemon.log()
                ));
                // Later blocks of the page build on this one.
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the docs' examples failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(ran >= 10, "only {ran} runnable examples in docs/");
}
