//! Test harness: an in-memory GraphDriver that records calls, a server on a real unix socket
//! in a temp dir, and a raw HTTP client that sends bytes the way dockerd 20.10 does.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lamina_docker::{
    serve_with_config, CreateRequest, DiffStream, ErrorKind, FileChange, GraphDriver, InitRequest,
    PluginError, Router, ServerConfig, ShutdownHandle,
};

/// An in-memory layer map that records every call.
#[derive(Default)]
pub struct Fake {
    pub calls: Mutex<Vec<String>>,
    pub layers: Mutex<BTreeMap<String, Option<String>>>,
    pub mounted: Mutex<HashSet<String>>,
    pub init_req: Mutex<Option<InitRequest>>,
    pub create_reqs: Mutex<Vec<(CreateRequest, bool)>>,
    /// Bytes produced by Diff.
    pub diff_len: AtomicUsize,
    /// If non-zero, Diff fails after writing this many bytes.
    pub diff_fail_after: AtomicUsize,
    /// Bytes read by the last ApplyDiff.
    pub applied: Mutex<BTreeMap<String, u64>>,
}

impl Fake {
    pub fn new() -> Arc<Self> {
        let f = Fake::default();
        f.diff_len.store(10240, Ordering::SeqCst);
        Arc::new(f)
    }

    fn record(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn add_layer(&self, id: &str) {
        self.layers.lock().unwrap().insert(id.to_owned(), None);
    }

    fn known(&self, id: &str) -> Result<(), PluginError> {
        if self.layers.lock().unwrap().contains_key(id) {
            Ok(())
        } else {
            Err(PluginError::not_found(format!("layer {id}")))
        }
    }
}

struct FakeDiff {
    len: usize,
    fail_after: usize,
}

impl DiffStream for FakeDiff {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), PluginError> {
        let block: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut written = 0;
        while written < self.len {
            if self.fail_after > 0 && written >= self.fail_after {
                return Err(PluginError::new(ErrorKind::Io, "disk on fire"));
            }
            let n = block.len().min(self.len - written);
            out.write_all(&block[..n])
                .map_err(|e| PluginError::new(ErrorKind::Io, e.to_string()))?;
            written += n;
        }
        Ok(())
    }
}

impl GraphDriver for Fake {
    fn init(&self, req: InitRequest) -> Result<(), PluginError> {
        self.record(format!("init {}", req.home));
        *self.init_req.lock().unwrap() = Some(req);
        Ok(())
    }
    fn create(&self, req: CreateRequest, read_write: bool) -> Result<(), PluginError> {
        self.record(format!("create {} {:?} {read_write}", req.id, req.parent));
        let mut layers = self.layers.lock().unwrap();
        if layers.contains_key(&req.id) {
            return Err(PluginError::new(
                ErrorKind::AlreadyExists,
                format!("layer {}", req.id),
            ));
        }
        if let Some(p) = &req.parent {
            if !layers.contains_key(p) {
                return Err(PluginError::not_found(format!("parent {p}")));
            }
        }
        layers.insert(req.id.clone(), req.parent.clone());
        drop(layers);
        self.create_reqs.lock().unwrap().push((req, read_write));
        Ok(())
    }
    fn remove(&self, id: &str) -> Result<(), PluginError> {
        self.record(format!("remove {id}"));
        self.layers.lock().unwrap().remove(id);
        Ok(())
    }
    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, PluginError> {
        self.record(format!("get {id} {mount_label}"));
        self.known(id)?;
        self.mounted.lock().unwrap().insert(id.to_owned());
        Ok(PathBuf::from(format!("/fake/mnt/{id}")))
    }
    fn put(&self, id: &str) -> Result<(), PluginError> {
        self.record(format!("put {id}"));
        self.mounted.lock().unwrap().remove(id);
        Ok(())
    }
    fn exists(&self, id: &str) -> bool {
        self.record(format!("exists {id}"));
        self.layers.lock().unwrap().contains_key(id)
    }
    fn status(&self) -> Vec<[String; 2]> {
        self.record("status".into());
        vec![
            ["Backing Filesystem".into(), "fake".into()],
            ["Layers".into(), self.layers.lock().unwrap().len().to_string()],
        ]
    }
    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, PluginError> {
        self.record(format!("metadata {id}"));
        self.known(id)?;
        Ok(BTreeMap::from([("Id".to_owned(), id.to_owned())]))
    }
    fn cleanup(&self) -> Result<(), PluginError> {
        self.record("cleanup".into());
        Ok(())
    }
    fn diff(&self, id: &str, parent: &str) -> Result<Box<dyn DiffStream + '_>, PluginError> {
        self.record(format!("diff {id} {parent}"));
        self.known(id)?;
        Ok(Box::new(FakeDiff {
            len: self.diff_len.load(Ordering::SeqCst),
            fail_after: self.diff_fail_after.load(Ordering::SeqCst),
        }))
    }
    fn changes(&self, id: &str, parent: &str) -> Result<Vec<FileChange>, PluginError> {
        self.record(format!("changes {id} {parent}"));
        self.known(id)?;
        Ok(vec![
            FileChange {
                path: "/etc/motd".into(),
                kind: 2,
            },
            FileChange {
                path: "/new".into(),
                kind: 1,
            },
        ])
    }
    fn apply_diff(&self, id: &str, parent: &str, body: &mut dyn Read) -> Result<u64, PluginError> {
        self.record(format!("apply {id} {parent}"));
        self.known(id)?;
        let n = io::copy(body, &mut io::sink())
            .map_err(|e| PluginError::new(ErrorKind::InvalidArchive, e.to_string()))?;
        self.applied.lock().unwrap().insert(id.to_owned(), n);
        Ok(n)
    }
    fn diff_size(&self, id: &str, parent: &str) -> Result<u64, PluginError> {
        self.record(format!("diffsize {id} {parent}"));
        self.known(id)?;
        Ok(42)
    }
}

/// A server on a unix socket in a temp dir.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub fake: Arc<Fake>,
    pub shutdown: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    pub fn start() -> Self {
        Self::with_config(ServerConfig::default())
    }

    pub fn with_config(cfg: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/plugins/test.sock");
        let listener = lamina_docker::bind_socket(&path).unwrap();
        let fake = Fake::new();
        let router = Arc::new(Router::new().with_graph_driver(fake.clone()));
        let shutdown = ShutdownHandle::new();
        let sd = shutdown.clone();
        let thread = std::thread::spawn(move || serve_with_config(listener, router, &sd, cfg));
        TestServer {
            dir,
            path,
            fake,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn connect(&self) -> Client {
        Client::new(UnixStream::connect(&self.path).unwrap())
    }

    /// A started server and one client connected to it.
    pub fn connected() -> (Self, Client) {
        Self::connected_with(&[])
    }

    /// A started server whose fake driver holds `layers`, and one client connected to it.
    pub fn connected_with(layers: &[&str]) -> (Self, Client) {
        let srv = Self::start();
        for id in layers {
            srv.fake.add_layer(id);
        }
        let c = srv.connect();
        (srv, c)
    }

    /// Requests shutdown and waits for `serve` to return.
    pub fn stop(&mut self) -> io::Result<()> {
        self.shutdown.shutdown();
        match self.thread.take() {
            Some(t) => t.join().unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A parsed response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For chunked bodies: whether the terminating zero-length chunk arrived.
    pub terminated: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `Err` string of an error reply.
    pub fn err(&self) -> String {
        self.json()["Err"]
            .as_str()
            .unwrap_or_else(|| panic!("no Err in {:?}", self.json()))
            .to_owned()
    }
}

/// A raw HTTP/1.1 client over a unix stream.
pub struct Client {
    pub reader: BufReader<UnixStream>,
}

/// Head of a request as dockerd 20.10.24 sends it (Go net/http, empty Host, no Content-Type).
pub fn dockerd_request(path: &str, body: &str) -> Vec<u8> {
    let mut v = format!(
        "POST {path} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body.as_bytes());
    v
}

impl Client {
    pub fn new(s: UnixStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            reader: BufReader::new(s),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// POSTs a JSON body the way dockerd does (with the encoder's trailing newline).
    pub fn call(&mut self, path: &str, json: &str) -> Response {
        let body = if json.is_empty() {
            String::new()
        } else {
            format!("{json}\n")
        };
        self.send(&dockerd_request(path, &body)).unwrap();
        self.read_response().unwrap()
    }

    /// Sends an ApplyDiff like dockerd: ids in the query string, chunked body.
    pub fn apply_diff_head(&mut self, query: &str) -> io::Result<()> {
        let head = format!(
            "POST /GraphDriver.ApplyDiff?{query} HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n"
        );
        self.send(head.as_bytes())
    }

    pub fn send_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        let mut v = format!("{:x}\r\n", data.len()).into_bytes();
        v.extend_from_slice(data);
        v.extend_from_slice(b"\r\n");
        self.send(&v)
    }

    pub fn end_chunks(&mut self) -> io::Result<()> {
        self.send(b"0\r\n\r\n")
    }

    pub fn apply_diff(&mut self, query: &str, data: &[u8]) -> Response {
        self.apply_diff_head(query).unwrap();
        for c in data.chunks(32 * 1024) {
            self.send_chunk(c).unwrap();
        }
        self.end_chunks().unwrap();
        self.read_response().unwrap()
    }

    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof"));
        }
        Ok(l.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Reads one response (Content-Length, chunked, or until EOF).
    pub fn read_response(&mut self) -> io::Result<Response> {
        self.read_response_with(|_| {})
    }

    /// Like `read_response`, handing each chunk of a chunked body to `sink` as it arrives.
    pub fn read_response_with(&mut self, mut sink: impl FnMut(&[u8])) -> io::Result<Response> {
        let status_line = self.line()?;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let l = self.line()?;
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
            terminated: false,
        };
        if status == 100 {
            return Ok(resp);
        }
        if resp
            .header("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size_line = match self.line() {
                    Ok(l) => l,
                    Err(_) => return Ok(resp),
                };
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    let _ = self.line();
                    resp.terminated = true;
                    return Ok(resp);
                }
                let mut data = vec![0; size];
                if self.reader.read_exact(&mut data).is_err() {
                    return Ok(resp);
                }
                sink(&data);
                if resp.body.len() < 64 << 20 {
                    resp.body.extend_from_slice(&data);
                }
                let mut crlf = [0; 2];
                if self.reader.read_exact(&mut crlf).is_err() {
                    return Ok(resp);
                }
            }
        } else if let Some(n) = resp.header("Content-Length") {
            let n: usize = n.parse().unwrap();
            resp.body = vec![0; n];
            self.reader.read_exact(&mut resp.body)?;
        } else {
            self.reader.read_to_end(&mut resp.body)?;
        }
        Ok(resp)
    }

    /// Whether the server closed the connection (EOF or reset) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.reader.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        }
    }
}
