//! Benchmark driver for lamina's GraphDriver face, run by `scripts/bench.sh`.
//!
//! Subcommands:
//! - `gen-tar`: writes a deterministic ustar archive (log-normal file sizes, pseudo-random bytes).
//! - `apply`: Create + chunked ApplyDiff of a tar file, optionally sampling the daemon's RSS.
//! - `getput`: builds a layer chain, puts a RW layer on top and times Get/Put pairs.
//! - `report`: reads the result lines written by `bench.sh` and prints the summary table.
//!
//! The HTTP/1.1 client below is deliberately tiny: one keep-alive connection over a unix
//! socket, JSON requests with `Content-Length`, tar uploads with `Transfer-Encoding: chunked`.
//! It is a measuring tool, not a general client; nothing here is part of the test suite.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Size of each upload piece (and chunk) read from the tar file.
const PIECE: usize = 64 * 1024;

#[derive(Debug, Parser)]
#[command(name = "bench", about = "lamina benchmark driver (see scripts/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a deterministic tar: `dirs` directories, `files` regular files with log-normal
    /// sizes of the given median, scaled so the small files carry about `payload_mb` MB,
    /// plus `large_files` files of `large_mb` MiB each.
    GenTar {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42_000)]
        files: usize,
        #[arg(long, default_value_t = 2_000)]
        dirs: usize,
        /// Target payload of the small files, in MB (10^6 bytes).
        #[arg(long, default_value_t = 215)]
        payload_mb: u64,
        /// Median size of the small files, in bytes.
        #[arg(long, default_value_t = 2048)]
        median: u64,
        #[arg(long, default_value_t = 0)]
        large_files: usize,
        #[arg(long, default_value_t = 192)]
        large_mb: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Create a layer and ApplyDiff a tar file into it; prints one `key=value` line.
    Apply {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        tar: PathBuf,
        /// Layer id [default: derived from the current time].
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "")]
        parent: String,
        /// Remove the layer again after timing (not timed).
        #[arg(long)]
        remove: bool,
        /// Sample VmRSS of this pid during the upload and read VmHWM afterwards.
        #[arg(long)]
        rss_pid: Option<u32>,
        #[arg(long, default_value_t = 20)]
        sample_ms: u64,
        /// Report the CPU time (user + sys) this pid spends during Create + ApplyDiff.
        #[arg(long)]
        cpu_pid: Option<u32>,
    },
    /// Build a chain of `depth` layers plus a RW layer, then time `iters` Get+Put pairs.
    Getput {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        depth: usize,
        #[arg(long, default_value_t = 1000)]
        iters: usize,
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        /// Keep the layers afterwards (default: Remove them, untimed).
        #[arg(long)]
        keep: bool,
    },
    /// Kernel floor for Get/Put: time overlay mount + detached umount through lamina-sys (the
    /// code lamina uses) over `depth` tiny lower dirs, with an upper dir (as a RW layer) and
    /// without one (read-only, as in the performance.md anchor). No daemon involved.
    OverlayFloor {
        /// Scratch directory on the filesystem under test.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        depth: usize,
        #[arg(long, default_value_t = 1000)]
        iters: usize,
        #[arg(long, default_value_t = 50)]
        warmup: usize,
    },
    /// Print the summary table from the result lines collected by bench.sh.
    Report {
        #[arg(long)]
        results: PathBuf,
        /// Free-text description of the filesystem under test.
        #[arg(long, default_value = "")]
        fs: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::GenTar {
            out,
            files,
            dirs,
            payload_mb,
            median,
            large_files,
            large_mb,
            seed,
        } => {
            let spec = TarSpec {
                files,
                dirs,
                payload: payload_mb * 1_000_000,
                median,
                large_files,
                large_size: large_mb << 20,
                seed,
            };
            gen_tar(&out, &spec)
        }
        Cmd::Apply {
            socket,
            tar,
            id,
            parent,
            remove,
            rss_pid,
            sample_ms,
            cpu_pid,
        } => {
            let id = id.unwrap_or_else(|| hex_id(now_seed()));
            let pids = Pids {
                rss: rss_pid,
                cpu: cpu_pid,
            };
            cmd_apply(&socket, &tar, &id, &parent, remove, pids, sample_ms)
        }
        Cmd::Getput {
            socket,
            depth,
            iters,
            warmup,
            keep,
        } => cmd_getput(&socket, depth, iters, warmup, keep),
        Cmd::OverlayFloor {
            dir,
            depth,
            iters,
            warmup,
        } => cmd_overlay_floor(&dir, depth, iters, warmup),
        Cmd::Report { results, fs } => cmd_report(&results, &fs),
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic pseudo-random numbers (splitmix64).

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller, one value per call).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn now_seed() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

/// A Docker-style 64-hex layer id.
fn hex_id(seed: u64) -> String {
    let mut rng = Rng(seed);
    (0..4).fold(String::with_capacity(64), |mut s, _| {
        let _ = write!(s, "{:016x}", rng.next());
        s
    })
}

// ---------------------------------------------------------------------------------------------
// Tar generation (ustar headers written by hand).

struct TarSpec {
    files: usize,
    dirs: usize,
    payload: u64,
    median: u64,
    large_files: usize,
    large_size: u64,
    seed: u64,
}

/// Largest small file; keeps the log-normal tail from producing a handful of huge files.
const MAX_SMALL: f64 = 16.0 * 1024.0 * 1024.0;
const MTIME: u64 = 1_700_000_000;

fn small_sizes(z: &[f64], median: f64, sigma: f64) -> impl Iterator<Item = u64> + '_ {
    z.iter()
        .map(move |z| (median * (sigma * z).exp()).min(MAX_SMALL).round() as u64)
}

/// Writes `value` as NUL-terminated zero-padded octal filling `field`.
fn octal(field: &mut [u8], value: u64) -> Result<()> {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    if s.len() > digits {
        bail!("value {value} does not fit a {}-byte tar field", field.len());
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    Ok(())
}

fn ustar_header(path: &str, dir: bool, size: u64) -> Result<[u8; 512]> {
    let mut h = [0u8; 512];
    let p = path.as_bytes();
    if p.len() <= 100 {
        h[..p.len()].copy_from_slice(p);
    } else {
        let cut = p[..p.len().min(156)]
            .iter()
            .rposition(|&c| c == b'/')
            .filter(|&i| p.len() - i - 1 <= 100)
            .ok_or_else(|| anyhow!("path too long for ustar: {path}"))?;
        h[345..345 + cut].copy_from_slice(&p[..cut]);
        h[..p.len() - cut - 1].copy_from_slice(&p[cut + 1..]);
    }
    octal(&mut h[100..108], if dir { 0o755 } else { 0o644 })?;
    octal(&mut h[108..116], 0)?;
    octal(&mut h[116..124], 0)?;
    octal(&mut h[124..136], size)?;
    octal(&mut h[136..148], MTIME)?;
    h[156] = if dir { b'5' } else { b'0' };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

struct TarWriter<W: Write> {
    out: W,
    rng: Rng,
    buf: Vec<u8>,
    entries: u64,
    files: u64,
    dirs: u64,
    payload: u64,
    bytes: u64,
}

impl<W: Write> TarWriter<W> {
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.bytes += data.len() as u64;
        self.out.write_all(data)
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        let h = ustar_header(&format!("{path}/"), true, 0)?;
        self.put(&h)?;
        self.entries += 1;
        self.dirs += 1;
        Ok(())
    }

    fn file(&mut self, path: &str, size: u64) -> Result<()> {
        let h = ustar_header(path, false, size)?;
        self.put(&h)?;
        let mut left = size;
        while left > 0 {
            let n = left.min(self.buf.len() as u64) as usize;
            let mut chunk = std::mem::take(&mut self.buf);
            self.rng.fill(&mut chunk[..n]);
            let r = self.put(&chunk[..n]);
            self.buf = chunk;
            r?;
            left -= n as u64;
        }
        let pad = (512 - size % 512) % 512;
        self.put(&[0u8; 512][..pad as usize])?;
        self.entries += 1;
        self.files += 1;
        self.payload += size;
        Ok(())
    }
}

fn gen_tar(out: &Path, spec: &TarSpec) -> Result<()> {
    if spec.dirs == 0 {
        bail!("--dirs must be at least 1");
    }
    let mut rng = Rng(spec.seed);
    // Sizes: median * exp(sigma * z), with sigma found by bisection so the total matches the
    // requested payload while the median stays where it was asked to be.
    let z: Vec<f64> = (0..spec.files).map(|_| rng.normal()).collect();
    let median = spec.median as f64;
    let (mut lo, mut hi) = (0.0f64, 3.0f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if small_sizes(&z, median, mid).sum::<u64>() < spec.payload {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let sizes: Vec<u64> = small_sizes(&z, median, lo).collect();

    // Two-level tree: `top` directories, the rest spread below them; files spread over all.
    let top = (spec.dirs / 50).max(1);
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); top];
    for d in top..spec.dirs {
        children[(d - top) % top].push(d);
    }
    let names: Vec<String> = (0..spec.dirs)
        .map(|d| {
            if d < top {
                format!("t{d:03}")
            } else {
                format!("t{:03}/d{d:05}", (d - top) % top)
            }
        })
        .collect();
    let mut files_in: Vec<Vec<usize>> = vec![Vec::new(); spec.dirs];
    for f in 0..spec.files {
        files_in[(rng.next() % spec.dirs as u64) as usize].push(f);
    }

    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = TarWriter {
        out: BufWriter::with_capacity(1 << 20, file),
        rng: Rng(spec.seed ^ 0x5eed_da7a),
        buf: vec![0u8; 1 << 20],
        entries: 0,
        files: 0,
        dirs: 0,
        payload: 0,
        bytes: 0,
    };
    // Depth-first, like `tar -c` of a real tree: a directory, its files, then its children.
    for (t, kids) in children.iter().enumerate() {
        for d in std::iter::once(t).chain(kids.iter().copied()) {
            w.dir(&names[d])?;
            for &f in &files_in[d] {
                w.file(&format!("{}/f{f:06}.dat", names[d]), sizes[f])?;
            }
        }
    }
    if spec.large_files > 0 {
        w.dir("large")?;
        for i in 0..spec.large_files {
            w.file(&format!("large/blob{i:02}.bin"), spec.large_size)?;
        }
    }
    w.put(&[0u8; 1024])?;
    w.out.flush()?;
    w.out.get_ref().sync_all()?;

    let mut sorted = sizes.clone();
    sorted.sort_unstable();
    let med = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    println!(
        "entries={} files={} dirs={} payload_bytes={} tar_bytes={} median_small={} sigma={:.3}",
        w.entries, w.files, w.dirs, w.payload, w.bytes, med, lo
    );
    Ok(())
}

/// An in-memory tar holding one small file, for building layer chains.
fn tiny_tar(name: &str) -> Result<Vec<u8>> {
    let body = format!("layer {name}\n");
    let mut v = Vec::with_capacity(2048);
    v.extend_from_slice(&ustar_header(
        &format!("layer-{name}.txt"),
        false,
        body.len() as u64,
    )?);
    v.extend_from_slice(body.as_bytes());
    v.resize(v.len().div_ceil(512) * 512, 0);
    v.resize(v.len() + 1024, 0);
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// A tiny blocking HTTP/1.1 client over a unix socket.

struct Client {
    path: PathBuf,
    conn: Option<(UnixStream, BufReader<UnixStream>)>,
    /// Connections opened so far (1 when keep-alive held throughout).
    connects: u64,
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Client {
    fn new(path: &Path) -> Self {
        Client {
            path: path.to_owned(),
            conn: None,
            connects: 0,
        }
    }

    fn stream(&mut self) -> Result<&mut (UnixStream, BufReader<UnixStream>)> {
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.path)
                .with_context(|| format!("connecting to {}", self.path.display()))?;
            let r = BufReader::with_capacity(64 * 1024, s.try_clone()?);
            self.conn = Some((s, r));
            self.connects += 1;
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// POST with a JSON body; returns the decoded JSON reply or the plugin's `Err`.
    fn call(&mut self, endpoint: &str, body: &Value) -> Result<Value> {
        let body = serde_json::to_vec(body)?;
        let mut req = format!(
            "POST /{endpoint} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let (w, _) = self.stream()?;
        if let Err(e) = w.write_all(&req) {
            self.conn = None;
            return Err(e).context(format!("sending {endpoint}"));
        }
        let resp = self
            .read_response()
            .with_context(|| format!("reading the reply to {endpoint}"))?;
        decode(endpoint, resp)
    }

    /// ApplyDiff with a chunked body read from `input` in 64 KiB pieces.
    fn apply_diff(&mut self, id: &str, parent: &str, input: &mut dyn Read) -> Result<u64> {
        let head = format!(
            "POST /GraphDriver.ApplyDiff?id={id}&parent={parent} HTTP/1.1\r\nHost: plugin\r\n\
             Accept: application/vnd.docker.plugins.v1.2+json\r\nContent-Type: application/x-tar\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        let sent = self.send_chunked(head.as_bytes(), input);
        if let Err(e) = sent {
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

/// What dockerd sends first after discovering the plugin.
fn handshake(c: &mut Client, socket: &Path) -> Result<()> {
    c.call("Plugin.Activate", &json!({}))?;
    let home = socket.parent().unwrap_or(Path::new("/")).join("home");
    c.call(
        "GraphDriver.Init",
        &json!({"Home": home, "Opts": null, "UIDMaps": null, "GIDMaps": null}),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// apply

/// Samples a pid's VmRSS until stopped; returns (max VmRSS KiB, max RssAnon KiB, samples).
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(u64, u64, u64)>,
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    status_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, key)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let (mut peak, mut anon, mut n) = (0u64, 0u64, 0u64);
            while !flag.load(Ordering::Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    peak = peak.max(status_kib(&s, "VmRSS").unwrap_or(0));
                    anon = anon.max(status_kib(&s, "RssAnon").unwrap_or(0));
                    n += 1;
                }
                thread::sleep(every);
            }
            (peak, anon, n)
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0, 0))
    }
}

/// CPU seconds (user + sys, all threads) of a process, from `/proc/<pid>/stat`.
fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is field 3, utime 14, stime 15 (USER_HZ = 100).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

struct Pids {
    rss: Option<u32>,
    cpu: Option<u32>,
}

fn cmd_apply(
    socket: &Path,
    tar: &Path,
    id: &str,
    parent: &str,
    remove: bool,
    pids: Pids,
    sample_ms: u64,
) -> Result<()> {
    let rss_pid = pids.rss;
    let mut c = Client::new(socket);
    handshake(&mut c, socket)?;
    let tar_bytes = std::fs::metadata(tar)
        .with_context(|| format!("stat {}", tar.display()))?
        .len();
    let mut file = File::open(tar).with_context(|| format!("opening {}", tar.display()))?;

    let mut rss_before = 0;
    if let Some(pid) = rss_pid {
        // Reset the peak-RSS counter (VmHWM) so it covers this upload only ("5" since Linux 4.0).
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        rss_before = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    }
    let sampler = rss_pid.map(|pid| RssSampler::start(pid, Duration::from_millis(sample_ms)));

    let cpu0 = pids.cpu.and_then(|p| proc_cpu_secs(&p.to_string()));
    let self0 = proc_cpu_secs("self");
    let t0 = Instant::now();
    c.call("GraphDriver.Create", &json!({"ID": id, "Parent": parent}))?;
    let t1 = Instant::now();
    let size = c.apply_diff(id, parent, &mut file)?;
    let t2 = Instant::now();
    let cpu1 = pids.cpu.and_then(|p| proc_cpu_secs(&p.to_string()));
    let self1 = proc_cpu_secs("self");

    let mut line = format!(
        "create_s={:.6} apply_s={:.6} total_s={:.6} size={size} tar_bytes={tar_bytes} id={id}",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t2 - t0).as_secs_f64()
    );
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let _ = write!(line, " server_cpu_s={:.2}", b - a);
    }
    if let (Some(a), Some(b)) = (self0, self1) {
        let _ = write!(line, " client_cpu_s={:.2}", b - a);
    }
    if let (Some(pid), Some(s)) = (rss_pid, sampler) {
        let (peak, anon, samples) = s.finish();
        let hwm = proc_status_kib(pid, "VmHWM").unwrap_or(0);
        let after = proc_status_kib(pid, "VmRSS").unwrap_or(0);
        let _ = write!(
            line,
            " rss_before_kib={rss_before} rss_peak_kib={peak} anon_peak_kib={anon} rss_after_kib={after} \
             hwm_kib={hwm} samples={samples}"
        );
    }
    if remove {
        c.call("GraphDriver.Remove", &json!({"ID": id}))?;
    }
    let _ = write!(line, " connects={}", c.connects);
    println!("{line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// getput

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest-rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn micros(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let max = v.last().copied().unwrap_or(f64::NAN);
    (percentile(&v, 50.0) * 1e6, percentile(&v, 99.0) * 1e6, max * 1e6)
}

fn cmd_getput(socket: &Path, depth: usize, iters: usize, warmup: usize, keep: bool) -> Result<()> {
    if depth == 0 {
        bail!("--depth must be at least 1");
    }
    let mut c = Client::new(socket);
    handshake(&mut c, socket)?;
    let seed = now_seed();
    let mut ids: Vec<String> = Vec::with_capacity(depth + 1);
    let mut build = Vec::with_capacity(depth);
    for i in 0..depth {
        let id = hex_id(seed.wrapping_add(i as u64));
        let parent = ids.last().cloned().unwrap_or_default();
        let tar = tiny_tar(&i.to_string())?;
        let t = Instant::now();
        c.call("GraphDriver.Create", &json!({"ID": id, "Parent": parent}))?;
        c.apply_diff(&id, &parent, &mut tar.as_slice())?;
        build.push(t.elapsed().as_secs_f64());
        ids.push(id);
    }
    let rw = format!("{}-rw", hex_id(seed ^ 0xffff));
    let parent = ids.last().cloned().unwrap_or_default();
    c.call(
        "GraphDriver.CreateReadWrite",
        &json!({"ID": rw, "Parent": parent}),
    )?;

    let mut dir: Option<String> = None;
    let (mut get, mut put, mut pair) = (
        Vec::with_capacity(iters),
        Vec::with_capacity(iters),
        Vec::with_capacity(iters),
    );
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        let v = c.call("GraphDriver.Get", &json!({"ID": rw}))?;
        let t1 = Instant::now();
        c.call("GraphDriver.Put", &json!({"ID": rw}))?;
        let t2 = Instant::now();
        let d = v
            .get("Dir")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("Get reply without Dir: {v}"))?;
        match &dir {
            None => dir = Some(d.to_owned()),
            Some(prev) if prev != d => bail!("Get returned {d}, earlier {prev}"),
            Some(_) => {}
        }
        if i >= warmup {
            get.push((t1 - t0).as_secs_f64());
            put.push((t2 - t1).as_secs_f64());
            pair.push((t2 - t0).as_secs_f64());
        }
    }
    // Sanity check outside the timed loop: the merged view shows the first and last layer.
    let v = c.call("GraphDriver.Get", &json!({"ID": rw}))?;
    let d = PathBuf::from(v.get("Dir").and_then(Value::as_str).unwrap_or_default());
    let visible = [0, depth - 1]
        .iter()
        .all(|l| d.join(format!("layer-{l}.txt")).exists());
    c.call("GraphDriver.Put", &json!({"ID": rw}))?;
    if !visible {
        bail!(
            "merged view {} lacks the files of layers 0 and {}",
            d.display(),
            depth - 1
        );
    }

    if !keep {
        c.call("GraphDriver.Remove", &json!({"ID": rw}))?;
        for id in ids.iter().rev() {
            c.call("GraphDriver.Remove", &json!({"ID": id}))?;
        }
    }
    let (g50, g99, gmax) = micros(get);
    let (p50, p99, pmax) = micros(put);
    let (a50, a99, amax) = micros(pair);
    let (b50, b99, _) = micros(build);
    println!(
        "depth={depth} iters={iters} get_p50_us={g50:.1} get_p99_us={g99:.1} get_max_us={gmax:.1} \
         put_p50_us={p50:.1} put_p99_us={p99:.1} put_max_us={pmax:.1} pair_p50_us={a50:.1} \
         pair_p99_us={a99:.1} pair_max_us={amax:.1} layer_build_p50_us={b50:.1} layer_build_p99_us={b99:.1} \
         connects={}",
        c.connects
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// overlay-floor

fn cmd_overlay_floor(dir: &Path, depth: usize, iters: usize, warmup: usize) -> Result<()> {
    use lamina_sys::mount::{mount_overlay, unmount, OverlaySpec};
    if depth == 0 {
        bail!("--depth must be at least 1");
    }
    let base = dir.join(format!("floor-{depth}-{}", std::process::id()));
    let mut lowers = Vec::with_capacity(depth);
    for i in 0..depth {
        let l = base.join(format!("l{i}"));
        std::fs::create_dir_all(&l)?;
        std::fs::write(l.join(format!("layer-{i}.txt")), format!("layer {i}\n"))?;
        lowers.push(l);
    }
    // Top-most lower first, as lamina orders them.
    lowers.reverse();
    for d in ["upper", "work", "merged"] {
        std::fs::create_dir_all(base.join(d))?;
    }
    let merged = base.join("merged");
    let mut line = format!("depth={depth} iters={iters}");
    // A read-only overlay needs at least two lower dirs.
    let variants: &[(&str, bool)] = if depth >= 2 {
        &[("rw", true), ("ro", false)]
    } else {
        &[("rw", true)]
    };
    for &(name, rw) in variants {
        let spec = OverlaySpec {
            lowers: lowers.clone(),
            upper: rw.then(|| base.join("upper")),
            work: rw.then(|| base.join("work")),
            label: None,
            read_only: !rw,
        };
        let (mut m, mut u, mut pair) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..warmup + iters {
            let t0 = Instant::now();
            mount_overlay(&merged, &spec).with_context(|| format!("mounting {}", merged.display()))?;
            let t1 = Instant::now();
            unmount(&merged, true).with_context(|| format!("unmounting {}", merged.display()))?;
            let t2 = Instant::now();
            if i >= warmup {
                m.push((t1 - t0).as_secs_f64());
                u.push((t2 - t1).as_secs_f64());
                pair.push((t2 - t0).as_secs_f64());
            }
        }
        let (m50, m99, _) = micros(m);
        let (u50, u99, _) = micros(u);
        let (p50, p99, _) = micros(pair);
        let _ = write!(
            line,
            " {name}_mount_p50_us={m50:.1} {name}_mount_p99_us={m99:.1} {name}_umount_p50_us={u50:.1} \
             {name}_umount_p99_us={u99:.1} {name}_pair_p50_us={p50:.1} {name}_pair_p99_us={p99:.1}"
        );
    }
    std::fs::remove_dir_all(&base)?;
    println!("{line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// report

type Row = BTreeMap<String, String>;

fn parse_results(path: &Path) -> Result<Vec<(String, Row)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap_or_default().to_owned();
        let row = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        out.push((kind, row));
    }
    Ok(out)
}

fn num(row: &Row, key: &str) -> Option<f64> {
    row.get(key)?.parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn column(rows: &[(String, Row)], kind: &str, key: &str) -> Vec<f64> {
    rows.iter()
        .filter(|(k, _)| k == kind)
        .filter_map(|(_, r)| num(r, key))
        .collect()
}

fn first<'a>(rows: &'a [(String, Row)], kind: &str) -> Option<&'a Row> {
    rows.iter().find(|(k, _)| k == kind).map(|(_, r)| r)
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem = proc_meminfo_gib()
        .map(|g| format!("{g:.1} GiB RAM"))
        .unwrap_or_default();
    format!("{cpus} vCPU {model}, {mem}, kernel {}", kernel.trim())
}

fn proc_meminfo_gib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0 / 1024.0)
}

fn cmd_report(results: &Path, fs: &str) -> Result<()> {
    let rows = parse_results(results)?;
    let mut t = String::new();
    let _ = writeln!(t, "\n=== lamina benchmark ===");
    let _ = writeln!(t, "machine: {}", machine());
    if !fs.is_empty() {
        let _ = writeln!(t, "fs:      {fs}");
    }
    let loads: Vec<String> = rows
        .iter()
        .filter(|(k, _)| k == "load")
        .filter_map(|(_, r)| r.get("avg1").cloned())
        .collect();
    if !loads.is_empty() {
        let busy = loads.iter().any(|l| l.parse::<f64>().unwrap_or(0.0) > 0.5);
        let _ = writeln!(
            t,
            "load:    1-min load average at start / end: {}{}",
            loads.join(" / "),
            if busy {
                "  (WARNING: other work was running; figures are pessimistic)"
            } else {
                ""
            }
        );
    }
    if let Some(r) = first(&rows, "reftar") {
        let mb = num(r, "tar_bytes").unwrap_or(0.0) / 1e6;
        let _ = writeln!(
            t,
            "ref tar: {mb:.1} MB, {} entries ({} files, {} dirs), payload {:.1} MB, median file {} B",
            r.get("entries").map_or("?", String::as_str),
            r.get("files").map_or("?", String::as_str),
            r.get("dirs").map_or("?", String::as_str),
            num(r, "payload_bytes").unwrap_or(0.0) / 1e6,
            r.get("median_small").map_or("?", String::as_str),
        );
    }

    let reftar = first(&rows, "reftar");
    let entries = reftar.and_then(|r| num(r, "entries")).unwrap_or(f64::NAN);
    let bytes = reftar.and_then(|r| num(r, "tar_bytes")).unwrap_or(f64::NAN);
    let gnu_x = column(&rows, "gnutar", "extract_s");
    let gnu = column(&rows, "gnutar", "total_s");
    let lam = column(&rows, "lamina", "total_s");
    if !gnu.is_empty() || !lam.is_empty() {
        let _ = writeln!(
            t,
            "\nApplyDiff throughput, reference tar, medians of {} / {} runs",
            gnu.len(),
            lam.len()
        );
        let _ = writeln!(
            t,
            "  {:<40} {:>8} {:>8} {:>10} {:>7}  runs (s)",
            "", "s", "MB/s", "files/s", "CPU s"
        );
        let mut line = |name: &str, v: &[f64], cpu: &[f64]| {
            let m = median(v.to_vec());
            let runs: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
            let cpu = if cpu.is_empty() {
                "".to_owned()
            } else {
                format!("{:.2}", median(cpu.to_vec()))
            };
            let _ = writeln!(
                t,
                "  {name:<40} {m:>8.3} {:>8.1} {:>10.0} {cpu:>7}  {}",
                bytes / 1e6 / m,
                entries / m,
                runs.join(" ")
            );
        };
        let gnu_cpu = column(&rows, "gnutar", "cpu_s");
        if !gnu_x.is_empty() {
            line("GNU tar -xf (no sync)", &gnu_x, &gnu_cpu);
        }
        if !gnu.is_empty() {
            line("GNU tar -xf + sync -f", &gnu, &[]);
        }
        if !lam.is_empty() {
            line(
                "lamina Create+ApplyDiff (incl. syncfs)",
                &lam,
                &column(&rows, "lamina", "server_cpu_s"),
            );
            let client = column(&rows, "lamina", "client_cpu_s");
            if !client.is_empty() {
                let _ = writeln!(
                    t,
                    "  (bench client CPU, reading + sending the tar: {:.2} s)",
                    median(client)
                );
            }
        }
        if let (Some(r), Some(payload)) = (
            first(&rows, "lamina"),
            reftar.and_then(|r| num(r, "payload_bytes")),
        ) {
            let size = num(r, "size").unwrap_or(f64::NAN);
            let _ = writeln!(
                t,
                "  ApplyDiff Size reply: {size:.0} B (regular-file bytes in the tar: {payload:.0} B)"
            );
        }
        if !gnu.is_empty() && !lam.is_empty() {
            let _ = writeln!(
                t,
                "  ratio lamina / (GNU tar + sync): {:.2}x   (goal <= 1.10x)",
                median(lam.clone()) / median(gnu.clone())
            );
        }
    }

    let gp: Vec<&Row> = rows
        .iter()
        .filter(|(k, _)| k == "getput")
        .map(|(_, r)| r)
        .collect();
    if !gp.is_empty() {
        let iters = gp[0].get("iters").map_or("?", String::as_str);
        let _ = writeln!(
            t,
            "\nGet+Put of a RW layer, RPC included, {iters} pairs, microseconds (p50 / p99)"
        );
        let _ = writeln!(
            t,
            "  {:>6} {:>18} {:>18} {:>18} {:>22}",
            "depth", "Get", "Put", "Get+Put", "layer Create+Apply p50"
        );
        for r in gp {
            let f = |a: &str, b: &str| {
                format!(
                    "{:.0} / {:.0}",
                    num(r, a).unwrap_or(f64::NAN),
                    num(r, b).unwrap_or(f64::NAN)
                )
            };
            let _ = writeln!(
                t,
                "  {:>6} {:>18} {:>18} {:>18} {:>22.0}",
                r.get("depth").map_or("?", String::as_str),
                f("get_p50_us", "get_p99_us"),
                f("put_p50_us", "put_p99_us"),
                f("pair_p50_us", "pair_p99_us"),
                num(r, "layer_build_p50_us").unwrap_or(f64::NAN)
            );
        }
        let floor: Vec<&Row> = rows
            .iter()
            .filter(|(k, _)| k == "floor")
            .map(|(_, r)| r)
            .collect();
        if !floor.is_empty() {
            let _ = writeln!(
                t,
                "  kernel floor, same fs, lamina-sys mount + detached umount, no daemon (p50 / p99):"
            );
            let _ = writeln!(
                t,
                "  {:>6} {:>18} {:>18} {:>18} {:>22}",
                "depth", "mount (upper)", "umount (upper)", "pair (upper)", "pair (read-only)"
            );
            for r in floor {
                let f = |a: &str, b: &str| match (num(r, a), num(r, b)) {
                    (Some(x), Some(y)) => format!("{x:.0} / {y:.0}"),
                    _ => "n/a".to_owned(),
                };
                let _ = writeln!(
                    t,
                    "  {:>6} {:>18} {:>18} {:>18} {:>22}",
                    r.get("depth").map_or("?", String::as_str),
                    f("rw_mount_p50_us", "rw_mount_p99_us"),
                    f("rw_umount_p50_us", "rw_umount_p99_us"),
                    f("rw_pair_p50_us", "rw_pair_p99_us"),
                    f("ro_pair_p50_us", "ro_pair_p99_us"),
                );
            }
        }
        let _ = writeln!(
            t,
            "  anchor (performance.md): overlay mount+umount 270 us (p99 590) at 1 layer, tiny lowers; \
             goal Get p50 <= 300 us (<= 10 layers), <= 700 us (128), p99 <= 2 ms"
        );
    }

    let rss: Vec<&Row> = rows.iter().filter(|(k, _)| k == "rss").map(|(_, r)| r).collect();
    if !rss.is_empty() {
        let _ = writeln!(
            t,
            "\nlamina RSS during one ApplyDiff (fresh daemon; VmRSS sampled every 20 ms)"
        );
        let _ = writeln!(
            t,
            "  {:>10} {:>9} {:>7} {:>12} {:>12} {:>14} {:>12} {:>9}",
            "tar MB", "apply s", "CPU s", "RSS before", "RSS peak", "RssAnon peak", "VmHWM", "samples"
        );
        for r in rss {
            let mib = |k: &str| format!("{:.1} MiB", num(r, k).unwrap_or(f64::NAN) / 1024.0);
            let _ = writeln!(
                t,
                "  {:>10.0} {:>9.2} {:>7.2} {:>12} {:>12} {:>14} {:>12} {:>9}",
                num(r, "tar_bytes").unwrap_or(f64::NAN) / 1e6,
                num(r, "total_s").unwrap_or(f64::NAN),
                num(r, "server_cpu_s").unwrap_or(f64::NAN),
                mib("rss_before_kib"),
                mib("rss_peak_kib"),
                mib("anon_peak_kib"),
                mib("hwm_kib"),
                r.get("samples").map_or("?", String::as_str)
            );
        }
    }
    print!("{t}");
    Ok(())
}
