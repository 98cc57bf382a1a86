//! Reliability tier, part 6 (issue 8): protocol abuse and load against the real `lamina serve` binary.
//!
//! - `hostile_requests`: 10,000 malformed or hostile requests (bad JSON, wrong types, bad ids, huge bodies,
//!   lying lengths, truncated bodies, unknown paths and methods, broken chunking, random bytes) on fresh
//!   connections: no panic, every answer non-200 with `{"Err": ...}` (broken HTTP may instead be closed), the
//!   daemon's RSS grows less than 10 MiB, descriptors and threads return to their baseline.
//! - `slow_clients`: 1,000 idle connections, then 1,000 slowloris connections (one header byte at a time), then
//!   1,000 connections trickling a request body: how long a valid call takes meanwhile.
//! - `concurrent_clients`: 16 clients doing Create/Get/Put/ApplyDiff/Diff/Remove on shared and own ids for
//!   20 s (CI) or 60 s (full): no deadlock, own ids behave exactly, shared ids only fail with classed errors,
//!   the store is consistent afterwards (also after a restart); p50/p99 per operation are reported.
//!
//! Sizes: `LAMINA_RELIABILITY=full`, or `LAMINA_RELIABILITY_REQUESTS`, `LAMINA_RELIABILITY_SLOW_CONNS`,
//! `LAMINA_RELIABILITY_LOAD_SECS`. Run: `cargo test -p lamina --test reliability_protocol -- --nocapture`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use lamina_testkit::reliability::*;
use lamina_testkit::*;

struct Daemon {
    lamina: Lamina,
    c: PluginClient,
    _serial: Option<MutexGuard<'static, ()>>,
}

fn daemon(test: &str) -> Option<Daemon> {
    let serial = serial_if(require_root(test))?;
    let lamina = Lamina::start(&unique_name(test));
    let mut c = lamina.client();
    c.timeout = Duration::from_secs(60);
    c.init(&lamina.dir().join("docker-root"));
    Some(Daemon {
        lamina,
        c,
        _serial: serial,
    })
}

fn hex_id(n: u64) -> String {
    let mut b = [0u8; 32];
    fill_random(n ^ (u64::from(std::process::id()) << 24), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ------------------------------------------------------------------------------------------------------------
// Hostile requests
// ------------------------------------------------------------------------------------------------------------

/// What a hostile request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A non-200 answer with a non-empty `Err`.
    Err,
    /// Broken HTTP: such an answer, or the connection closed without one.
    ErrOrClose,
}

struct Hostile {
    kind: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

const ID_PATHS: &[&str] = &[
    "/GraphDriver.Create",
    "/GraphDriver.CreateReadWrite",
    "/GraphDriver.Remove",
    "/GraphDriver.Get",
    "/GraphDriver.Put",
    "/GraphDriver.Diff",
    "/GraphDriver.Changes",
    "/GraphDriver.DiffSize",
    "/GraphDriver.GetMetadata",
];

fn request(method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "{method} {path} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

fn bad_id(r: &mut Rng) -> serde_json::Value {
    let s: String = match r.below(12) {
        0 => "".into(),
        1 => "..".into(),
        2 => ".".into(),
        3 => "/".into(),
        4 => "../../etc".into(),
        5 => "a/b".into(),
        6 => "a\\b".into(),
        7 => "x\u{0}y".into(),
        8 => "ünïcødé\u{202e}".into(),
        9 => "-rf".into(),
        10 => "x".repeat(r.range(300, 5000) as usize),
        _ => {
            let len = r.range(1, 40) as usize;
            let b = r.bytes(len);
            let s: String = b.iter().map(|&c| char::from(c)).collect();
            if s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                format!("/{s}")
            } else {
                s
            }
        }
    };
    serde_json::Value::String(s)
}

fn hostile(r: &mut Rng) -> Hostile {
    let path = *r.pick(ID_PATHS);
    let valid = format!("{{\"ID\":\"{}\"}}\n", hex_id(r.next_u64()));
    match r.below(16) {
        0 => {
            // malformed JSON: a byte JSON never accepts, inserted anywhere
            let mut b = valid.into_bytes();
            let at = r.below(b.len() as u64) as usize;
            b.insert(at, *r.pick(&[0x01u8, 0x02, 0x1f, 0xff, 0xc0, 0x00, 0x7f]));
            if b[at] == 0x7f {
                b[at] = 0x01;
            }
            Hostile {
                kind: "malformed JSON (bad byte)",
                bytes: request("POST", path, "", &b),
                expect: Expect::Err,
            }
        }
        1 => {
            // truncated JSON: cut before the closing brace
            let b = valid.as_bytes();
            let cut = r.range(1, (b.len() - 3) as u64) as usize;
            Hostile {
                kind: "truncated JSON",
                bytes: request("POST", path, "", &b[..cut]),
                expect: Expect::Err,
            }
        }
        2 => {
            let v = match r.below(7) {
                0 => json!({"ID": 5}),
                1 => json!({"ID": [hex_id(1)]}),
                2 => json!({"ID": {"a": 1}}),
                3 => json!({"ID": true}),
                4 => json!({"ID": null}),
                5 => json!({"ID": 1e300, "Parent": -1}),
                _ => json!([{"ID": hex_id(2)}]),
            };
            let body = serde_json::to_vec(&v).unwrap();
            Hostile {
                kind: "wrong types",
                bytes: request("POST", path, "", &body),
                expect: Expect::Err,
            }
        }
        3 => {
            let body = serde_json::to_vec(&json!({"ID": bad_id(r), "Parent": bad_id(r)})).unwrap();
            Hostile {
                kind: "bad id",
                bytes: request("POST", path, "", &body),
                expect: Expect::Err,
            }
        }
        4 => {
            let body = serde_json::to_vec(&json!({"ID": hex_id(7), "Parent": bad_id(r)})).unwrap();
            Hostile {
                kind: "bad parent",
                bytes: request("POST", "/GraphDriver.Create", "", &body),
                expect: Expect::Err,
            }
        }
        5 => {
            let name: String = (0..r.range(1, 30))
                .map(|_| char::from(b'a' + r.below(26) as u8))
                .collect();
            let p = match r.below(6) {
                0 => format!("/GraphDriver.{name}"),
                1 => format!("/VolumeDriver.{name}"),
                2 => format!("/{name}"),
                3 => "/../../etc/passwd".to_string(),
                4 => format!("{path}/{name}"),
                _ => format!("/Plugin.{name}"),
            };
            Hostile {
                kind: "unknown path",
                bytes: request("POST", &p, "", valid.as_bytes()),
                expect: Expect::Err,
            }
        }
        6 => {
            let m = *r.pick(&["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD2", "BREW"]);
            Hostile {
                kind: "wrong method",
                bytes: request(m, path, "", valid.as_bytes()),
                expect: Expect::Err,
            }
        }
        7 => {
            // a huge declared length with little data, then the write side closed
            let mut b = format!(
                "POST {path} HTTP/1.1\r\nHost: \r\nContent-Length: {}\r\n\r\n",
                *r.pick(&[10_000_000_000u64, 2_000_000, u64::MAX])
            )
            .into_bytes();
            let len = r.below(2000) as usize;
            b.extend_from_slice(&r.bytes(len));
            Hostile {
                kind: "lying Content-Length",
                bytes: b,
                expect: Expect::ErrOrClose,
            }
        }
        8 => {
            // body cut in the middle, write side closed
            let full = request("POST", path, "", valid.as_bytes());
            let cut = full.len() - r.range(2, 20) as usize;
            Hostile {
                kind: "truncated body",
                bytes: full[..cut].to_vec(),
                expect: Expect::ErrOrClose,
            }
        }
        9 => {
            let n = r.range(1, 3000) as usize;
            Hostile {
                kind: "random bytes",
                bytes: r.bytes(n),
                expect: Expect::ErrOrClose,
            }
        }
        10 => {
            let b: &[u8] = match r.below(8) {
                0 => b"POST\r\n\r\n",
                1 => b"POST /GraphDriver.Status\r\n\r\n",
                2 => b"POST /GraphDriver.Status HTTP/9.9\r\n\r\n",
                3 => b"POST /GraphDriver.Status HTTP/1.1\r\nBad Header Line\r\n\r\n",
                4 => b"POST /GraphDriver.Create HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{}",
                5 => b"POST /GraphDriver.Create HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                6 => b"POST /GraphDriver.ApplyDiff?id=abc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
                _ => b"POST /GraphDriver.Create HTTP/1.1\r\nX: a\0b\r\n\r\n",
            };
            Hostile {
                kind: "broken HTTP",
                bytes: b.to_vec(),
                expect: Expect::ErrOrClose,
            }
        }
        11 => {
            // ApplyDiff with bad or unknown ids in the query, small valid tar
            let q = match r.below(6) {
                0 => "id=..%2F..%2Fetc".to_string(),
                1 => format!("id={}&id={}", hex_id(3), hex_id(4)),
                2 => "parent=".to_string(),
                3 => format!("id={}&parent={}", hex_id(r.next_u64()), "p".repeat(10_000)),
                4 => format!("id={}", hex_id(r.next_u64())),
                _ => "id=%00".to_string(),
            };
            let tar = TarBuilder::new().file("f", 0o644, b"data").finish();
            Hostile {
                kind: "ApplyDiff bad query",
                bytes: request("POST", &format!("/GraphDriver.ApplyDiff?{q}"), "", &tar),
                expect: Expect::Err,
            }
        }
        12 => {
            // unknown ids on every id call but Remove (idempotent) and Put (harmless): not found
            let p: &str = ID_PATHS[3 + r.below(ID_PATHS.len() as u64 - 3) as usize];
            Hostile {
                kind: "unknown id",
                bytes: request("POST", p, "", valid.as_bytes()),
                expect: Expect::Err,
            }
        }
        13 => {
            let body: Vec<u8> = match r.below(3) {
                0 => {
                    let mut d = vec![b'['; 100_000];
                    d.extend(vec![b']'; 100_000]);
                    d
                }
                1 => format!("{{\"ID\":\"{}\"}}", "x".repeat(2 << 20)).into_bytes(),
                _ => b"{\"ID\":".repeat(30_000),
            };
            Hostile {
                kind: "huge or deep body",
                bytes: request("POST", path, "", &body),
                expect: Expect::Err,
            }
        }
        14 => {
            // volume names are free text except for what cannot be one path component (B5 allows Unicode)
            let bad_name = *r.pick(&[
                "",
                ".",
                "..",
                "/",
                "a/b",
                "../../etc",
                "x\u{0}y",
                ".hidden",
                "a\nb",
            ]);
            let (p, v) = match r.below(5) {
                0 => ("/VolumeDriver.Create", json!({"Name": bad_name})),
                1 => (
                    "/VolumeDriver.Create",
                    json!({"Name": "v1", "Opts": {"ReplicationGoal": "2; rm -rf /"}}),
                ),
                2 => ("/VolumeDriver.Create", json!({"Name": "v1", "Opts": ["a"]})),
                3 => (
                    *r.pick(&["/VolumeDriver.Mount", "/VolumeDriver.Remove"]),
                    json!({"Name": bad_name}),
                ),
                _ => ("/VolumeDriver.Create", json!({"Name": null})),
            };
            Hostile {
                kind: "volume call",
                bytes: request("POST", p, "", &serde_json::to_vec(&v).unwrap()),
                expect: Expect::Err,
            }
        }
        _ => {
            // trailing garbage or a byte-order mark
            let body = if r.chance(1, 2) {
                format!("{}garbage", valid.trim_end()).into_bytes()
            } else {
                let mut b = b"\xef\xbb\xbf".to_vec();
                b.extend_from_slice(valid.as_bytes());
                b
            };
            Hostile {
                kind: "trailing garbage / BOM",
                bytes: request("POST", path, "", &body),
                expect: Expect::Err,
            }
        }
    }
}

/// Sends `bytes` on a new connection, closes the write side, reads everything. `Ok(None)`: closed without an
/// answer; `Ok(Some((status, body)))`.
fn send_raw(socket: &Path, bytes: &[u8]) -> std::io::Result<Option<(u16, Vec<u8>)>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let _ = s.write_all(bytes); // the server may refuse before reading everything
    let _ = s.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) if out.is_empty() => return Err(e),
        Err(_) => {}
    }
    if out.is_empty() {
        return Ok(None);
    }
    let text = out.clone();
    let head_end = text.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| {
        std::io::Error::other(format!("no header end in {:?}", String::from_utf8_lossy(&text)))
    })?;
    let head = String::from_utf8_lossy(&text[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {head:?}")))?;
    let mut body = text[head_end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut dec = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap_or(0);
            if n == 0 || nl + 2 + n > rest.len() {
                break;
            }
            dec.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[(nl + 4 + n).min(rest.len())..];
        }
        body = dec;
    } else if let Some(len) = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(Some((status, body)))
}

fn err_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("Err")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

#[test]
fn hostile_requests() {
    let Some(d) = daemon("hostile_requests") else {
        return;
    };
    let n = count("LAMINA_RELIABILITY_REQUESTS", 10_000, 100_000);
    let pid = d.lamina.pid().unwrap();
    let mut r = Rng::new(base_seed());
    // warm-up: allocator and thread pools reach their working size
    for _ in 0..500 {
        let h = hostile(&mut r);
        let _ = send_raw(&d.lamina.socket, &h.bytes);
    }
    thread::sleep(Duration::from_millis(500));
    let (rss0, fds0, threads0) = (rss_kib(pid), open_fds(pid), threads(pid));
    let started = Instant::now();
    let mut by_kind: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new(); // answered, closed, failures
    let mut failures = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for i in 0..n {
        let h = hostile(&mut r);
        let e = by_kind.entry(h.kind).or_default();
        match send_raw(&d.lamina.socket, &h.bytes) {
            Ok(Some((status, body))) => {
                *statuses.entry(status).or_default() += 1;
                e.0 += 1;
                if status == 200 || err_of(&body).is_none() {
                    e.2 += 1;
                    failures.push(format!(
                        "#{i} {}: HTTP {status} {:?} for {:?}",
                        h.kind,
                        truncate(&String::from_utf8_lossy(&body), 200),
                        truncate(&String::from_utf8_lossy(&h.bytes), 300)
                    ));
                }
            }
            Ok(None) => {
                e.1 += 1;
                if h.expect == Expect::Err {
                    e.2 += 1;
                    failures.push(format!(
                        "#{i} {}: closed without an answer: {:?}",
                        h.kind,
                        truncate(&String::from_utf8_lossy(&h.bytes), 300)
                    ));
                }
            }
            Err(err) => {
                e.2 += 1;
                failures.push(format!("#{i} {}: {err}", h.kind));
            }
        }
        if failures.len() > 30 {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(500));
    let alive = d.c.activate().is_ok_and(|r| r.status == 200);
    let (rss1, fds1, threads1) = (rss_kib(pid), open_fds(pid), threads(pid));
    let panics = panics_in_log(&d.lamina.log);
    eprintln!(
        "RELIABILITY hostile requests: {n} in {secs:.1} s; statuses {statuses:?}; per kind (answered, closed, \
         failures): {by_kind:?}; RSS {rss0} -> {rss1} KiB; fds {fds0} -> {fds1}; threads {threads0} -> {threads1}; \
         panics {}; alive {alive}",
        panics.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(alive && panics.is_empty(), "daemon dead or panicked: {panics:?}");
    assert!(rss1 < rss0 + 10 * 1024, "RSS grew from {rss0} to {rss1} KiB");
    assert!(fds1 <= fds0 + 4, "descriptors grew from {fds0} to {fds1}");
}

// ------------------------------------------------------------------------------------------------------------
// Slow clients
// ------------------------------------------------------------------------------------------------------------

/// Latency of valid calls made every 200 ms for `dur`: (max, all). A call that gets no answer within the
/// client's timeout counts as that timeout and ends the probe.
fn probe(c: &PluginClient, dur: Duration) -> (Duration, Vec<Duration>) {
    let mut lat = Vec::new();
    let end = Instant::now() + dur;
    while Instant::now() < end {
        let t = Instant::now();
        match c.post_raw("/GraphDriver.Status", b"{}\n") {
            Ok(r) => assert_eq!(r.status, 200, "Status: {}", r.text()),
            Err(_) => {
                lat.push(c.timeout);
                break;
            }
        }
        lat.push(t.elapsed());
        thread::sleep(Duration::from_millis(200));
    }
    lat.sort();
    (*lat.last().unwrap_or(&Duration::ZERO), lat)
}

/// Opens `n` connections and keeps them busy with `tick` (called on each, round robin, every `period`) in a
/// background thread until the returned flag is set.
fn hold(
    socket: &Path,
    n: usize,
    first: &[u8],
    tick: &'static [u8],
    period: Duration,
) -> (Arc<AtomicBool>, thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::new();
    for _ in 0..n {
        match UnixStream::connect(socket) {
            Ok(mut s) => {
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = s.write_all(first);
                conns.push(s);
            }
            Err(e) => panic!("connect #{}: {e}", conns.len()),
        }
    }
    let flag = stop.clone();
    let h = thread::spawn(move || {
        let opened = conns.len();
        while !flag.load(Ordering::SeqCst) {
            for s in &mut conns {
                if !tick.is_empty() {
                    let _ = s.write_all(tick);
                }
            }
            let until = Instant::now() + period;
            while Instant::now() < until && !flag.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(50));
            }
        }
        opened
    });
    (stop, h)
}

#[test]
fn slow_clients() {
    let Some(d) = daemon("slow_clients") else { return };
    let n = count("LAMINA_RELIABILITY_SLOW_CONNS", 1000, 1000) as usize;
    let pid = d.lamina.pid().unwrap();
    let fds0 = open_fds(pid);
    let mut c = d.c.clone();
    c.timeout = Duration::from_secs(10);
    let (base_max, _) = probe(&c, Duration::from_secs(1));
    let phases: [(&str, &[u8], &'static [u8]); 3] = [
        ("idle (connected, silent)", b"", b""),
        (
            "slowloris (one header byte every 2 s)",
            b"POST /GraphDriver.Status HTTP/1.1\r\nX-Slow: ",
            b"a",
        ),
        (
            "slow body (head sent, one body byte every 2 s)",
            b"POST /GraphDriver.Status HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
            b" ",
        ),
    ];
    let mut results = Vec::new();
    for (name, first, tick) in phases {
        let (stop, h) = hold(&d.lamina.socket, n, first, tick, Duration::from_secs(2));
        thread::sleep(Duration::from_millis(500));
        let (max, lat) = probe(&c, Duration::from_secs(8));
        let fds_during = open_fds(pid);
        stop.store(true, Ordering::SeqCst);
        let opened = h.join().unwrap();
        thread::sleep(Duration::from_millis(500));
        eprintln!(
            "RELIABILITY slow clients, {name}: {opened} connections; valid call max {:?}, p50 {:?} over {} calls; \
             lamina fds during {fds_during}",
            max,
            quantile(&lat, 0.5),
            lat.len()
        );
        results.push((name, max));
    }
    let (after, _) = probe(&c, Duration::from_secs(1));
    let fds1 = open_fds(pid);
    eprintln!("RELIABILITY slow clients: before {base_max:?}, after {after:?}; lamina fds {fds0} -> {fds1}");
    // Idle, slow-head and slow-body connections are all evictable at the connection limit (slow bodies were
    // not until the server watched small-body reads: a valid call then waited 89.7 s behind 1,000 of them).
    for (name, max) in &results {
        assert!(*max < Duration::from_secs(1), "{name}: a valid call took {max:?}");
    }
    assert!(
        after < Duration::from_secs(1),
        "valid calls slow after the slow clients left: {after:?}"
    );
    assert!(fds1 <= fds0 + 4, "descriptors grew from {fds0} to {fds1}");
    assert!(panics_in_log(&d.lamina.log).is_empty());
}

// ------------------------------------------------------------------------------------------------------------
// Concurrent clients
// ------------------------------------------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    lat: BTreeMap<&'static str, Vec<Duration>>,
    outcomes: BTreeMap<String, u64>,
    violations: Vec<String>,
}

const OPS: &[&str] = &["Create", "ApplyDiff", "Get", "Put", "Diff", "Remove"];

fn small_tar(n: u64) -> Vec<u8> {
    TarBuilder::new()
        .dir("d", 0o755)
        .file(&format!("d/f{n}"), 0o644, format!("content {n}\n").as_bytes())
        .finish()
}

#[test]
fn concurrent_clients() {
    let Some(mut d) = daemon("concurrent_clients") else {
        return;
    };
    let dur = seconds("LAMINA_RELIABILITY_LOAD_SECS", 20, 60);
    let clients = 16u64;
    let base = hex_id(999_999);
    d.c.call("Create", json!({"ID": base})).ok("Create base");
    let mut t: &[u8] = &small_tar(0);
    d.c.apply_diff(&base, "", &mut t).unwrap().ok("ApplyDiff base");
    let shared: Arc<Vec<String>> = Arc::new((0..4).map(|i| hex_id(500_000 + i)).collect());
    let stats = Arc::new(Mutex::new(Stats::default()));
    let calls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + dur;
    let mut handles = Vec::new();
    for k in 0..clients {
        let c = d.c.clone();
        let shared = shared.clone();
        let stats = stats.clone();
        let calls = calls.clone();
        let base = base.clone();
        handles.push(thread::spawn(move || {
            let mut r = Rng::new(base_seed() ^ (k << 32));
            let mut local = Stats::default();
            // own ids: state model (0 absent, 1 created, 2 applied), mounts held; shared ids: mounts held
            let own: Vec<String> = (0..3).map(|i| hex_id(k * 100 + i)).collect();
            let mut state = [0u8; 3];
            let mut own_gets = [0u32; 3];
            let mut shared_gets = vec![0u32; shared.len()];
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let use_shared = r.chance(1, 2);
                let idx = r.below(if use_shared { shared.len() } else { own.len() } as u64) as usize;
                let id = if use_shared {
                    shared[idx].clone()
                } else {
                    own[idx].clone()
                };
                let op = *r.pick(OPS);
                let t0 = Instant::now();
                let resp = match op {
                    "Create" => c.call("Create", json!({"ID": id, "Parent": base})),
                    "ApplyDiff" => {
                        let tar = small_tar(n);
                        let mut b: &[u8] = &tar;
                        match c.apply_diff(&id, &base, &mut b) {
                            Ok(x) => x,
                            Err(e) => {
                                local
                                    .violations
                                    .push(format!("client {k}: ApplyDiff {id}: transport {e}"));
                                continue;
                            }
                        }
                    }
                    "Get" => c.call("Get", json!({"ID": id})),
                    "Put" => c.call("Put", json!({"ID": id})),
                    "Diff" => {
                        let body = serde_json::to_vec(&json!({"ID": id, "Parent": base})).unwrap();
                        match c.post_raw("/GraphDriver.Diff", &body) {
                            Ok(x) => x,
                            Err(e) => {
                                // a Diff stream cut after its 200 head: how a failure mid-stream is reported
                                let what = if use_shared { "shared" } else { "own" };
                                *local
                                    .outcomes
                                    .entry(format!("Diff {what} stream aborted"))
                                    .or_default() += 1;
                                if !use_shared {
                                    local
                                        .violations
                                        .push(format!("client {k}: Diff of own {id}: {e}"));
                                }
                                continue;
                            }
                        }
                    }
                    _ => c.call("Remove", json!({"ID": id})),
                };
                let el = t0.elapsed();
                calls.fetch_add(1, Ordering::Relaxed);
                local.lat.entry(op).or_default().push(el);
                let ok = resp.status == 200 && resp.err().is_none();
                let err = resp.err().unwrap_or_default();
                let class = if ok {
                    "ok".to_string()
                } else {
                    err.split(':').next().unwrap_or("").to_string()
                };
                *local
                    .outcomes
                    .entry(format!(
                        "{op} {} {class}",
                        if use_shared { "shared" } else { "own" }
                    ))
                    .or_default() += 1;
                if !ok && (resp.status != 500 || !classed(&err)) {
                    local.violations.push(format!(
                        "client {k}: {op} {id}: unclassed HTTP {} {}",
                        resp.status,
                        resp.text()
                    ));
                }
                if el > Duration::from_secs(30) {
                    local
                        .violations
                        .push(format!("client {k}: {op} {id} took {el:?}"));
                }
                if use_shared {
                    match op {
                        "Get" if ok => shared_gets[idx] += 1,
                        "Put" if ok && shared_gets[idx] > 0 => shared_gets[idx] -= 1,
                        _ => {}
                    }
                    continue;
                }
                // own ids: the outcome is determined by the model
                let s = state[idx];
                let want_ok = match op {
                    "Create" => s == 0,
                    "ApplyDiff" => s == 1 && own_gets[idx] == 0,
                    "Get" | "Diff" => s != 0,
                    // a Put of a layer this client has not mounted may succeed or say "not mounted"
                    "Put" => ok,
                    // Remove is idempotent and unmounts a mounted layer first (as overlay2 does)
                    _ => true,
                };
                if ok != want_ok {
                    local.violations.push(format!(
                        "client {k}: own {op} {id} in state {s} (mounted {}): {} {}",
                        own_gets[idx],
                        resp.status,
                        resp.text()
                    ));
                }
                if ok {
                    match op {
                        "Create" => state[idx] = 1,
                        "ApplyDiff" => state[idx] = 2,
                        "Get" => own_gets[idx] += 1,
                        "Put" => own_gets[idx] = own_gets[idx].saturating_sub(1),
                        "Remove" => {
                            state[idx] = 0;
                            own_gets[idx] = 0;
                        }
                        _ => {}
                    }
                }
                if op == "Diff" && ok && s == 2 && !resp.body.windows(3).any(|w| w == b"d/f") {
                    local
                        .violations
                        .push(format!("client {k}: Diff of applied {id} lacks its file"));
                }
            }
            // give back every mount this client holds, then remove own ids
            for (i, g) in shared_gets.iter().enumerate() {
                for _ in 0..*g {
                    let _ = c.call("Put", json!({"ID": shared[i]}));
                }
            }
            for (i, id) in own.iter().enumerate() {
                for _ in 0..own_gets[i] {
                    c.call("Put", json!({"ID": id})).ok("final Put");
                }
                if state[i] != 0 {
                    c.call("Remove", json!({"ID": id})).ok("final Remove");
                }
            }
            let mut st = stats.lock().unwrap();
            for (op, l) in local.lat {
                st.lat.entry(op).or_default().extend(l);
            }
            for (o, n) in local.outcomes {
                *st.outcomes.entry(o).or_default() += n;
            }
            st.violations.extend(local.violations);
        }));
    }
    // no deadlock: every client must finish shortly after the deadline
    let watchdog = Instant::now() + dur + Duration::from_secs(120);
    for h in handles {
        while !h.is_finished() {
            assert!(
                Instant::now() < watchdog,
                "a client is stuck 120 s after the deadline: deadlock?"
            );
            thread::sleep(Duration::from_millis(100));
        }
        h.join().expect("client thread panicked");
    }
    let total = calls.load(Ordering::Relaxed);
    // shared ids: every mount was given back, so each can be removed
    for id in shared.iter() {
        let r = d.c.call("Remove", json!({"ID": id}));
        assert!(r.status == 200, "final Remove of shared {id}: {}", r.text());
    }
    let st = stats.lock().unwrap();
    let mut report = String::new();
    let mut all: Vec<Duration> = Vec::new();
    for (op, l) in &st.lat {
        let mut l = l.clone();
        l.sort();
        all.extend(&l);
        report.push_str(&format!(
            "\n  {op:<10} n={:<6} p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
            l.len(),
            quantile(&l, 0.5).as_secs_f64() * 1e3,
            quantile(&l, 0.99).as_secs_f64() * 1e3,
            l.last().unwrap().as_secs_f64() * 1e3
        ));
    }
    all.sort();
    eprintln!(
        "RELIABILITY concurrent clients: {clients} clients, {:?}, {total} calls ({:.0}/s), overall p99 {:.1} ms{report}\n  outcomes: {:?}",
        dur,
        total as f64 / dur.as_secs_f64(),
        quantile(&all, 0.99).as_secs_f64() * 1e3,
        st.outcomes
    );
    assert!(
        st.violations.is_empty(),
        "{} violations:\n{}",
        st.violations.len(),
        st.violations.join("\n")
    );
    drop(st);
    // the store is consistent: only the base is left, nothing is mounted, also after a restart
    let layers = |c: &PluginClient| -> Option<u64> {
        let v = c.call("Status", json!({})).ok("Status");
        v["Status"].as_array()?.iter().find_map(|row| {
            let row = row.as_array()?;
            (row.first()?.as_str()?.eq_ignore_ascii_case("layers"))
                .then(|| row.get(1)?.as_str()?.parse().ok())?
        })
    };
    assert_eq!(layers(&d.c), Some(1), "layers left besides the base");
    let mounts = mounts_under(&d.lamina.data_root);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    d.lamina.restart();
    assert_eq!(layers(&d.c), Some(1), "layers after restart");
    let r = d.c.call("Diff", json!({"ID": base, "Parent": ""}));
    assert_eq!(r.status, 200, "Diff of the base after restart");
    assert!(panics_in_log(&d.lamina.log).is_empty(), "panics in the log");
}
