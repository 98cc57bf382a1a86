//! Mount/Unmount latency of lamina volumes through the plugin socket (HTTP round trip included).
//!
//! `volume_bench SOCKET [CYCLES] [NAME]`: creates NAME (default `bench-vol`) if needed, then runs CYCLES
//! (default 500) Mount+Unmount pairs, each with a fresh 64-hex ID, over one keep-alive connection like
//! dockerd's, and prints p50/p90/p99/max of each. With `--keep-mounted` as 4th argument it Mounts once more
//! at the end and prints the mountpoint (for throughput runs; unmount with `--unmount`).
//! Used by scripts/bench-volumes.sh.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn call(r: &mut BufReader<UnixStream>, path: &str, body: &str) -> String {
    let body = format!("{body}\n");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n{body}",
        body.len()
    );
    r.get_mut().write_all(req.as_bytes()).expect("write");
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line.split(' ').nth(1).unwrap_or("").to_string();
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).expect("header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).expect("body");
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert_eq!(status, "200", "{path}: {text}");
    text
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = args
        .get(1)
        .expect("usage: volume_bench SOCKET [CYCLES] [NAME] [--keep-mounted|--unmount]");
    let cycles: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(500);
    let name = args.get(3).cloned().unwrap_or_else(|| "bench-vol".into());
    let mode = args.get(4).map(String::as_str);
    let mut r = BufReader::new(UnixStream::connect(socket).expect("connect"));
    let keep_id = "b".repeat(64);
    if mode == Some("--unmount") {
        call(
            &mut r,
            "/VolumeDriver.Unmount",
            &format!(r#"{{"Name":"{name}","ID":"{keep_id}"}}"#),
        );
        return;
    }
    let get = format!(r#"{{"Name":"{name}"}}"#);
    let exists = {
        let body = format!("{get}\n");
        let req = format!(
            "POST /VolumeDriver.Get HTTP/1.1\r\nHost: \r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = UnixStream::connect(socket).expect("connect");
        s.write_all(req.as_bytes()).unwrap();
        let mut first = [0u8; 12];
        s.read_exact(&mut first).unwrap();
        first.ends_with(b"200")
    };
    if !exists {
        call(
            &mut r,
            "/VolumeDriver.Create",
            &format!(r#"{{"Name":"{name}","Opts":null}}"#),
        );
    }
    let (mut m, mut u) = (Vec::with_capacity(cycles), Vec::with_capacity(cycles));
    for i in 0..cycles {
        let id = format!("{i:064x}");
        let body = format!(r#"{{"Name":"{name}","ID":"{id}"}}"#);
        let t = Instant::now();
        call(&mut r, "/VolumeDriver.Mount", &body);
        m.push(t.elapsed());
        let t = Instant::now();
        call(&mut r, "/VolumeDriver.Unmount", &body);
        u.push(t.elapsed());
    }
    for (what, v) in [("Mount", &mut m), ("Unmount", &mut u)] {
        println!(
            "{what:8} n={cycles} p50={:?} p90={:?} p99={:?} max={:?}",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    if mode == Some("--keep-mounted") {
        let out = call(
            &mut r,
            "/VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"{keep_id}"}}"#),
        );
        println!("mounted {out}");
    }
}
