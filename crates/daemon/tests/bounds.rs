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
    fn request(&self, from: Ipv4Addr, port: u16, method: &str, path: &str, body: Option<&str>) -> Reply {
        let auth = format!("Bearer {}", self.token);
        let request = build(method, path, body, &[("Authorization", &auth)]);
        let conn = rustls::ClientConnection::new(
            self.config.clone(),
            "localhost".try_into().unwrap(),
        )
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
fn two_thousand_idle_tcp_connections_lock_out_neither_the_unix_socket_nor_a_client_with_the_token(
) {
    let port = free_port();
    let d = start_with_1024_descriptors(&["--listen", &format!("127.0.0.1:{port}")]);
    wait_for_tcp(&d, port);
    let tls = Tls::of(&d);
    let flooder = Ipv4Addr::new(127, 0, 0, 2);
    let mut flood: Vec<TcpStream> = (0..2000)
        .map(|i| connect_from(flooder, port).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();

    let t = Instant::now();
    let r = unix_request(&d.socket, &build("GET", "/v1/vms", None, &[]));
    let unix_took = t.elapsed();
    assert_eq!(r.status, 200, "unix socket during the flood: {}", r.raw);
    let t = Instant::now();
    let r = tls.request(Ipv4Addr::LOCALHOST, port, "GET", "/v1/host", None);
    let tcp_took = t.elapsed();
    assert_eq!(r.status, 200, "TCP with the token during the flood: {}", r.raw);
    eprintln!("during the flood: unix GET /v1/vms {unix_took:?}, TLS GET /v1/host {tcp_took:?}");
    assert!(unix_took < PROMPT, "the unix socket took {unix_took:?}");
    assert!(tcp_took < PROMPT, "TCP with the token took {tcp_took:?}");

    // Over the per-client cap (64 by default) the flood's connections were closed
    // as soon as they were accepted; the ones within it are still open (until the
    // TLS handshake time-out).
    let closed = flood
        .iter_mut()
        .map(|s| closed_by_daemon(s, Duration::from_millis(5)))
        .filter(|&closed| closed)
        .count();
    assert!(
        (2000 - 64..=2000 - 60).contains(&closed),
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
    // Four addresses take every place.
    let flood: Vec<TcpStream> = (0..40)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 0, 10 + i / 10), port).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let t = Instant::now();
    let r = unix_request(&d.socket, &build("GET", "/v1/vms", None, &[]));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(t.elapsed() < PROMPT, "the unix socket took {:?}", t.elapsed());

    let mut late = connect_from(Ipv4Addr::new(127, 0, 0, 99), port).unwrap();
    let t = Instant::now();
    assert!(
        closed_by_daemon(&mut late, Duration::from_secs(5)),
        "a connection over the cap must be closed, not left hanging; log:\n{}",
        d.log()
    );
    assert!(t.elapsed() < PROMPT, "closing took {:?}", t.elapsed());

    // Places come back when connections close.
    drop(flood);
    let tls = Tls::of(&d);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = tls.request(Ipv4Addr::new(127, 0, 0, 99), port, "GET", "/v1/host", None);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "TCP places never came back: {}", r.raw);
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
    assert!(status.contains(" 408 "), "answer: {status:?} after {took:?}");
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
        rustls::ClientConnection::new(tls.config.clone(), "localhost".try_into().unwrap())
            .unwrap();
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
