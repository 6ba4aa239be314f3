//! The API's edges through a real viridiand: bad input, TCP with TLS and the token,
//! the OpenAPI document, host information.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{build, parse_reply, Daemon, Reply};
use serde_json::json;

#[test]
fn bad_input_gets_a_4xx_with_a_stable_code_and_changes_nothing() {
    let d = Daemon::start(&[]);
    d.create_vm("existing");
    let before = d.snapshot();
    let big = format!(
        "{{\"name\":\"x\",\"notes\":\"{}\"}}",
        "a".repeat(api::MAX_BODY_BYTES + 10)
    );
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("POST", "/v1/vms", Some("{\"name\": ".into()), 400, "MalformedRequest"),
        ("POST", "/v1/vms", Some("[]".into()), 400, "MalformedRequest"),
        ("POST", "/v1/vms", Some("".into()), 400, "MalformedRequest"),
        ("POST", "/v1/vms", Some(r#"{"name":"x","colour":"green"}"#.into()), 400, "MalformedRequest"),
        ("POST", "/v1/vms", Some(r#"{"name":"x","memory_mib":"lots"}"#.into()), 400, "MalformedRequest"),
        ("POST", "/v1/vms", Some(r#"{"name":"../etc"}"#.into()), 422, "InvalidParameter"),
        ("POST", "/v1/vms", Some(r#"{"name":"a/b"}"#.into()), 422, "InvalidParameter"),
        ("POST", "/v1/vms", Some(r#"{"name":"a\\b"}"#.into()), 422, "InvalidParameter"),
        ("POST", "/v1/vms", Some(r#"{"name":"bell\u0007"}"#.into()), 422, "InvalidParameter"),
        ("POST", "/v1/vms", Some(r#"{"name":"new\nline"}"#.into()), 422, "InvalidParameter"),
        ("POST", "/v1/vms", Some(big), 413, "PayloadTooLarge"),
        ("PATCH", "/v1/vms/existing", Some(r#"{"name":"x/y"}"#.into()), 422, "InvalidParameter"),
        ("PATCH", "/v1/vms/existing", Some(r#"{"id":"00000000-0000-0000-0000-000000000000"}"#.into()), 400, "MalformedRequest"),
        ("PATCH", "/v1/vms/existing/processor", Some(r#"{"count":-1}"#.into()), 400, "MalformedRequest"),
        ("POST", "/v1/vms/existing/drives", Some(r#"{"controller":"sata","media":{"type":"dvd"}}"#.into()), 400, "MalformedRequest"),
        ("POST", "/v1/vms/existing/drives", Some(r#"{"controller":"scsi","media":{"type":"hard_disk","path":"/etc/../etc/passwd.vhd"}}"#.into()), 422, "InvalidParameter"),
        ("DELETE", "/v1/vms/existing/drives/sata/0/0", None, 422, "InvalidParameter"),
        ("POST", "/v1/disks/create", Some(r#"{"path":"../../escape.vhdx","kind":"dynamic","size_bytes":1048576}"#.into()), 422, "InvalidParameter"),
        ("POST", "/v1/disks/convert", Some(r#"{"path":"a.vhd","destination":"sub/../../x.vhdx"}"#.into()), 422, "InvalidParameter"),
        ("POST", "/v1/disks/shred", Some("{}".into()), 404, "NotFound"),
        ("GET", "/v1/vms/..%2F..%2Fetc", None, 404, "NotFound"),
        ("GET", "/v1/vms/bad%zzescape", None, 400, "MalformedRequest"),
        ("GET", "/v1/nothing-here", None, 404, "NotFound"),
        ("PUT", "/v1/jobs", None, 405, "MethodNotAllowed"),
        ("POST", "/v1/diagnostics/sleep-job", Some(r#"{"milliseconds":99999999}"#.into()), 422, "InvalidParameter"),
    ];
    for (method, path, body, status, code) in cases {
        let r = d.req(method, path, body.as_deref());
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{method} {path}: {}",
            &r.raw[..r.raw.len().min(400)]
        );
        assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        d.snapshot(),
        before,
        "no bad request changed anything on disk"
    );
    assert_eq!(d.get("/v1/vms").body["vms"].as_array().unwrap().len(), 1);
    assert!(!d.dir.path().join("escape.vhdx").exists());
}

#[test]
fn socket_is_mode_0660_and_host_reports_limits() {
    let d = Daemon::start(&[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let host = d.get("/v1/host").body;
    assert_eq!(host["version"], env!("CARGO_PKG_VERSION"));
    assert!(["kvm", "tcg"].contains(&host["accelerator"]["kind"].as_str().unwrap()));
    assert!(!host["accelerator"]["reason"].as_str().unwrap().is_empty());
    assert_eq!(host["limits"]["scsi_locations"], 64);
    assert_eq!(host["limits"]["job_limit"], 4096);
    // scripts/setup.sh builds Viridian's SeaBIOS; by default generation 1 boots it.
    let fw = &host["firmware"];
    assert_eq!(
        fw["generation1"],
        worker::firmware::VIRIDIAN_SEABIOS,
        "{host}"
    );
    assert!(
        fw["generation1_reason"]
            .as_str()
            .unwrap()
            .contains("ATA DMA"),
        "{host}"
    );
    assert_eq!(fw["generation2"], worker::runtime::OVMF_CODE, "{host}");
}

#[test]
fn bios_option_picks_qemus_own_and_a_bad_image_stops_the_daemon_with_the_reason() {
    let d = Daemon::start(&["--bios", "qemu"]);
    let fw = d.get("/v1/host").body["firmware"].clone();
    assert_eq!(fw["generation1"], "qemu", "{fw}");
    assert!(
        fw["generation1_reason"]
            .as_str()
            .unwrap()
            .contains("one sector per request"),
        "{fw}"
    );

    let dir = tempfile::tempdir().unwrap();
    let not_a_bios = dir.path().join("bios.bin");
    std::fs::write(&not_a_bios, b"MZ not a firmware image").unwrap();
    for (image, says) in [
        (dir.path().join("missing.bin"), "No such file"),
        (not_a_bios, "23 bytes"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_viridiand"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--bios")
            .arg(&image)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&image.display().to_string()) && err.contains(says),
            "{err}"
        );
        assert!(!dir.path().join("s.sock").exists(), "it must not serve");
    }
}

#[test]
fn served_openapi_document_is_valid_and_lists_every_route() {
    let d = Daemon::start(&[]);
    let r = d.get("/v1/openapi.json");
    assert_eq!(r.status, 200);
    let doc: openapiv3::OpenAPI =
        serde_json::from_value(r.body.clone()).expect("valid OpenAPI 3.0 document");
    for route in api::openapi::routes() {
        assert!(
            doc.paths.paths.contains_key(route.path),
            "{} missing",
            route.path
        );
    }
    // Real answers decode into the types the document was generated from.
    let vm: api::vms::Vm = serde_json::from_value(d.create_vm("typed")).unwrap();
    assert_eq!(vm.runtime.state, api::vms::VmState::Off);
    let _: api::host::HostInfo = serde_json::from_value(d.get("/v1/host").body).unwrap();
    let err: api::ErrorBody = serde_json::from_value(d.get("/v1/vms/missing").body).unwrap();
    assert_eq!(err.code, api::ErrorCode::NotFound);
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

#[test]
fn tcp_needs_tls_and_the_token() {
    let port = free_port();
    let d = Daemon::start(&["--listen", &format!("127.0.0.1:{port}")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "TCP listener did not come up: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let token_path = d.data.join("token");
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();
    let cert = std::fs::read(d.data.join("tls/cert.pem")).unwrap();

    let r = tls_request(port, &cert, &build("GET", "/v1/host", None, &[]));
    assert_eq!((r.status, r.code()), (401, "Unauthorized"));
    let r = tls_request(
        port,
        &cert,
        &build(
            "POST",
            "/v1/vms",
            Some(r#"{"name":"sneaky"}"#),
            &[("Authorization", "Bearer wrong")],
        ),
    );
    assert_eq!((r.status, r.code()), (401, "Unauthorized"));
    assert_eq!(
        d.get("/v1/vms").body["vms"],
        json!([]),
        "the refused request created nothing"
    );
    let auth = format!("Bearer {token}");
    let r = tls_request(
        port,
        &cert,
        &build("GET", "/v1/host", None, &[("Authorization", &auth)]),
    );
    assert_eq!(r.status, 200, "{}", r.raw);

    // Plain HTTP on the TLS port gets no HTTP answer: the token never travels in clear.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(&build("GET", "/v1/host", None, &[("Authorization", &auth)]))
        .unwrap();
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
}

#[test]
fn every_route_in_the_openapi_document_is_served() {
    let d = Daemon::start(&[]);
    for route in api::openapi::routes() {
        if route.path == "/v1/events" {
            continue; // a stream; covered by the events tests
        }
        let path = route
            .path
            .replace("{vm}", "no-such-vm")
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{controller}", "ide")
            .replace("{number}", "0")
            .replace("{location}", "0")
            .replace("{mac}", "52:54:00:00:00:01")
            .replace("{switch}", "no-such-switch");
        let method = route.method.to_uppercase();
        let body = if route.request.is_some() {
            Some("{}")
        } else {
            None
        };
        let r = d.req(&method, &path, body);
        let message = r.body["message"].as_str().unwrap_or("");
        assert!(
            !message.contains("there is no endpoint") && r.status != 405,
            "{method} {path} is in the document but not served: {}",
            r.raw
        );
    }
}
