//! Concurrency, timeouts, connection limits, streaming aborts, shutdown and socket binding.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, TestServer};
use lamina_docker::ServerConfig;
use serde_json::json;

/// Runs `f` on a thread and fails the test if it does not finish within `limit` (deadlock guard).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("timed out: deadlock or hang")
}

#[test]
fn c11_diff_streams_into_apply_diff_on_another_connection() {
    let srv = TestServer::start();
    srv.fake.add_layer("ctr");
    srv.fake.add_layer("base");
    srv.fake.diff_len.store(16 << 20, Ordering::SeqCst);
    let path = srv.path.clone();
    let size = within(Duration::from_secs(60), move || {
        // Like `docker commit`: Create + ApplyDiff on one connection, fed from Diff on another.
        let mut apply = Client::new(UnixStream::connect(&path).unwrap());
        assert_eq!(
            apply
                .call("/GraphDriver.Create", r#"{"ID":"new","Parent":"base"}"#)
                .status,
            200
        );
        let mut diff = Client::new(UnixStream::connect(&path).unwrap());
        diff.send(&common::dockerd_request(
            "/GraphDriver.Diff",
            "{\"ID\":\"ctr\",\"Parent\":\"base\"}\n",
        ))
        .unwrap();
        apply.apply_diff_head("id=new&parent=base").unwrap();
        let mut sender = Client::new(apply.stream().try_clone().unwrap());
        let resp = diff
            .read_response_with(|chunk| {
                sender.send_chunk(chunk).unwrap();
            })
            .unwrap();
        assert!(resp.terminated);
        sender.end_chunks().unwrap();
        apply.read_response().unwrap().json()
    });
    assert_eq!(size, json!({"Size": 16 << 20}));
}

#[test]
fn c12_parallel_apply_diffs() {
    let srv = TestServer::start();
    let mut handles = Vec::new();
    for i in 0..64 {
        srv.fake.add_layer(&format!("l{i}"));
        let path = srv.path.clone();
        handles.push(thread::spawn(move || {
            let mut c = Client::new(UnixStream::connect(&path).unwrap());
            c.apply_diff(&format!("id=l{i}&parent="), &vec![i as u8; 200_000])
                .json()
        }));
    }
    for h in handles {
        assert_eq!(h.join().unwrap(), json!({"Size": 200_000}));
    }
}

#[test]
fn diff_error_mid_stream_aborts_the_connection() {
    let srv = TestServer::start();
    srv.fake.add_layer("a");
    srv.fake.diff_len.store(1 << 20, Ordering::SeqCst);
    srv.fake.diff_fail_after.store(300_000, Ordering::SeqCst);
    let mut c = srv.connect();
    let r = c.call("/GraphDriver.Diff", r#"{"ID":"a"}"#);
    assert_eq!(r.status, 200);
    assert!(
        !r.terminated,
        "a failed Diff must not end with the zero-length chunk"
    );
    assert!(r.body.len() < 1 << 20);
    assert!(c.is_closed());
    // The server itself is fine.
    let mut c = srv.connect();
    assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
}

#[test]
fn c10_client_gone_mid_apply_diff_and_mid_diff() {
    let (srv, mut c) = TestServer::connected_with(&["a"]);
    c.apply_diff_head("id=a").unwrap();
    c.send_chunk(&[0u8; 1000]).unwrap();
    drop(c);
    srv.fake.diff_len.store(64 << 20, Ordering::SeqCst);
    let mut c = srv.connect();
    c.send(&common::dockerd_request("/GraphDriver.Diff", "{\"ID\":\"a\"}\n"))
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut c.reader, &mut first).unwrap();
    assert!(first.starts_with("HTTP/1.1 200"));
    drop(c);
    // Both connection threads end, so shutdown does not need the grace period.
    let mut srv = srv;
    let started = Instant::now();
    within(Duration::from_secs(20), move || srv.stop().unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

fn short_timeouts() -> ServerConfig {
    ServerConfig {
        idle_timeout: Duration::from_secs(2),
        head_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    }
}

#[test]
fn c9_slow_clients_time_out_and_do_not_block_others() {
    let srv = TestServer::with_config(short_timeouts());
    let path = srv.path.clone();
    // 20 clients trickling a head one byte every 200 ms.
    let slow: Vec<_> = (0..20)
        .map(|_| {
            let path = path.clone();
            thread::spawn(move || {
                let mut s = UnixStream::connect(&path).unwrap();
                let started = Instant::now();
                for b in b"POST /GraphDriver.Status HTTP/1.1\r\nHost: \r\n\r\n" {
                    if s.write_all(&[*b]).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                let mut c = Client::new(s);
                let r = c.read_response().unwrap();
                (r.status, started.elapsed())
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    // A normal client is answered at once, repeatedly.
    let mut c = srv.connect();
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    for h in slow {
        let (status, elapsed) = h.join().unwrap();
        assert_eq!(status, 408);
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
    // A slow JSON body is cut off too.
    let mut c = srv.connect();
    c.send(b"POST /GraphDriver.Get HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"ID\"")
        .unwrap();
    let t = Instant::now();
    let r = c.read_response().unwrap();
    assert!(
        r.err().starts_with("invalid argument: malformed request body"),
        "{}",
        r.err()
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(c.is_closed());
    // An idle keep-alive connection is closed after the idle timeout.
    let mut c = srv.connect();
    assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
    let t = Instant::now();
    assert!(c.is_closed());
    let idle = t.elapsed();
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(5),
        "{idle:?}"
    );
}

#[test]
fn slow_apply_diff_body_is_not_cut_by_the_json_timeouts() {
    let srv = TestServer::with_config(short_timeouts());
    srv.fake.add_layer("a");
    let mut c = srv.connect();
    c.apply_diff_head("id=a").unwrap();
    for _ in 0..4 {
        c.send_chunk(&[1u8; 10]).unwrap();
        thread::sleep(Duration::from_millis(600));
    }
    c.end_chunks().unwrap();
    assert_eq!(c.read_response().unwrap().json(), json!({"Size": 40}));
}

#[test]
fn connection_limit_evicts_the_longest_idle_connection() {
    let srv = TestServer::with_config(ServerConfig {
        max_connections: 4,
        ..ServerConfig::default()
    });
    let mut idle: Vec<Client> = Vec::new();
    for _ in 0..4 {
        let mut c = srv.connect();
        assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
        idle.push(c);
    }
    let t = Instant::now();
    let mut c = srv.connect();
    assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(idle[0].is_closed(), "the oldest idle connection was closed");
    assert_eq!(idle[3].call("/GraphDriver.Status", "{}").status, 200);
}

#[test]
fn pipelined_requests_over_the_socket() {
    let (_srv, mut c) = TestServer::connected_with(&["a"]);
    let mut raw = common::dockerd_request("/GraphDriver.Exists", "{\"ID\":\"a\"}\n");
    raw.extend(common::dockerd_request("/GraphDriver.Diff", "{\"ID\":\"a\"}\n"));
    raw.extend(common::dockerd_request("/GraphDriver.Exists", "{\"ID\":\"b\"}\n"));
    c.send(&raw).unwrap();
    assert_eq!(c.read_response().unwrap().json(), json!({"Exists": true}));
    let d = c.read_response().unwrap();
    assert!(d.terminated);
    assert_eq!(d.body.len(), 10240);
    assert_eq!(c.read_response().unwrap().json(), json!({"Exists": false}));
}

#[test]
fn connection_close_http10_and_expect_continue() {
    let (srv, mut c) = TestServer::connected();
    c.send(b"POST /GraphDriver.Status HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let r = c.read_response().unwrap();
    assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
    assert!(c.is_closed());

    let mut c = srv.connect();
    c.send(b"POST /GraphDriver.Status HTTP/1.0\r\n\r\n").unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert!(c.is_closed());

    srv.fake.add_layer("a");
    let mut c = srv.connect();
    c.send(b"POST /GraphDriver.Diff HTTP/1.0\r\nContent-Length: 10\r\n\r\n{\"ID\":\"a\"}")
        .unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.header("Transfer-Encoding"), None);
    assert_eq!(r.body.len(), 10240, "HTTP/1.0 stream is delimited by close");

    let mut c = srv.connect();
    c.send(b"POST /GraphDriver.Get HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
        .unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 100);
    c.send(b"{\"ID\":\"a\"}").unwrap();
    assert_eq!(c.read_response().unwrap().json(), json!({"Dir": "/fake/mnt/a"}));
}

#[test]
fn shutdown_closes_idle_connections_at_once() {
    let mut srv = TestServer::start();
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut c = srv.connect();
        assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
        idle.push(c);
    }
    let half_head = srv.connect();
    half_head.stream().write_all(b"POST /Graph").unwrap();
    let t = Instant::now();
    srv.stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    for c in &mut idle {
        assert!(c.is_closed());
    }
    assert!(UnixStream::connect(&srv.path).is_err(), "no longer accepting");
}

#[test]
fn shutdown_lets_in_flight_requests_finish() {
    let (srv, mut c) = TestServer::connected_with(&["a"]);
    c.apply_diff_head("id=a").unwrap();
    c.send_chunk(b"abc").unwrap();
    // Let the server start the request (a head not yet read when shutdown comes is dropped).
    thread::sleep(Duration::from_millis(300));
    let sd = srv.shutdown.clone();
    let mut srv = srv;
    let stopper = thread::spawn(move || {
        let t = Instant::now();
        srv.stop().unwrap();
        t.elapsed()
    });
    thread::sleep(Duration::from_millis(500));
    assert!(sd.is_shutdown());
    c.send_chunk(b"def").unwrap();
    c.end_chunks().unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.json(), json!({"Size": 6}));
    assert_eq!(r.header("Connection"), Some("close"));
    let took = stopper.join().unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn shutdown_grace_period_expires() {
    let mut srv = TestServer::with_config(ServerConfig {
        grace_period: Duration::from_millis(500),
        ..ServerConfig::default()
    });
    srv.fake.add_layer("a");
    let mut c = srv.connect();
    c.apply_diff_head("id=a").unwrap();
    c.send_chunk(b"abc").unwrap();
    thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    srv.stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // The stalled upload was cut: the driver saw an error, the client a 500 or a closed socket.
    if let Ok(r) = c.read_response() {
        assert_eq!(r.status, 500);
    }
}

#[test]
fn shutdown_by_flag_only() {
    let mut srv = TestServer::start();
    let flag = srv.shutdown.flag();
    let t = Instant::now();
    flag.store(true, Ordering::SeqCst);
    within(Duration::from_secs(5), move || srv.stop().unwrap());
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn bind_socket_stale_live_and_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/p.sock");
    // Fresh, nested parent dirs.
    let l = lamina_docker::bind_socket(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // Live: refused, socket left alone.
    let e = lamina_docker::bind_socket(&path).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    assert!(UnixStream::connect(&path).is_ok());
    drop(l);
    // Stale (nobody listening): replaced.
    let l = lamina_docker::bind_socket(&path).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(l);
    // A stale socket from a plain bind.
    let p2 = dir.path().join("plain.sock");
    drop(UnixListener::bind(&p2).unwrap());
    let _l = lamina_docker::bind_socket(&p2).unwrap();
    // A regular file is never deleted.
    let f = dir.path().join("file.sock");
    std::fs::write(&f, b"data").unwrap();
    let e = lamina_docker::bind_socket(&f).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&f).unwrap(), b"data");
    // No staging leftovers.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("a/b"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("p.sock")]);
}

#[test]
fn bind_socket_with_a_long_path_falls_back_to_binding_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().len();
    // Fits the 108-byte limit, but the staging path would not.
    let name = "x".repeat(100 - base);
    let path = dir.path().join(&name);
    let _l = lamina_docker::bind_socket(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660
    );
}
