//! The admin channel: `lamina serve` answers the operator's commands (`status`, `layers`, `gc`, `verify`) on
//! `<data_root>/admin.sock` (mode 0600, root only), because the store holds an exclusive lock on its data root
//! and the metadata database cannot be opened twice.
//!
//! Protocol: one request per connection, HTTP/1.1, on the [`lamina_http`] server (its connection cap and
//! timeouts). `POST /v1/command` with a JSON body (a [`Request`]); the answer is `200` with
//! `Content-Type: application/x-ndjson` and `Connection: close`, one JSON object per line: `{"progress": ...}`
//! events while the command runs, then one `{"result": ...}` or `{"error": "..."}`. Anything else gets
//! `404`/`400`. Bodies are capped at 1 MiB, heads at 16 KiB.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use lamina_http::{read_capped, Body, Handler, Refusal, RequestHead, Response, StreamBody, StreamError};
use lamina_store::Store;
use serde_json::{json, Value};
use tracing::debug;

use crate::cli::{execute, Request};

/// File name of the admin socket inside the data root.
pub const ADMIN_SOCKET: &str = "admin.sock";
const MAX_BODY: usize = 1024 * 1024;

/// The admin socket of the data root `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(ADMIN_SOCKET)
}

/// Binds the admin socket (mode 0600).
pub fn bind(root: &Path) -> anyhow::Result<UnixListener> {
    let path = socket_path(root);
    lamina_http::bind_socket_with_mode(&path, 0o600)
        .with_context(|| format!("binding the admin socket {}", path.display()))
}

/// Serves the admin socket on a thread until `stop` is set.
pub fn spawn(
    listener: UnixListener,
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    crate::serve::spawn_http_thread("admin", stop, move |shutdown, cfg| {
        lamina_http::serve_with_config(listener, Arc::new(Admin { store }), shutdown, cfg)
    })
}

/// The admin socket's handler.
struct Admin {
    store: Arc<Store>,
}

impl Handler for Admin {
    fn handle<'h>(&'h self, head: &RequestHead, body: &mut Body<'_>) -> Response<'h> {
        if head.method != "POST" || head.path() != "/v1/command" {
            return Response::full(404, None, Vec::new()).closing();
        }
        let request = match read_capped(body, MAX_BODY) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("bad request: {e}")),
            Err(e) => {
                debug!(error = ?e, "bad admin request body");
                return Response::full(400, None, Vec::new()).closing();
            }
        };
        debug!(?request, "admin request");
        let run = Command {
            store: &self.store,
            request,
        };
        Response::stream("application/x-ndjson", Box::new(run)).closing()
    }

    fn refuse(&self, refusal: &Refusal) -> Response<'static> {
        debug!(status = refusal.status, error = %refusal.message, "bad admin request");
        Response::full(refusal.status, None, Vec::new()).closing()
    }
}

/// One command, run while its answer streams: progress lines, then the result.
struct Command<'h> {
    store: &'h Store,
    request: Result<Request, String>,
}

fn line(out: &mut dyn Write, v: Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    out.write_all(s.as_bytes())?;
    out.flush()
}

impl StreamBody for Command<'_> {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), StreamError> {
        let request = match self.request {
            Ok(r) => r,
            Err(e) => return Ok(line(out, json!({ "error": e }))?),
        };
        let result = execute(self.store, &request, &mut |p| {
            let _ = line(out, json!({ "progress": p }));
        });
        let last = match result {
            Ok(v) => json!({ "result": v }),
            Err(e) => json!({ "error": format!("{e:#}") }),
        };
        Ok(line(out, last)?)
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
