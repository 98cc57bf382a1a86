//! A tiny blocking HTTP/1.1 client for the Docker plugin socket, as a measuring tool.
//!
//! One keep-alive connection over a unix socket (reopened when the server closes it), JSON requests with
//! `Content-Length`, tar uploads with `Transfer-Encoding: chunked` in 64 KiB pieces, the way dockerd 20.10
//! sends `GraphDriver.ApplyDiff`. It is not a general client: replies are read whole into memory.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Size of each upload piece (and chunk).
const PIECE: usize = 64 * 1024;

/// A keep-alive plugin-protocol client.
pub struct PluginClient {
    path: PathBuf,
    conn: Option<(UnixStream, BufReader<UnixStream>)>,
    /// Read/write timeout per call.
    pub timeout: Duration,
    /// Connections opened so far (1 when keep-alive held throughout).
    pub connects: u64,
}

/// One HTTP reply.
struct Response {
    status: u16,
    body: Vec<u8>,
}

impl PluginClient {
    /// A client for the socket at `path` (nothing is connected yet).
    pub fn new(path: &Path) -> Self {
        PluginClient {
            path: path.to_owned(),
            conn: None,
            timeout: Duration::from_secs(600),
            connects: 0,
        }
    }

    fn stream(&mut self) -> Result<&mut (UnixStream, BufReader<UnixStream>)> {
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.path)
                .with_context(|| format!("connecting to {}", self.path.display()))?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            let r = BufReader::with_capacity(64 * 1024, s.try_clone()?);
            self.conn = Some((s, r));
            self.connects += 1;
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// POST `/endpoint` with a JSON body; returns the decoded reply, or the plugin's `Err` as an error.
    pub fn call(&mut self, endpoint: &str, body: &Value) -> Result<Value> {
        let mut body = serde_json::to_vec(body)?;
        body.push(b'\n');
        let mut req = format!(
            "POST /{endpoint} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let reused = self.conn.is_some();
        let (w, _) = self.stream()?;
        if let Err(e) = w.write_all(&req) {
            self.conn = None;
            // A keep-alive connection left idle (e.g. during a long I/O phase) may have been closed by the
            // server's idle timeout: the request was not taken, so it is sent once more on a new connection.
            if !reused {
                return Err(e).context(format!("sending {endpoint}"));
            }
            let (w, _) = self.stream()?;
            if let Err(e) = w.write_all(&req) {
                self.conn = None;
                return Err(e).context(format!("sending {endpoint}"));
            }
        }
        let resp = self
            .read_response()
            .with_context(|| format!("reading the reply to {endpoint}"))?;
        decode(endpoint, resp)
    }

    /// What dockerd sends first after discovering a graph-driver plugin: `Plugin.Activate` and
    /// `GraphDriver.Init` (with `home` as the driver home).
    pub fn handshake(&mut self, home: &Path) -> Result<()> {
        self.call("Plugin.Activate", &json!({}))?;
        self.call(
            "GraphDriver.Init",
            &json!({"Home": home, "Opts": null, "UIDMaps": null, "GIDMaps": null}),
        )?;
        Ok(())
    }

    /// `GraphDriver.ApplyDiff` with a chunked body read from `input`; returns the `Size` reply.
    pub fn apply_diff(&mut self, id: &str, parent: &str, input: &mut dyn Read) -> Result<u64> {
        let head = format!(
            "POST /GraphDriver.ApplyDiff?id={id}&parent={parent} HTTP/1.1\r\nHost: plugin\r\n\
             Accept: application/vnd.docker.plugins.v1.2+json\r\nContent-Type: application/x-tar\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        if let Err(e) = self.send_chunked(head.as_bytes(), input) {
            // The server may have answered early (an error) and closed; show its answer.
            let early = self.read_response().ok();
            self.conn = None;
            if let Some(r) = early {
                decode("GraphDriver.ApplyDiff", r).context(format!("upload aborted: {e:#}"))?;
            }
            return Err(e);
        }
        let resp = self.read_response().context("reading the reply to ApplyDiff")?;
        let v = decode("GraphDriver.ApplyDiff", resp)?;
        v.get("Size")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("ApplyDiff reply without Size: {v}"))
    }

    fn send_chunked(&mut self, head: &[u8], input: &mut dyn Read) -> Result<()> {
        const PREFIX: usize = 8; // "ffff\r\n" fits; the size is right-aligned in the prefix.
        let (w, _) = self.stream()?;
        w.write_all(head).context("sending the ApplyDiff head")?;
        let mut buf = vec![0u8; PREFIX + PIECE + 2];
        loop {
            let n = read_full(input, &mut buf[PREFIX..PREFIX + PIECE]).context("reading the tar")?;
            if n == 0 {
                break;
            }
            let size = format!("{n:x}\r\n");
            let start = PREFIX - size.len();
            buf[start..PREFIX].copy_from_slice(size.as_bytes());
            buf[PREFIX + n..PREFIX + n + 2].copy_from_slice(b"\r\n");
            w.write_all(&buf[start..PREFIX + n + 2])
                .context("sending a chunk")?;
        }
        w.write_all(b"0\r\n\r\n").context("sending the last chunk")?;
        Ok(())
    }

    fn read_response(&mut self) -> Result<Response> {
        let (_, r) = self.stream()?;
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            self.conn = None;
            bail!("connection closed before a reply");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("connection closed inside the reply head");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let Some((k, v)) = l.split_once(':') else {
                bail!("bad header line {l:?}")
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().context("bad Content-Length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let hex = line.trim_end().split(';').next().unwrap_or("");
                let n = usize::from_str_radix(hex.trim(), 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                if n == 0 {
                    // Trailers, then the empty line.
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let at = body.len();
                body.resize(at + n, 0);
                r.read_exact(&mut body[at..])?;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        } else {
            r.read_to_end(&mut body)?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok(Response { status, body })
    }
}

fn decode(endpoint: &str, resp: Response) -> Result<Value> {
    let v: Value = if resp.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&resp.body).with_context(|| {
            format!(
                "{endpoint}: HTTP {} with a non-JSON body: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            )
        })?
    };
    if let Some(err) = v.get("Err").and_then(Value::as_str).filter(|e| !e.is_empty()) {
        bail!("{endpoint}: HTTP {}: {err}", resp.status);
    }
    if resp.status != 200 {
        bail!("{endpoint}: HTTP {}: {v}", resp.status);
    }
    Ok(v)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
