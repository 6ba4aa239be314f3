//! Bounds on what one client can hold: connections, request bodies, jobs, event
//! listeners and waits, against a real `viridiand`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{build, parse_reply, Daemon, Reply};

/// Generous bound for "answers at once" on a loaded 2-core machine; a locked-out
/// client would wait for the 5 s read time-out (or forever) instead.
const PROMPT: Duration = Duration::from_secs(1);

fn set_nofile_soft(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct this function owns.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on a struct this function owns.
    unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0) };
    lim.rlim_max
}

/// A daemon started with the usual soft limit of 1,024 descriptors (what systemd
/// and login shells give), as the daemon meets it in real life. nextest runs each
/// test in its own process, so lowering this process's limit for the spawn is safe.
fn start_with_1024_descriptors(extra: &[&str]) -> Daemon {
    set_nofile_soft(1024);
    let d = Daemon::start(extra);
    set_nofile_soft(nofile_hard());
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_tcp(d: &Daemon, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "no TCP listener: {}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP connection to the daemon from `from`, started without waiting for it to be
/// set up (so a flood is in place at once, even when the daemon stops accepting and
/// the kernel makes late connections retry).
fn connect_from_at_once(from: Ipv4Addr, port: u16) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.set_nonblocking(true).unwrap();
    match s.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => panic!("connect: {e}"),
    }
    s.into()
}

/// A TCP connection to the daemon from the loopback address `from`.
fn connect_from(from: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::from((from, 0)).into())?;
    s.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    Ok(s.into())
}

struct Tls {
    config: Arc<rustls::ClientConfig>,
    token: String,
}

impl Tls {
    fn of(d: &Daemon) -> Tls {
        let cert = std::fs::read(d.data.join("tls/cert.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &cert[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let token = std::fs::read_to_string(d.data.join("token"))
            .unwrap()
            .trim()
            .to_string();
        Tls {
            config: Arc::new(config),
            token,
        }
    }

    /// One request with the token over TLS from `from`; status 0 when the daemon
    /// closed the connection without an answer.
    fn request(
        &self,
        from: Ipv4Addr,
        port: u16,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Reply {
        let auth = format!("Bearer {}", self.token);
        let request = build(method, path, body, &[("Authorization", &auth)]);
        let conn =
            rustls::ClientConnection::new(self.config.clone(), "localhost".try_into().unwrap())
                .unwrap();
        let tcp = connect_from(from, port).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut out = Vec::new();
        if tls.write_all(&request).is_ok() {
            let _ = tls.read_to_end(&mut out);
        }
        parse_reply(&out)
    }
}

/// One request on the unix socket that gives up after 5 s instead of hanging.
fn unix_request(socket: &Path, request: &[u8]) -> Reply {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    if s.write_all(request).is_ok() {
        let _ = s.read_to_end(&mut out);
    }
    parse_reply(&out)
}

/// Whether the daemon has closed this connection (EOF or reset within `within`).
fn closed_by_daemon(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn two_thousand_idle_tcp_connections_lock_out_neither_the_unix_socket_nor_a_client_with_the_token()
{
    let port = free_port();
    let d = start_with_1024_descriptors(&["--listen", &format!("127.0.0.1:{port}")]);
    wait_for_tcp(&d, port);
    let tls = Tls::of(&d);
    let flooder = Ipv4Addr::new(127, 0, 0, 2);
    let mut flood: Vec<TcpStream> = (0..2000)
        .map(|_| connect_from_at_once(flooder, port))
        .collect();
    // Let the daemon accept what it will.
    std::thread::sleep(Duration::from_millis(500));

    let t = Instant::now();
    let r = unix_request(&d.socket, &build("GET", "/v1/vms", None, &[]));
    let unix_took = t.elapsed();
    assert_eq!(r.status, 200, "unix socket during the flood: {}", r.raw);
    let t = Instant::now();
    let r = tls.request(Ipv4Addr::LOCALHOST, port, "GET", "/v1/host", None);
    let tcp_took = t.elapsed();
    assert_eq!(
        r.status, 200,
        "TCP with the token during the flood: {}",
        r.raw
    );
    eprintln!("during the flood: unix GET /v1/vms {unix_took:?}, TLS GET /v1/host {tcp_took:?}");
    assert!(unix_took < PROMPT, "the unix socket took {unix_took:?}");
    assert!(tcp_took < PROMPT, "TCP with the token took {tcp_took:?}");

    // Over the per-client cap (64 by default) the flood's connections were closed
    // as soon as they were accepted; the ones within it are still open (until the
    // TLS handshake time-out). The daemon holds a few dozen descriptors of its own.
    let held = std::fs::read_dir(format!("/proc/{}/fd", d.child.as_ref().unwrap().id()))
        .unwrap()
        .count();
    assert!(
        held < 64 + 100,
        "the daemon holds {held} descriptors during the flood"
    );
    let closed = flood
        .iter_mut()
        .map(|s| {
            s.set_nonblocking(false).unwrap();
            closed_by_daemon(s, Duration::from_millis(5))
        })
        .filter(|&closed| closed)
        .count();
    // A few the kernel may still hold unaccepted (a full accept queue drops their
    // final ACK): they look open from here without holding anything in the daemon.
    assert!(
        (1000..=2000 - 60).contains(&closed),
        "{closed} of 2000 flood connections were closed by the daemon"
    );
    assert!(d.log().contains("connection caps"), "{}", d.log());
}

#[test]
fn when_all_tcp_places_are_taken_the_unix_socket_still_answers_and_new_tcp_clients_are_closed_at_once(
) {
    let port = free_port();
    let d = Daemon::start(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--max-connections",
        "40",
        "--max-connections-per-client",
        "10",
        "--tls-handshake-timeout",
        "60",
    ]);
    wait_for_tcp(&d, port);
    // wait_for_tcp's probe holds a place until the daemon sees it close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("TLS handshake failed") {
        assert!(
            Instant::now() < deadline,
            "the probe was never let go: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Four addresses take every place.
    let flood: Vec<TcpStream> = (0..40)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 0, 10 + i / 10), port).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let t = Instant::now();
    let r = unix_request(&d.socket, &build("GET", "/v1/vms", None, &[]));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(
        t.elapsed() < PROMPT,
        "the unix socket took {:?}",
        t.elapsed()
    );

    let mut late = connect_from(Ipv4Addr::new(127, 0, 0, 99), port).unwrap();
    assert!(
        closed_by_daemon(&mut late, PROMPT),
        "a connection over the cap must be closed at once, not left hanging; log:\n{}",
        d.log()
    );

    // Places come back when connections close.
    drop(flood);
    let tls = Tls::of(&d);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = tls.request(Ipv4Addr::new(127, 0, 0, 99), port, "GET", "/v1/host", None);
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TCP places never came back: {}",
            r.raw
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_body_sent_one_byte_a_second_is_cut_with_408_at_the_body_time_out() {
    let d = Daemon::start(&["--body-timeout", "2"]);
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(
        b"POST /v1/vms HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
    )
    .unwrap();
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        for _ in 0..100 {
            if writer.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let took = t.elapsed();
    assert!(
        status.contains(" 408 "),
        "answer: {status:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "cut after {took:?}, the time-out is 2 s"
    );
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert!(rest.contains("RequestTimeout"), "{rest}");
    assert!(d.get("/v1/vms").body["vms"].as_array().unwrap().is_empty());
}

#[test]
fn a_content_length_over_the_body_limit_is_refused_with_413_at_once_on_both_listeners() {
    let port = free_port();
    let d = Daemon::start(&["--listen", &format!("127.0.0.1:{port}")]);
    let head = b"POST /v1/vms HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n";
    let t = Instant::now();
    let r = unix_request(&d.socket, head);
    assert_eq!((r.status, r.code()), (413, "PayloadTooLarge"), "{}", r.raw);
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());

    wait_for_tcp(&d, port);
    let tls = Tls::of(&d);
    let auth = format!("Bearer {}", tls.token);
    let conn =
        rustls::ClientConnection::new(tls.config.clone(), "localhost".try_into().unwrap()).unwrap();
    let tcp = connect_from(Ipv4Addr::LOCALHOST, port).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let t = Instant::now();
    write!(
        s,
        "PUT /v1/vms/x/settings HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\nContent-Length: 99999999999\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = parse_reply(&out);
    assert_eq!((r.status, r.code()), (413, "PayloadTooLarge"), "{}", r.raw);
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
}

/// A keep-alive HTTP/1.1 client on the unix socket that reconnects when the daemon
/// closes the connection between requests.
struct Conn {
    socket: std::path::PathBuf,
    reader: Option<BufReader<UnixStream>>,
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

impl Conn {
    fn open(socket: &Path) -> Conn {
        Conn {
            socket: socket.to_path_buf(),
            reader: None,
        }
    }

    fn call(&mut self, method: &str, path: &str, body: &str) -> Answer {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let reader = self.reader.get_or_insert_with(|| {
            let s = UnixStream::connect(&self.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            BufReader::new(s)
        });
        reader.get_mut().write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {line:?}"));
        let (mut len, mut retry_after, mut close) = (0usize, None, false);
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse().unwrap();
                } else if k.eq_ignore_ascii_case("retry-after") {
                    retry_after = Some(v.to_string());
                } else if k.eq_ignore_ascii_case("connection") && v == "close" {
                    close = true;
                }
            }
        }
        let mut buf = vec![0; len];
        reader.read_exact(&mut buf).unwrap();
        if close {
            self.reader = None;
        }
        Answer {
            status,
            retry_after,
            body: String::from_utf8_lossy(&buf).into_owned(),
        }
    }
}

/// CPU time the process has used, in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after_name` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

#[test]
fn twenty_thousand_job_submissions_get_429_past_the_cap_and_4096_waiting_jobs_cost_no_cpu() {
    let d = Daemon::start(&["--max-running-jobs-per-client", "4096"]);
    let hour = r#"{"milliseconds":3600000}"#;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(&socket);
                let (mut accepted, mut refused) = (0, 0);
                for _ in 0..5000 {
                    let a = c.call("POST", "/v1/diagnostics/sleep-job", hour);
                    match a.status {
                        202 => accepted += 1,
                        429 => {
                            assert_eq!(a.retry_after.as_deref(), Some("5"), "{}", a.body);
                            assert!(a.body.contains("TooManyRequests"), "{}", a.body);
                            refused += 1;
                        }
                        s => panic!("answer {s}: {}", a.body),
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    let (accepted, refused) = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |(a, r), (a2, r2)| (a + a2, r + r2));
    assert_eq!((accepted, refused), (4096, 20_000 - 4096));

    // At rest with 4,096 hour-long jobs waiting.
    let pid = d.child.as_ref().unwrap().id();
    std::thread::sleep(Duration::from_secs(1));
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(5));
    let used = (cpu_ticks(pid) - c0) as f64 / ticks_per_second() as f64;
    let share = used / t0.elapsed().as_secs_f64();
    eprintln!(
        "viridiand at rest with 4096 waiting jobs: {:.2} % of one CPU",
        share * 100.0
    );
    assert!(
        share < 0.01,
        "the daemon used {:.2} % of a CPU at rest",
        share * 100.0
    );

    // Listing stays bounded, and its pages together hold every job once.
    let mut c = Conn::open(&d.socket);
    let first = c.call("GET", "/v1/jobs", "");
    assert_eq!(first.status, 200);
    assert!(first.body.len() < 1_000_000, "{} bytes", first.body.len());
    let mut page: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    let mut seen = std::collections::HashSet::new();
    loop {
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 1000);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        let Some(after) = page["next_after"].as_u64() else {
            break;
        };
        let a = c.call("GET", &format!("/v1/jobs?after={after}&limit=1000"), "");
        page = serde_json::from_str(&a.body).unwrap();
    }
    assert_eq!(seen.len(), 4096);

    // A finished job gives its place back.
    let id = page["jobs"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(c.call("DELETE", &format!("/v1/jobs/{id}"), "").status, 202);
    let done = c.call("GET", &format!("/v1/jobs/{id}/wait?timeout=10"), "");
    assert!(done.body.contains("Terminated"), "{}", done.body);
    assert_eq!(
        c.call("POST", "/v1/diagnostics/sleep-job", hour).status,
        202
    );
    assert_eq!(
        c.call("POST", "/v1/diagnostics/sleep-job", hour).status,
        429
    );
}

#[test]
fn each_tcp_address_and_the_local_client_have_their_own_share_of_running_jobs() {
    let port = free_port();
    let d = Daemon::start(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--enable-diagnostics",
        "--max-running-jobs",
        "7",
        "--max-running-jobs-per-client",
        "3",
    ]);
    wait_for_tcp(&d, port);
    let tls = Tls::of(&d);
    let minute = Some(r#"{"milliseconds":60000}"#);
    let a = Ipv4Addr::new(127, 0, 0, 1);
    let b = Ipv4Addr::new(127, 0, 0, 2);
    for _ in 0..3 {
        let r = tls.request(a, port, "POST", "/v1/diagnostics/sleep-job", minute);
        assert_eq!(r.status, 202, "{}", r.raw);
    }
    let r = tls.request(a, port, "POST", "/v1/diagnostics/sleep-job", minute);
    assert_eq!((r.status, r.code()), (429, "TooManyRequests"), "{}", r.raw);
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    assert!(
        r.body["message"].as_str().unwrap().contains("127.0.0.1"),
        "{}",
        r.raw
    );
    for _ in 0..3 {
        let r = tls.request(b, port, "POST", "/v1/diagnostics/sleep-job", minute);
        assert_eq!(r.status, 202, "{}", r.raw);
    }
    // The unix socket's clients are one local client with a share of their own, up
    // to the total.
    let r = d.post(
        "/v1/diagnostics/sleep-job",
        serde_json::json!({"milliseconds": 60000}),
    );
    assert_eq!(r.status, 202, "{}", r.raw);
    let r = d.post(
        "/v1/diagnostics/sleep-job",
        serde_json::json!({"milliseconds": 60000}),
    );
    assert_eq!((r.status, r.code()), (429, "TooManyRequests"), "{}", r.raw);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("7 jobs are running"),
        "{}",
        r.raw
    );
    // Requests that start no job are never refused for it.
    let r = tls.request(a, port, "GET", "/v1/jobs", None);
    assert_eq!(r.status, 200);
}

#[test]
fn the_diagnostic_sleep_job_is_served_over_tcp_only_when_enabled() {
    let port = free_port();
    let d = Daemon::start(&["--listen", &format!("127.0.0.1:{port}")]);
    wait_for_tcp(&d, port);
    let tls = Tls::of(&d);
    let r = tls.request(
        Ipv4Addr::LOCALHOST,
        port,
        "POST",
        "/v1/diagnostics/sleep-job",
        Some(r#"{"milliseconds":1}"#),
    );
    assert_eq!((r.status, r.code()), (404, "NotFound"), "{}", r.raw);
    assert!(r.raw.contains("--enable-diagnostics"), "{}", r.raw);
    assert!(d.get("/v1/jobs").body["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
    let r = d.post(
        "/v1/diagnostics/sleep-job",
        serde_json::json!({"milliseconds": 1}),
    );
    assert_eq!(r.status, 202, "the unix socket keeps it: {}", r.raw);
}

/// Opens `GET /v1/events` and returns the stream once the daemon has answered.
fn listen_events(socket: &Path) -> (u16, BufReader<UnixStream>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, r)
}

#[test]
fn event_listeners_past_the_cap_get_429_and_a_closed_one_frees_its_place() {
    let d = Daemon::start(&["--max-event-listeners", "2"]);
    let (s1, l1) = listen_events(&d.socket);
    let (s2, _l2) = listen_events(&d.socket);
    assert_eq!((s1, s2), (200, 200));
    let r = d.get("/v1/events");
    assert_eq!((r.status, r.code()), (429, "TooManyRequests"), "{}", r.raw);
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    drop(l1);
    // The daemon notices the closed listener on its next event.
    d.post(
        "/v1/diagnostics/sleep-job",
        serde_json::json!({"milliseconds": 1}),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _l3) = listen_events(&d.socket);
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed listener's place never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_wait_longer_than_max_wait_is_shortened_and_says_the_job_still_runs() {
    let d = Daemon::start(&["--max-wait", "1"]);
    let job = d.post(
        "/v1/diagnostics/sleep-job",
        serde_json::json!({"milliseconds": 60000}),
    );
    let id = job.body["id"].as_str().unwrap();
    let t = Instant::now();
    let r = d.get(&format!("/v1/jobs/{id}/wait?timeout=100000"));
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["state"], "Running");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "waited {took:?} with --max-wait 1"
    );
    let r = d.get(&format!("/v1/jobs/{id}/wait?timeout=-1"));
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
}
