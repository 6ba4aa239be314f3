//! Strict input through a real viridiand: bodies that are not objects, 405 with
//! `Allow`, names that pass for ids or hide characters, the bearer scheme in any case,
//! the token file's mode and the generated certificate's validity.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{build, parse_reply, Daemon, Reply};
use serde_json::{json, Value};

#[test]
fn json_bodies_that_are_not_objects_are_refused_and_change_nothing() {
    let d = Daemon::start(&[]);
    d.create_vm("existing");
    let host_before = d.get("/v1/host").body["new_vm_defaults"].clone();
    let before = d.snapshot();
    let disks = d.data.join("Virtual Hard Disks");
    let cases = [
        ("PATCH", "/v1/host", "[null,null]"),
        ("PATCH", "/v1/host", "[5, 5, 5]"),
        (
            "POST",
            "/v1/disks/create",
            r#"["positional.vhdx","dynamic",1048576]"#,
        ),
        ("POST", "/v1/vms", r#"["positional"]"#),
        ("PATCH", "/v1/vms/existing", "[]"),
        ("PATCH", "/v1/vms/existing/processor", "[2]"),
        ("POST", "/v1/vms/existing/checkpoints", r#"["cp"]"#),
        ("POST", "/v1/vms/existing/start", "[]"),
        ("POST", "/v1/diagnostics/sleep-job", "[1]"),
        ("PATCH", "/v1/host", "null"),
        ("PATCH", "/v1/host", "  \"text\""),
        ("PATCH", "/v1/host", "42"),
        ("PATCH", "/v1/host", "true"),
    ];
    for (method, path, body) in cases {
        let r = d.req(method, path, Some(body));
        assert_eq!(
            (r.status, r.code()),
            (400, "MalformedRequest"),
            "{method} {path} {body}: {}",
            r.raw
        );
        let message = r.body["message"].as_str().unwrap_or("");
        assert!(message.contains("JSON object"), "{message}");
    }
    assert_eq!(d.get("/v1/host").body["new_vm_defaults"], host_before);
    assert_eq!(d.snapshot(), before, "no refused body changed a VM");
    assert!(
        !disks.join("positional.vhdx").exists(),
        "a positional array must not create a disk"
    );
    assert_eq!(d.get("/v1/jobs").body["jobs"], json!([]));
    // The object form still works.
    let r = d.req(
        "PATCH",
        "/v1/host",
        Some(r#"{"default_limit_percent": 90}"#),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
}

#[test]
fn a_405_lists_the_methods_of_the_path_in_allow() {
    let d = Daemon::start(&[]);
    d.create_vm("web");
    let cases = [
        ("PUT", "/v1/jobs", "GET"),
        ("POST", "/v1/host", "GET, PATCH"),
        ("PUT", "/v1/vms/web", "DELETE, GET, PATCH"),
        ("PUT", "/v1/vms/no-such-vm", "DELETE, GET, PATCH"),
        ("GET", "/v1/vms/web/start", "POST"),
        ("PUT", "/v1/vms/import", "POST"),
        ("DELETE", "/v1/vms/web/drives", "GET, POST"),
        ("OPTIONS", "/v1/vms", "GET, POST"),
        ("HEAD", "/v1/openapi.json", "GET"),
    ];
    for (method, path, allow) in cases {
        let r = d.req(method, path, None);
        assert_eq!(r.status, 405, "{method} {path}: {}", r.raw);
        assert_eq!(
            r.header("allow").as_deref(),
            Some(allow),
            "{method} {path}: {}",
            r.raw
        );
    }
    // Every path of the route table answers a method it lacks with its methods.
    for route in api::openapi::routes() {
        let path = route
            .path
            .replace("{vm}", "no-such-vm")
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{checkpoint}", "cp")
            .replace("{controller}", "ide")
            .replace("{number}", "0")
            .replace("{location}", "0")
            .replace("{mac}", "52:54:00:00:00:01");
        let mut methods: Vec<String> = api::openapi::routes()
            .iter()
            .filter(|r| r.path == route.path)
            .map(|r| r.method.to_uppercase())
            .collect();
        methods.sort();
        let r = d.req("TRACE", &path, None);
        assert_eq!(r.status, 405, "TRACE {path}: {}", r.raw);
        assert_eq!(r.header("allow"), Some(methods.join(", ")), "{path}");
    }
}

fn vm_id(d: &Daemon, name: &str) -> String {
    d.create_vm(name)["id"].as_str().unwrap().to_string()
}

#[test]
fn vm_names_that_read_as_uuids_or_hold_invisible_characters_are_refused() {
    let d = Daemon::start(&[]);
    let first = vm_id(&d, "first");
    let simple = first.replace('-', "");
    let braced = format!("{{{first}}}");
    let urn = format!("urn:uuid:{first}");
    let before = d.snapshot();
    for name in [first.as_str(), &simple, &braced, &urn] {
        let r = d.post("/v1/vms", json!({"name": name}));
        assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
        assert!(
            r.body["message"].as_str().unwrap().contains("UUID"),
            "{}",
            r.raw
        );
    }
    let invisible = [
        ("RLO\u{202E}txt", "U+202E"),
        ("isolate\u{2066}x", "U+2066"),
        ("mark\u{200F}", "U+200F"),
        ("arabic\u{061C}mark", "U+061C"),
        ("zero\u{200B}width", "U+200B"),
        ("joiner\u{200D}", "U+200D"),
        ("word\u{2060}joiner", "U+2060"),
        ("\u{FEFF}bom", "U+FEFF"),
        ("soft\u{00AD}hyphen", "U+00AD"),
        ("tag\u{E0041}", "U+E0041"),
        ("private\u{E000}", "U+E000"),
        ("line\u{2028}sep", "U+2028"),
        ("del\u{7F}", "U+007F"),
    ];
    for (name, code_point) in invisible {
        let r = d.post("/v1/vms", json!({"name": name}));
        assert_eq!(
            (r.status, r.code()),
            (422, "InvalidParameter"),
            "{name:?}: {}",
            r.raw
        );
        let message = r.body["message"].as_str().unwrap();
        assert!(
            message.contains(code_point) || message.contains("control character"),
            "{name:?}: {message}"
        );
        // A rename to such a name is refused the same way.
        let r = d.req(
            "PATCH",
            "/v1/vms/first",
            Some(&json!({"name": name}).to_string()),
        );
        assert_eq!(
            (r.status, r.code()),
            (422, "InvalidParameter"),
            "{name:?}: {}",
            r.raw
        );
    }
    let r = d.req(
        "PATCH",
        "/v1/vms/first",
        Some(&json!({"name": simple}).to_string()),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    assert_eq!(d.snapshot(), before, "no refused name changed anything");
    assert_eq!(d.get("/v1/vms").body["vms"].as_array().unwrap().len(), 1);

    // So `delete <uuid>` can only mean the VM with that id.
    let r = d.req("DELETE", &format!("/v1/vms/{first}"), None);
    assert_eq!(r.status, 202, "{}", r.raw);
    common::wait_job(&d, r.body["id"].as_str().unwrap());
    assert_eq!(d.get("/v1/vms").body["vms"], json!([]));

    // Visible names in any script are fine, spaces inside too.
    for name in ["Ünïcödé web", "データベース", "web-01 (copy)"] {
        let r = d.post("/v1/vms", json!({"name": name}));
        assert_eq!(r.status, 201, "{name:?}: {}", r.raw);
    }
}

#[test]
fn checkpoint_names_that_read_as_uuids_or_hold_invisible_characters_are_refused() {
    let d = Daemon::start(&[]);
    d.create_vm("web");
    let path = "/v1/vms/web/checkpoints";
    let r = d.post(path, json!({"name": "before"}));
    assert_eq!(r.status, 202, "{}", r.raw);
    let job = common::wait_job(&d, r.body["id"].as_str().unwrap());
    assert_eq!(job["state"], "Completed", "{job}");
    let cp = d.get(path).body["checkpoints"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, says) in [
        (cp.as_str(), "UUID"),
        ("bidi\u{202E}", "U+202E"),
        ("zero\u{200B}", "U+200B"),
        ("bom\u{FEFF}", "U+FEFF"),
    ] {
        let r = d.post(path, json!({"name": name}));
        assert_eq!(
            (r.status, r.code()),
            (422, "InvalidParameter"),
            "{name:?}: {}",
            r.raw
        );
        assert!(
            r.body["message"].as_str().unwrap().contains(says),
            "{}",
            r.raw
        );
        let r = d.req(
            "PATCH",
            &format!("{path}/before"),
            Some(&json!({"name": name}).to_string()),
        );
        assert_eq!(
            (r.status, r.code()),
            (422, "InvalidParameter"),
            "{name:?}: {}",
            r.raw
        );
    }
    let names: Vec<Value> = d.get(path).body["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("before")]);
}

#[test]
fn a_stored_vm_whose_name_breaks_the_new_rules_still_loads_and_can_be_changed() {
    let mut d = Daemon::start(&[]);
    let id = vm_id(&d, "legacy");
    d.stop();
    let file = d.data.join("vms").join(&id).join("vm.json");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["settings"]["name"] = json!("legacy\u{200B}name");
    std::fs::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    d.launch();
    let list = d.get("/v1/vms").body;
    assert_eq!(list["vms"][0]["name"], "legacy\u{200B}name", "{list}");
    assert_eq!(list["vms"][0]["state"], "Off", "{list}");
    // Other changes keep the old name.
    let r = d.req(
        "PATCH",
        &format!("/v1/vms/{id}"),
        Some(r#"{"memory_mib": 512}"#),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    // A new name must follow the rules; a visible one fixes it.
    let r = d.req(
        "PATCH",
        &format!("/v1/vms/{id}"),
        Some(r#"{"name": "legacy-name"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tls_request(port: u16, cert_pem: &[u8], request: &[u8]) -> Reply {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &cert_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    parse_reply(&out)
}

fn wait_for_tcp(d: &Daemon, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "TCP listener did not come up: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_bearer_scheme_matches_in_any_case() {
    let port = free_port();
    let d = Daemon::start(&["--listen", &format!("127.0.0.1:{port}")]);
    wait_for_tcp(&d, port);
    let token = std::fs::read_to_string(d.data.join("token"))
        .unwrap()
        .trim()
        .to_string();
    let cert = std::fs::read(d.data.join("tls/cert.pem")).unwrap();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {token}");
        let r = tls_request(
            port,
            &cert,
            &build("GET", "/v1/host", None, &[("Authorization", &auth)]),
        );
        assert_eq!(r.status, 200, "{scheme}: {}", r.raw);
    }
    for auth in [
        format!("Basic {token}"),
        format!("Bearer{token}"),
        format!("Bearer {}", &token[1..]),
        format!("Bearer {token}x"),
        token.clone(),
    ] {
        let r = tls_request(
            port,
            &cert,
            &build("GET", "/v1/host", None, &[("Authorization", &auth)]),
        );
        assert_eq!(
            (r.status, r.code()),
            (401, "Unauthorized"),
            "{auth}: {}",
            r.raw
        );
    }
}

#[test]
fn a_token_file_group_or_others_can_read_stops_the_daemon_with_the_fix() {
    for mode in [0o644, 0o640, 0o604] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let token = data.join("token");
        std::fs::write(&token, format!("{}\n", "a".repeat(64))).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_viridiand"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "mode {mode:o} must stop the daemon");
        let err = String::from_utf8_lossy(&out.stderr);
        let path = token.display().to_string();
        assert!(
            err.contains(&path)
                && err.contains(&format!("{mode:04o}"))
                && err.contains(&format!("chmod 600 {path}")),
            "{err}"
        );
        assert!(!dir.path().join("s.sock").exists(), "it must not serve");
        // The file is left as it was: fixing it is the operator's call.
        let kept = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
        assert_eq!(kept, mode);
    }
    // A new token file is private, and a private one is taken.
    let mut d = Daemon::start(&[]);
    let token = d.data.join("token");
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    d.restart();
    assert_eq!(d.get("/v1/host").status, 200);
}

/// Whether `openssl x509 -checkend` says the certificate still holds in `days` days.
fn valid_in(cert: &Path, days: i64) -> bool {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-checkend"])
        .arg((days * 86_400).to_string())
        .arg("-in")
        .arg(cert)
        .output()
        .expect("openssl runs");
    out.status.success()
}

fn self_signed(not_after: (i32, u8, u8)) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn place_certificate(d: &Daemon, (cert, key): (String, String)) {
    let tls = d.data.join("tls");
    std::fs::write(tls.join("cert.pem"), cert).unwrap();
    std::fs::write(tls.join("key.pem"), key).unwrap();
}

fn today() -> (i32, u8, u8) {
    let out = Command::new("date")
        .args(["-u", "+%Y %m %d"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut parts = text.split_whitespace().map(|p| p.parse::<i32>().unwrap());
    let (y, m, d) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    (y, m as u8, d as u8)
}

#[test]
fn generated_certificates_last_three_years_and_are_renewed_near_their_end() {
    let port = free_port();
    let mut d = Daemon::start(&["--listen", &format!("127.0.0.1:{port}")]);
    wait_for_tcp(&d, port);
    let cert = d.data.join("tls/cert.pem");
    assert!(valid_in(&cert, 3 * 365 - 2), "valid for three years");
    assert!(!valid_in(&cert, 3 * 365 + 2), "and no longer");
    let token = std::fs::read_to_string(d.data.join("token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let served = |d: &Daemon| {
        wait_for_tcp(d, port);
        let pem = std::fs::read(&cert).unwrap();
        let r = tls_request(
            port,
            &pem,
            &build("GET", "/v1/host", None, &[("Authorization", &auth)]),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
    };
    served(&d);

    // An old one valid until 4096 (what earlier versions made) is made again.
    d.stop();
    place_certificate(&d, self_signed((4096, 1, 1)));
    d.launch();
    served(&d);
    assert!(valid_in(&cert, 3 * 365 - 2) && !valid_in(&cert, 3 * 365 + 2));

    // One that ends within 30 days is made again.
    d.stop();
    let (y, m, _) = today();
    let soon = if m == 12 {
        (y + 1, 1, 1)
    } else {
        (y, m + 1, 1)
    };
    place_certificate(&d, self_signed(soon));
    assert!(!valid_in(&cert, 40));
    d.launch();
    served(&d);
    assert!(valid_in(&cert, 3 * 365 - 2));

    // One with more than 30 days left is kept as it is.
    d.stop();
    place_certificate(&d, self_signed((y + 1, m, 1)));
    let kept = std::fs::read(&cert).unwrap();
    d.launch();
    served(&d);
    assert_eq!(std::fs::read(&cert).unwrap(), kept);

    // --renew-certificate makes a new one at start.
    d.stop();
    let mut renewing = Command::new(env!("CARGO_BIN_EXE_viridiand"))
        .arg("--data-dir")
        .arg(&d.data)
        .arg("--socket")
        .arg(&d.socket)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--renew-certificate",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read(&cert).unwrap_or_default() == kept {
        assert!(
            Instant::now() < deadline,
            "--renew-certificate made no new certificate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    served(&d);
    assert!(valid_in(&cert, 3 * 365 - 2));
    let key_mode = std::fs::metadata(d.data.join("tls/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    renewing.kill().unwrap();
    renewing.wait().unwrap();
}

/// One documented bound of a request field, read from the served document.
struct Bound {
    keyword: &'static str,
    limit: i64,
}

fn bounds(doc: &Value, schema: &str, field: &str) -> Vec<Bound> {
    let prop = &doc["components"]["schemas"][schema]["properties"][field];
    assert!(prop.is_object(), "{schema}.{field} is not in the document");
    ["minimum", "maximum", "minLength", "maxLength"]
        .into_iter()
        .filter_map(|k| {
            // A u64's width (past i64) is held by serde's parser, not by a rule.
            prop[k].as_f64().filter(|v| *v < 9.0e18).map(|v| Bound {
                keyword: k,
                limit: v as i64,
            })
        })
        .collect()
}

#[test]
fn every_documented_limit_is_the_one_the_daemon_enforces() {
    let d = Daemon::start(&[]);
    let doc = d.get("/v1/openapi.json").body;
    let vm = vm_id(&d, "limits");
    let r = d.post(&format!("/v1/vms/{vm}/checkpoints"), json!({"name": "cp"}));
    common::wait_job(&d, r.body["id"].as_str().unwrap());
    let cp = d.get(&format!("/v1/vms/{vm}/checkpoints")).body["checkpoints"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let vm_path = format!("/v1/vms/{vm}");
    let processor = format!("/v1/vms/{vm}/processor");
    let checkpoints = format!("/v1/vms/{vm}/checkpoints");
    let checkpoint = format!("/v1/vms/{vm}/checkpoints/{cp}");
    // (method, path, schema, field, the limits it must document)
    let cases: Vec<LimitCase> = vec![
        (
            "PATCH",
            "/v1/host",
            "UpdateHostRequest",
            "default_reserve_percent",
            &["maximum"],
        ),
        (
            "PATCH",
            "/v1/host",
            "UpdateHostRequest",
            "default_limit_percent",
            &["maximum"],
        ),
        (
            "PATCH",
            "/v1/host",
            "UpdateHostRequest",
            "default_relative_weight",
            &["minimum", "maximum"],
        ),
        (
            "POST",
            "/v1/vms",
            "CreateVmRequest",
            "name",
            &["minLength", "maxLength"],
        ),
        (
            "POST",
            "/v1/vms",
            "CreateVmRequest",
            "generation",
            &["minimum", "maximum"],
        ),
        (
            "POST",
            "/v1/vms",
            "CreateVmRequest",
            "processor_count",
            &["minimum"],
        ),
        (
            "POST",
            "/v1/vms",
            "CreateVmRequest",
            "memory_mib",
            &["minimum"],
        ),
        (
            "POST",
            "/v1/vms",
            "CreateVmRequest",
            "notes",
            &["maxLength"],
        ),
        (
            "PATCH",
            &vm_path,
            "UpdateVmRequest",
            "name",
            &["minLength", "maxLength"],
        ),
        (
            "PATCH",
            &vm_path,
            "UpdateVmRequest",
            "memory_mib",
            &["minimum"],
        ),
        (
            "PATCH",
            &vm_path,
            "UpdateVmRequest",
            "notes",
            &["maxLength"],
        ),
        (
            "PATCH",
            &processor,
            "UpdateProcessorRequest",
            "count",
            &["minimum"],
        ),
        (
            "PATCH",
            &processor,
            "UpdateProcessorRequest",
            "reserve_percent",
            &["maximum"],
        ),
        (
            "PATCH",
            &processor,
            "UpdateProcessorRequest",
            "limit_percent",
            &["maximum"],
        ),
        (
            "PATCH",
            &processor,
            "UpdateProcessorRequest",
            "relative_weight",
            &["minimum", "maximum"],
        ),
        (
            "POST",
            &checkpoints,
            "CreateCheckpointRequest",
            "name",
            &["minLength", "maxLength"],
        ),
        (
            "PATCH",
            &checkpoint,
            "RenameCheckpointRequest",
            "name",
            &["minLength", "maxLength"],
        ),
        (
            "POST",
            "/v1/diagnostics/sleep-job",
            "SleepJobRequest",
            "milliseconds",
            &["maximum"],
        ),
        (
            "PUT",
            "/v1/vms/limits/settings",
            "ProcessorSettings",
            "relative_weight",
            &["minimum", "maximum"],
        ),
    ];
    hold_limits(&d, &doc, cases);
}

type LimitCase<'a> = (&'a str, &'a str, &'a str, &'a str, &'a [&'a str]);

/// Each case's documented limits are in the served document, the value at each
/// limit is accepted and the one beyond it refused with `InvalidParameter`.
fn hold_limits(d: &Daemon, doc: &Value, cases: Vec<LimitCase>) {
    let mut unique = 0u32;
    let mut text = |len: i64| {
        unique += 1;
        // A distinct letter first so no two names collide.
        let first = char::from_u32(0x100 + unique).unwrap();
        let rest = "n".repeat((len - 1).max(0) as usize);
        if len == 0 {
            String::new()
        } else {
            format!("{first}{rest}")
        }
    };
    for (method, path, schema, field, expected) in cases {
        let found = bounds(doc, schema, field);
        for keyword in expected {
            assert!(
                found.iter().any(|b| b.keyword == *keyword),
                "{schema}.{field} documents no {keyword}"
            );
        }
        for b in found {
            if b.keyword == "minimum" && b.limit == 0 {
                continue; // unsigned: below 0 is a type error, not a limit
            }
            let (at, beyond) = match b.keyword {
                "minimum" => (json!(b.limit), json!(b.limit - 1)),
                "maximum" => (json!(b.limit), json!(b.limit + 1)),
                "minLength" => (json!(text(b.limit)), json!(text(b.limit - 1))),
                _ => (json!(text(b.limit)), json!(text(b.limit + 1))),
            };
            if *path == *"/v1/vms/limits/settings" {
                continue; // VmSettings shares ProcessorSettings with PATCH processor (same checks); only its document is checked here
            }
            // A maximum that is only the integer's width: past it the body is not this
            // type at all; at it, other rules (the host's processors) may refuse.
            let width = b.keyword == "maximum"
                && (b.limit == i64::from(u32::MAX) || [255, 65535].contains(&b.limit));
            for (value, accepted) in [(beyond, false), (at, true)] {
                if accepted && width {
                    continue;
                }
                let body = json!({ field: value });
                let body = if *path == *"/v1/vms" && field != "name" {
                    json!({"name": text(8), field: value})
                } else {
                    body
                };
                let r = d.req(method, path, Some(&body.to_string()));
                if accepted {
                    assert!(
                        (200..=202).contains(&r.status),
                        "{method} {path} {body}: the documented {} {} must be accepted: {}",
                        b.keyword,
                        b.limit,
                        r.raw
                    );
                    if r.status == 202 {
                        let id = r.body["id"].as_str().unwrap();
                        d.req("DELETE", &format!("/v1/jobs/{id}"), None);
                        common::wait_job(d, id);
                    }
                } else if width {
                    // The integer's width: past it the body is not this type at all.
                    assert_eq!(
                        (r.status, r.code()),
                        (400, "MalformedRequest"),
                        "{method} {path} {body}: beyond the documented {} {} must be refused: {}",
                        b.keyword,
                        b.limit,
                        r.raw
                    );
                } else {
                    assert_eq!(
                        (r.status, r.code()),
                        (422, "InvalidParameter"),
                        "{method} {path} {body}: beyond the documented {} {} must be refused: {}",
                        b.keyword,
                        b.limit,
                        r.raw
                    );
                }
            }
        }
    }
}

#[test]
fn every_documented_switch_limit_is_the_one_the_daemon_enforces() {
    // Switches are bridges: this daemon runs in a network namespace of its own.
    let d = Daemon::start_in_netns(&[]);
    let doc = d.get("/v1/openapi.json").body;
    let r = d.post("/v1/switches", json!({"name": "limits"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let switch = format!("/v1/switches/{}", r.body["id"].as_str().unwrap());
    let cases: Vec<LimitCase> = vec![
        (
            "POST",
            "/v1/switches",
            "CreateSwitchRequest",
            "name",
            &["minLength", "maxLength"],
        ),
        (
            "PATCH",
            &switch,
            "UpdateSwitchRequest",
            "name",
            &["minLength", "maxLength"],
        ),
    ];
    hold_limits(&d, &doc, cases);
}
