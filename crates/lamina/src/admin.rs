//! The admin channel: `lamina serve` answers the operator's commands (`status`, `layers`, `gc`, `verify`) on
//! `<data_root>/admin.sock` (mode 0600, root only), because the store holds an exclusive lock on its data root
//! and the metadata database cannot be opened twice.
//!
//! Protocol: one request per connection, HTTP/1.1. `POST /v1/command` with a JSON body (a [`Request`]); the
//! answer is `200` with `Content-Type: application/x-ndjson` and `Connection: close`, one JSON object per line:
//! `{"progress": ...}` events while the command runs, then one `{"result": ...}` or `{"error": "..."}`.
//! Anything else gets `404`/`400`. Bodies are capped at 1 MiB, heads at 16 KiB.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use lamina_store::Store;
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::cli::{execute, Request};

/// File name of the admin socket inside the data root.
pub const ADMIN_SOCKET: &str = "admin.sock";
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

/// The admin socket of the data root `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(ADMIN_SOCKET)
}

/// Binds the admin socket (mode 0600).
pub fn bind(root: &Path) -> anyhow::Result<UnixListener> {
    let path = socket_path(root);
    let l = lamina_docker::server::bind_socket_with_mode(&path, 0o600)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    l.set_nonblocking(true).context("admin socket")?;
    Ok(l)
}

/// Serves the admin socket on a thread until `stop` is set.
pub fn spawn(
    listener: UnixListener,
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let store = store.clone();
                        let _ = std::thread::Builder::new()
                            .name("admin-conn".into())
                            .spawn(move || serve_one(conn, &store));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        warn!(error = %e, "admin socket accept failed");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })
        .context("starting the admin thread")
}

fn read_request(conn: &mut UnixStream) -> anyhow::Result<(String, String, Vec<u8>)> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            bail!("request head too large");
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the request head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path) = (
        first.next().unwrap_or("").to_string(),
        first.next().unwrap_or("").to_string(),
    );
    let mut length = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().context("bad Content-Length")?;
            }
        }
    }
    if length > MAX_BODY {
        bail!("request body too large");
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed inside the body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok((method, path, body))
}

fn serve_one(mut conn: UnixStream, store: &Store) {
    let (method, path, body) = match read_request(&mut conn) {
        Ok(r) => r,
        Err(e) => {
            let _ = write!(
                conn,
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            );
            debug!(error = %e, "bad admin request");
            return;
        }
    };
    if method != "POST" || path != "/v1/command" {
        let _ = write!(
            conn,
            "HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        return;
    }
    let _ = conn.set_write_timeout(Some(Duration::from_secs(60)));
    if conn
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return;
    }
    let line = |v: Value, conn: &mut UnixStream| {
        let mut s = v.to_string();
        s.push('\n');
        let _ = conn.write_all(s.as_bytes());
    };
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            line(json!({ "error": format!("bad request: {e}") }), &mut conn);
            return;
        }
    };
    debug!(?request, "admin request");
    let mut progress_conn = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let result = execute(store, &request, &mut |p| {
        line(json!({ "progress": p }), &mut progress_conn)
    });
    match result {
        Ok(v) => line(json!({ "result": v }), &mut conn),
        Err(e) => line(json!({ "error": format!("{e:#}") }), &mut conn),
    }
}

/// Sends `request` to the daemon serving `root`. `Ok(None)` when no daemon answers there.
pub fn call(
    root: &Path,
    request: &Request,
    progress: &mut dyn FnMut(Value),
) -> anyhow::Result<Option<Value>> {
    let path = socket_path(root);
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    let body = serde_json::to_vec(request)?;
    write!(
        conn,
        "POST /v1/command HTTP/1.1\r\nHost: lamina\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(&body)?;
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("the daemon's admin socket answered {}", status.trim());
    }
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l)? == 0 {
            bail!("the daemon's admin socket closed before the end of the headers");
        }
        if l == "\r\n" {
            break;
        }
    }
    for l in reader.lines() {
        let l = l?;
        let v: Value = serde_json::from_str(&l).context("bad line from the admin socket")?;
        if let Some(p) = v.get("progress") {
            progress(p.clone());
        } else if let Some(r) = v.get("result") {
            return Ok(Some(r.clone()));
        } else if let Some(e) = v.get("error") {
            bail!("{}", e.as_str().unwrap_or("error"));
        }
    }
    bail!("the daemon closed the admin connection without a result")
}
