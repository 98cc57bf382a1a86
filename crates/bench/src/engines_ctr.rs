//! Tools of the docker, containerd and volume workloads: short-pathed runtime directories, a timing proxy for
//! the plugin socket, a tar writer that streams, an OCI image archive, and helpers for direct I/O and
//! page-cache accounting. The engines themselves (containerd, MooseFS) are `lamina-testkit`'s.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub use super::engines::drop_caches;
pub use lamina_testkit::{fill_random, TarWriter};

/// The static busybox of busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";
/// The containerd namespace the workloads use.
pub const CTR_NAMESPACE: &str = "lamina-bench";
/// Name of lamina's proxy plugin in the private containerd's config.
pub const PROXY_NAME: &str = "lamina";

/// Runs a command to completion; fails with its output unless it succeeds. Returns stdout.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&super::engines::run_checked(cmd)?.stdout).into_owned())
}

// ------------------------------------------------------------------------------------------------------------
// runtime directories
// ------------------------------------------------------------------------------------------------------------

/// A short-pathed directory for sockets, `/run/lamina-bench/<pid>-<n>` (a scratch path may be too long for a
/// unix socket address); removed on drop.
pub struct RunDir {
    /// The directory.
    pub path: PathBuf,
}

impl RunDir {
    /// Creates a fresh one.
    pub fn new() -> anyhow::Result<RunDir> {
        let id = super::engines::run_id();
        let path = Path::new(super::engines::RUN_DIR).join(id);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
        let _ = fs::remove_dir(super::engines::RUN_DIR);
    }
}

// ------------------------------------------------------------------------------------------------------------
// A timing proxy for the plugin socket
// ------------------------------------------------------------------------------------------------------------

/// Totals of the calls a [`TimingProxy`] forwarded.
#[derive(Debug, Default)]
pub struct ProxyTotals {
    nanos: AtomicU64,
    calls: AtomicU64,
    /// Per call (the request path without its query, e.g. `/GraphDriver.Get`): count and time.
    by_call: Mutex<BTreeMap<String, (u64, Duration)>>,
}

impl ProxyTotals {
    /// Time spent from the first byte of each request to the last byte of its response, and the call count.
    pub fn get(&self) -> (Duration, u64) {
        (
            Duration::from_nanos(self.nanos.load(Ordering::SeqCst)),
            self.calls.load(Ordering::SeqCst),
        )
    }

    /// Count and time of each call so far, by request path.
    pub fn by_call(&self) -> BTreeMap<String, (u64, Duration)> {
        self.by_call.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, call: &str, took: Duration) {
        self.nanos.fetch_add(took.as_nanos() as u64, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut m = self.by_call.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(call.to_string()).or_default();
        e.0 += 1;
        e.1 += took;
    }
}

/// The calls made between two [`ProxyTotals::by_call`] readings: per call, count and time.
pub fn calls_between(
    before: &BTreeMap<String, (u64, Duration)>,
    after: &BTreeMap<String, (u64, Duration)>,
) -> Vec<(String, u64, Duration)> {
    after
        .iter()
        .filter_map(|(k, (n, t))| {
            let (n0, t0) = before.get(k).copied().unwrap_or_default();
            (*n > n0).then(|| (k.clone(), n - n0, t.saturating_sub(t0)))
        })
        .collect()
}

/// The request path of an HTTP request head, without its query.
fn request_path(head: &[u8]) -> String {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let target = line.split(|b| *b == b' ').nth(1).unwrap_or_default();
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    String::from_utf8_lossy(path).into_owned()
}

/// Listens on `listen` and forwards each HTTP/1.1 request to `upstream` (one upstream connection per client
/// connection), adding the time from a request's first byte to its response's last byte to [`ProxyTotals`].
/// This is what lamina costs the caller, plus one extra unix-socket hop (tens of microseconds).
pub struct TimingProxy {
    listen: PathBuf,
    stop: Arc<AtomicBool>,
    /// The running totals.
    pub totals: Arc<ProxyTotals>,
    accept: Option<thread::JoinHandle<()>>,
}

impl TimingProxy {
    /// Binds `listen` (removing a stale socket file) and starts forwarding to `upstream`.
    pub fn start(listen: &Path, upstream: &Path) -> anyhow::Result<TimingProxy> {
        let _ = fs::remove_file(listen);
        let listener = UnixListener::bind(listen).with_context(|| format!("bind {}", listen.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(ProxyTotals::default());
        let (stop2, totals2, upstream) = (stop.clone(), totals.clone(), upstream.to_path_buf());
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (totals, upstream) = (totals2.clone(), upstream.clone());
                thread::spawn(move || {
                    if let Err(e) = proxy_connection(conn, &upstream, &totals) {
                        tracing::debug!("timing proxy connection ended: {e}");
                    }
                });
            }
        });
        Ok(TimingProxy {
            listen: listen.to_path_buf(),
            stop,
            totals,
            accept: Some(accept),
        })
    }
}

impl Drop for TimingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.listen);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = fs::remove_file(&self.listen);
    }
}

/// Head of an HTTP message: the raw bytes and how its body is delimited.
enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Reads one message head (through the blank line); `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" || head.ends_with(b"\n\n") {
            return Ok(Some(head));
        }
    }
}

fn body_kind(head: &[u8], is_response: bool) -> Body {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default().to_string();
    let mut kind = None;
    for l in lines {
        if let Some(v) = l.strip_prefix("content-length:") {
            if kind.is_none() {
                kind = v.trim().parse().ok().map(Body::Length);
            }
        } else if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            kind = Some(Body::Chunked);
        }
    }
    if is_response {
        let code = first.split_whitespace().nth(1).unwrap_or_default();
        if code.starts_with('1') || code == "204" || code == "304" {
            return Body::None;
        }
    }
    kind.unwrap_or(if is_response { Body::UntilClose } else { Body::None })
}

/// Copies one body from `r` to `w` as delimited by `kind`.
fn copy_body(r: &mut impl BufRead, w: &mut impl Write, kind: Body) -> io::Result<()> {
    match kind {
        Body::None => Ok(()),
        Body::Length(n) => {
            let copied = io::copy(&mut r.take(n), w)?;
            if copied != n {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(())
        }
        Body::UntilClose => io::copy(r, w).map(|_| ()),
        Body::Chunked => loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            w.write_all(&line)?;
            let size_text = String::from_utf8_lossy(&line);
            let size = u64::from_str_radix(size_text.trim().split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let mut t = Vec::new();
                    if r.read_until(b'\n', &mut t)? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    w.write_all(&t)?;
                    if t == b"\r\n" || t == b"\n" {
                        return Ok(());
                    }
                }
            }
            // Data and its CRLF.
            let copied = io::copy(&mut r.take(size + 2), w)?;
            if copied != size + 2 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        },
    }
}

fn proxy_connection(client: UnixStream, upstream: &Path, totals: &ProxyTotals) -> io::Result<()> {
    let server = UnixStream::connect(upstream)?;
    let mut from_client = BufReader::with_capacity(64 << 10, client.try_clone()?);
    let mut to_client = client;
    let mut from_server = BufReader::with_capacity(64 << 10, server.try_clone()?);
    let mut to_server = server;
    loop {
        // Wait for the first byte of the next request, then start the clock.
        if from_client.fill_buf()?.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let Some(head) = read_head(&mut from_client)? else {
            return Ok(());
        };
        to_server.write_all(&head)?;
        copy_body(&mut from_client, &mut to_server, body_kind(&head, false))?;
        to_server.flush()?;
        let Some(rhead) = read_head(&mut from_server)? else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        to_client.write_all(&rhead)?;
        let kind = body_kind(&rhead, true);
        let until_close = matches!(kind, Body::UntilClose);
        copy_body(&mut from_server, &mut to_client, kind)?;
        to_client.flush()?;
        totals.record(&request_path(&head), start.elapsed());
        if until_close {
            let _ = to_client.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Streaming tar writer and generated content
// ------------------------------------------------------------------------------------------------------------

/// Writes a busybox root filesystem (static `/bin/busybox`, one symlink per applet, `/etc/passwd`,
/// `/etc/group`, `/tmp`, `/root`) into a tar stream.
pub fn busybox_tree<W: Write>(tar: &mut TarWriter<W>) -> anyhow::Result<()> {
    let bin = fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX} (install busybox-static)"))?;
    for (d, mode) in [
        ("bin/", 0o755),
        ("etc/", 0o755),
        ("tmp/", 0o1777),
        ("root/", 0o700),
    ] {
        tar.dir(d, mode)?;
    }
    tar.file("bin/busybox", 0o755, &bin)?;
    let list = run(Command::new(BUSYBOX).arg("--list"))?;
    for applet in list.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        tar.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    tar.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    tar.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// Lower-case hex sha256 of a file (`sha256sum`).
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = run(Command::new("sha256sum").arg("-b").arg(path))?;
    let hex = out.split_whitespace().next().unwrap_or_default().to_string();
    if hex.len() != 64 {
        bail!("sha256sum {}: {out}", path.display());
    }
    Ok(hex)
}

// ------------------------------------------------------------------------------------------------------------
// OCI image archive (for `ctr images import`)
// ------------------------------------------------------------------------------------------------------------

/// Builds an OCI image layout of uncompressed layers in `dir` and tars it to `out`. `layers` are tar files,
/// moved into the layout. Returns the number of layer bytes.
pub fn oci_archive(dir: &Path, name: &str, layers: &[PathBuf], out: &Path) -> anyhow::Result<u64> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |path: &Path| -> anyhow::Result<(String, u64)> {
        let hex = sha256_file(path)?;
        let size = fs::metadata(path)?.len();
        fs::rename(path, blobs.join(&hex))?;
        Ok((format!("sha256:{hex}"), size))
    };
    let put_bytes = |data: &[u8], tmp: &Path| -> anyhow::Result<(String, u64)> {
        fs::write(tmp, data)?;
        put(tmp)
    };
    let mut descs = Vec::new();
    for l in layers {
        descs.push(put(l)?);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let diff_ids: Vec<&str> = descs.iter().map(|(d, _)| d.as_str()).collect();
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let (cdig, csize) = put_bytes(&serde_json::to_vec(&config)?, &dir.join("config.tmp"))?;
    let layer_descs: Vec<serde_json::Value> = descs
        .iter()
        .map(|(d, s)| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s})
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig, "size": csize},
        "layers": layer_descs,
    });
    let (mdig, msize) = put_bytes(&serde_json::to_vec(&manifest)?, &dir.join("manifest.tmp"))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdig,
            "size": msize,
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .args(["oci-layout", "index.json", "blobs"]))?;
    fs::remove_dir_all(dir)?;
    Ok(descs.iter().map(|(_, s)| s).sum())
}

// ------------------------------------------------------------------------------------------------------------
// Direct I/O and page cache
// ------------------------------------------------------------------------------------------------------------

/// `O_DIRECT` of this architecture.
#[cfg(any(target_arch = "aarch64", target_arch = "arm", target_arch = "powerpc64"))]
const O_DIRECT: i32 = 0o200000;
/// `O_DIRECT` of this architecture.
#[cfg(not(any(target_arch = "aarch64", target_arch = "arm", target_arch = "powerpc64")))]
const O_DIRECT: i32 = 0o40000;

/// Opens `path` read-write with `O_DIRECT` (creating it); `None` when the filesystem refuses direct I/O.
pub fn open_direct(path: &Path) -> io::Result<Option<fs::File>> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(22) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A buffer of `len` bytes aligned to 4 KiB (for `O_DIRECT`), as an owned vector and an offset into it.
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed aligned buffer.
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + 4096];
        let addr = raw.as_ptr() as usize;
        let off = (4096 - addr % 4096) % 4096;
        AlignedBuf { raw, off, len }
    }

    /// The aligned bytes.
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// `Cached:` of /proc/meminfo, in bytes.
pub fn meminfo_cached() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cached:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Page cache charged to the memory cgroup of process `pid`: `cache` of cgroup v1's memory.stat or `file` of
/// v2's; `None` when the cgroup is not reachable.
pub fn cgroup_page_cache(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (mut v1, mut v2) = (None, None);
    for l in text.lines() {
        let mut parts = l.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctrls.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        } else if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        }
    }
    let (file, key) = match (v1, v2) {
        (Some(p), _) => (format!("/sys/fs/cgroup/memory{p}/memory.stat"), "cache"),
        (None, Some(p)) => (format!("/sys/fs/cgroup{p}/memory.stat"), "file"),
        _ => return None,
    };
    fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Percentile `p` (0..=100) of `samples` (sorted here), nearest-rank.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}
