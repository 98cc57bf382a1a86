//! Prometheus metrics: per-operation counters and latency histograms kept in atomics, store gauges read at
//! scrape time, and a small HTTP/1.0 server answering `GET /metrics` in the text exposition format 0.0.4.
//!
//! Operations are counted at the adapter seam (crates/lamina/src/adapters/): every protocol call goes through
//! [`observe`]. With no `metrics_address` the registry stays disabled and [`observe`] only runs the call (no
//! clock read, no atomic). Gauges cost one read of the metadata database and of the mount table per scrape;
//! no file under `layers/` is read.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use lamina_store::Store;
use tracing::{debug, info, warn};

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddress {
    /// `HOST:PORT` (TCP).
    Tcp(String),
    /// `unix:/path` (mode 0600).
    Unix(PathBuf),
}

impl MetricsAddress {
    /// Parses `HOST:PORT`, `[V6]:PORT` or `unix:/absolute/path`.
    pub fn parse(s: &str) -> anyhow::Result<MetricsAddress> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                bail!("metrics address {s:?}: the socket path must be absolute");
            }
            return Ok(MetricsAddress::Unix(p));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(MetricsAddress::Tcp(s.to_string()))
            }
            _ => bail!("metrics address {s:?}: expected HOST:PORT (e.g. 127.0.0.1:9323) or unix:/PATH"),
        }
    }
}

impl std::fmt::Display for MetricsAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddress::Tcp(a) => f.write_str(a),
            MetricsAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// An operation counted by [`observe`]: its protocol and its name on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
#[allow(missing_docs)]
pub enum Op {
    GdInit,
    GdCreate,
    GdCreateReadWrite,
    GdRemove,
    GdGet,
    GdPut,
    GdGetMetadata,
    GdCleanup,
    GdDiff,
    GdChanges,
    GdApplyDiff,
    GdDiffSize,
    SnPrepare,
    SnView,
    SnMounts,
    SnCommit,
    SnRemove,
    SnStat,
    SnUpdate,
    SnList,
    SnUsage,
    SnCleanup,
    VolCreate,
    VolRemove,
    VolMount,
    VolUnmount,
    VolPath,
    VolGet,
    VolList,
}

const OPS: usize = 29;

impl Op {
    const ALL: [Op; OPS] = [
        Op::GdInit,
        Op::GdCreate,
        Op::GdCreateReadWrite,
        Op::GdRemove,
        Op::GdGet,
        Op::GdPut,
        Op::GdGetMetadata,
        Op::GdCleanup,
        Op::GdDiff,
        Op::GdChanges,
        Op::GdApplyDiff,
        Op::GdDiffSize,
        Op::SnPrepare,
        Op::SnView,
        Op::SnMounts,
        Op::SnCommit,
        Op::SnRemove,
        Op::SnStat,
        Op::SnUpdate,
        Op::SnList,
        Op::SnUsage,
        Op::SnCleanup,
        Op::VolCreate,
        Op::VolRemove,
        Op::VolMount,
        Op::VolUnmount,
        Op::VolPath,
        Op::VolGet,
        Op::VolList,
    ];

    /// `(protocol, op)` label values.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Op::GdInit => ("graphdriver", "Init"),
            Op::GdCreate => ("graphdriver", "Create"),
            Op::GdCreateReadWrite => ("graphdriver", "CreateReadWrite"),
            Op::GdRemove => ("graphdriver", "Remove"),
            Op::GdGet => ("graphdriver", "Get"),
            Op::GdPut => ("graphdriver", "Put"),
            Op::GdGetMetadata => ("graphdriver", "GetMetadata"),
            Op::GdCleanup => ("graphdriver", "Cleanup"),
            Op::GdDiff => ("graphdriver", "Diff"),
            Op::GdChanges => ("graphdriver", "Changes"),
            Op::GdApplyDiff => ("graphdriver", "ApplyDiff"),
            Op::GdDiffSize => ("graphdriver", "DiffSize"),
            Op::SnPrepare => ("snapshotter", "Prepare"),
            Op::SnView => ("snapshotter", "View"),
            Op::SnMounts => ("snapshotter", "Mounts"),
            Op::SnCommit => ("snapshotter", "Commit"),
            Op::SnRemove => ("snapshotter", "Remove"),
            Op::SnStat => ("snapshotter", "Stat"),
            Op::SnUpdate => ("snapshotter", "Update"),
            Op::SnList => ("snapshotter", "List"),
            Op::SnUsage => ("snapshotter", "Usage"),
            Op::SnCleanup => ("snapshotter", "Cleanup"),
            Op::VolCreate => ("volume", "Create"),
            Op::VolRemove => ("volume", "Remove"),
            Op::VolMount => ("volume", "Mount"),
            Op::VolUnmount => ("volume", "Unmount"),
            Op::VolPath => ("volume", "Path"),
            Op::VolGet => ("volume", "Get"),
            Op::VolList => ("volume", "List"),
        }
    }
}

/// Upper bounds of the latency buckets, in seconds (`+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// Upper bounds of the ApplyDiff throughput buckets, in bytes per second.
pub const THROUGHPUT_BUCKETS: [f64; 10] = [1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9];

/// A histogram with fixed buckets (counts per bucket, not cumulative; summed at exposition).
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    /// `N` buckets and the `+Inf` one.
    counts: [AtomicU64; 19],
    /// Sum of the recorded values times `scale` (an integer, so that it can be an atomic).
    sum_scaled: AtomicU64,
    scale: f64,
}

impl<const N: usize> Histogram<N> {
    /// `scale`: 1e6 keeps microseconds of a value in seconds; 1 keeps whole units.
    const fn new(bounds: &'static [f64; N], scale: f64) -> Self {
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; 19],
            sum_scaled: AtomicU64::new(0),
            scale,
        }
    }

    fn record(&self, v: f64) {
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(N);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_scaled
            .fetch_add((v * self.scale).max(0.0) as u64, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.counts[..=N].iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Writes `_bucket`, `_sum` and `_count` lines; `labels` is `k="v",` or empty.
    fn expose(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[N].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_scaled.load(Ordering::Relaxed) as f64 / self.scale;
        let trimmed = labels.trim_end_matches(',');
        let braced = if trimmed.is_empty() {
            String::new()
        } else {
            format!("{{{trimmed}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
    }
}

#[derive(Debug)]
struct OpStats {
    ok: AtomicU64,
    error: AtomicU64,
    latency: Histogram<18>,
}

impl OpStats {
    const fn new() -> Self {
        OpStats {
            ok: AtomicU64::new(0),
            error: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BUCKETS, 1e6),
        }
    }
}

/// Every metric lamina keeps in memory.
#[derive(Debug)]
pub struct Registry {
    enabled: AtomicBool,
    ops: [OpStats; OPS],
    apply_bytes: AtomicU64,
    apply_throughput: Histogram<10>,
    diff_bytes: AtomicU64,
    verify_clean: AtomicU64,
    verify_mismatch: AtomicU64,
    verify_skipped: AtomicU64,
    verify_error: AtomicU64,
    verify_bytes: AtomicU64,
    verify_nanos: AtomicU64,
    scrapes: AtomicU64,
}

/// The process's registry.
pub static METRICS: Registry = Registry {
    enabled: AtomicBool::new(false),
    ops: [const { OpStats::new() }; OPS],
    apply_bytes: AtomicU64::new(0),
    apply_throughput: Histogram::new(&THROUGHPUT_BUCKETS, 1.0),
    diff_bytes: AtomicU64::new(0),
    verify_clean: AtomicU64::new(0),
    verify_mismatch: AtomicU64::new(0),
    verify_skipped: AtomicU64::new(0),
    verify_error: AtomicU64::new(0),
    verify_bytes: AtomicU64::new(0),
    verify_nanos: AtomicU64::new(0),
    scrapes: AtomicU64::new(0),
};

/// Whether metrics are collected (a `metrics_address` is set).
pub fn enabled() -> bool {
    METRICS.enabled.load(Ordering::Relaxed)
}

/// A started operation; [`Timer::finish`] records it. `None` inside when metrics are off.
#[derive(Debug)]
pub struct Timer(Option<(Op, Instant)>);

impl Timer {
    /// Starts timing `op` (no clock read when metrics are off).
    pub fn start(op: Op) -> Timer {
        Timer(enabled().then(|| (op, Instant::now())))
    }

    /// Records the operation's result and latency; returns the elapsed time (zero when off).
    pub fn finish(self, ok: bool) -> Duration {
        let Some((op, t0)) = self.0 else {
            return Duration::ZERO;
        };
        let elapsed = t0.elapsed();
        let s = &METRICS.ops[op as usize];
        if ok { &s.ok } else { &s.error }.fetch_add(1, Ordering::Relaxed);
        s.latency.record(elapsed.as_secs_f64());
        elapsed
    }
}

/// Runs `f` as operation `op`, counting its result and latency.
pub fn observe<T, E>(op: Op, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let t = Timer::start(op);
    let r = f();
    t.finish(r.is_ok());
    r
}

/// Counts `bytes` of tar applied by an ApplyDiff that took `elapsed`.
pub fn applied(bytes: u64, elapsed: Duration) {
    if !enabled() {
        return;
    }
    METRICS.apply_bytes.fetch_add(bytes, Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        METRICS.apply_throughput.record(bytes as f64 / secs);
    }
}

/// Counts `bytes` of tar sent by a Diff.
pub fn diffed(bytes: u64) {
    if enabled() {
        METRICS.diff_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Outcome of one verification before a first mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Content matched.
    Clean,
    /// Content differs; the mount was refused.
    Mismatch,
    /// Nothing to check (writable layer, no manifest).
    Skipped,
    /// The check itself failed.
    Error,
}

/// Counts a verification before a first mount.
pub fn verified(outcome: VerifyOutcome, bytes: u64, elapsed: Duration) {
    let c = match outcome {
        VerifyOutcome::Clean => &METRICS.verify_clean,
        VerifyOutcome::Mismatch => &METRICS.verify_mismatch,
        VerifyOutcome::Skipped => &METRICS.verify_skipped,
        VerifyOutcome::Error => &METRICS.verify_error,
    };
    c.fetch_add(1, Ordering::Relaxed);
    METRICS.verify_bytes.fetch_add(bytes, Ordering::Relaxed);
    METRICS
        .verify_nanos
        .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole exposition (text format 0.0.4); `store` gives the gauges.
pub fn render(store: &Store, started: SystemTime) -> String {
    let m = &METRICS;
    m.scrapes.fetch_add(1, Ordering::Relaxed);
    let mut out = String::with_capacity(64 * 1024);
    header(
        &mut out,
        "lamina_requests_total",
        "counter",
        "Protocol calls handled, by protocol, operation and result.",
    );
    for op in Op::ALL {
        let (proto, name) = op.labels();
        let s = &m.ops[op as usize];
        for (result, c) in [("ok", &s.ok), ("error", &s.error)] {
            let _ = writeln!(
                out,
                "lamina_requests_total{{protocol=\"{proto}\",op=\"{name}\",result=\"{result}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
    header(
        &mut out,
        "lamina_request_duration_seconds",
        "histogram",
        "Latency of protocol calls (Diff: until the last byte of the stream was written).",
    );
    for op in Op::ALL {
        let (proto, name) = op.labels();
        let s = &m.ops[op as usize];
        if s.latency.count() == 0 && !matches!(op, Op::GdGet | Op::GdPut) {
            // Unused operations would add 21 lines each; Get and Put always show.
            continue;
        }
        s.latency.expose(
            &mut out,
            "lamina_request_duration_seconds",
            &format!("protocol=\"{proto}\",op=\"{name}\","),
        );
    }
    header(
        &mut out,
        "lamina_apply_bytes_total",
        "counter",
        "Tar bytes received and applied by ApplyDiff (successful calls) since start.",
    );
    let _ = writeln!(
        out,
        "lamina_apply_bytes_total {}",
        m.apply_bytes.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "lamina_apply_throughput_bytes_per_second",
        "histogram",
        "Throughput of each successful ApplyDiff (tar bytes / call duration).",
    );
    m.apply_throughput
        .expose(&mut out, "lamina_apply_throughput_bytes_per_second", "");
    header(
        &mut out,
        "lamina_diff_bytes_total",
        "counter",
        "Tar bytes streamed by Diff since start.",
    );
    let _ = writeln!(
        out,
        "lamina_diff_bytes_total {}",
        m.diff_bytes.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "lamina_verify_on_mount_total",
        "counter",
        "Layers checked against their manifest before their first mount (verify_on_mount), by result.",
    );
    for (r, c) in [
        ("clean", &m.verify_clean),
        ("mismatch", &m.verify_mismatch),
        ("skipped", &m.verify_skipped),
        ("error", &m.verify_error),
    ] {
        let _ = writeln!(
            out,
            "lamina_verify_on_mount_total{{result=\"{r}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "lamina_verify_on_mount_bytes_total",
        "counter",
        "Content bytes read by verify_on_mount.",
    );
    let _ = writeln!(
        out,
        "lamina_verify_on_mount_bytes_total {}",
        m.verify_bytes.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "lamina_verify_on_mount_seconds_total",
        "counter",
        "Time spent by verify_on_mount.",
    );
    let _ = writeln!(
        out,
        "lamina_verify_on_mount_seconds_total {}",
        m.verify_nanos.load(Ordering::Relaxed) as f64 / 1e9
    );

    // Store gauges and persistent counters.
    let mut store_ok = 1;
    match store.overview() {
        Ok(layers) => {
            let bytes: u64 = layers.iter().filter_map(|l| l.record.size).sum();
            let mounts: u64 = layers.iter().map(|l| u64::from(l.mounts)).sum();
            let mounted = layers.iter().filter(|l| l.mounted || l.mounts > 0).count();
            let mut per_ns = std::collections::BTreeMap::<&str, u64>::new();
            for l in &layers {
                *per_ns.entry(l.record.ns.as_str()).or_default() += 1;
            }
            header(&mut out, "lamina_store_layers", "gauge", "Layers in the store.");
            let _ = writeln!(out, "lamina_store_layers {}", layers.len());
            header(
                &mut out,
                "lamina_store_namespace_layers",
                "gauge",
                "Layers in the store, by engine namespace.",
            );
            for (ns, n) in per_ns {
                let _ = writeln!(
                    out,
                    "lamina_store_namespace_layers{{namespace=\"{}\"}} {n}",
                    escape(ns)
                );
            }
            header(
                &mut out,
                "lamina_store_bytes",
                "gauge",
                "Bytes of layer content as recorded at apply/commit (what `lamina status` calls bytes).",
            );
            let _ = writeln!(out, "lamina_store_bytes {bytes}");
            header(
                &mut out,
                "lamina_store_mounts",
                "gauge",
                "Mount references held now (sum over layers).",
            );
            let _ = writeln!(out, "lamina_store_mounts {mounts}");
            header(
                &mut out,
                "lamina_store_mounted_layers",
                "gauge",
                "Layers mounted now (referenced, or a mount of a previous run present).",
            );
            let _ = writeln!(out, "lamina_store_mounted_layers {mounted}");
        }
        Err(e) => {
            store_ok = 0;
            debug!(error = %e, "metrics: store overview failed");
        }
    }
    let counters = store.counters();
    header(
        &mut out,
        "lamina_store_operations_total",
        "counter",
        "The store's own operation counters (kept across restarts; `lamina status` counters).",
    );
    for (k, v) in &counters {
        if k.starts_with("gc_") {
            continue;
        }
        let _ = writeln!(out, "lamina_store_operations_total{{counter=\"{k}\"}} {v}");
    }
    for (name, key, help) in [
        (
            "lamina_gc_runs_total",
            "gc_runs",
            "Garbage collections that removed something (kept across restarts).",
        ),
        (
            "lamina_gc_removed_total",
            "gc_removed",
            "Garbage items removed (kept across restarts).",
        ),
        (
            "lamina_gc_removed_bytes_total",
            "gc_bytes",
            "Bytes freed by garbage collection (kept across restarts).",
        ),
    ] {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", counters.get(key).copied().unwrap_or(0));
    }
    header(
        &mut out,
        "lamina_store_up",
        "gauge",
        "1 when the store answered the gauge queries of this scrape.",
    );
    let _ = writeln!(out, "lamina_store_up {store_ok}");
    header(
        &mut out,
        "lamina_start_time_seconds",
        "gauge",
        "Start time of this lamina process (Unix time).",
    );
    let start = started
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let _ = writeln!(out, "lamina_start_time_seconds {start}");
    header(
        &mut out,
        "lamina_build_info",
        "gauge",
        "Version of this lamina binary.",
    );
    let _ = writeln!(
        out,
        "lamina_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    header(
        &mut out,
        "lamina_metrics_scrapes_total",
        "counter",
        "Scrapes of this endpoint, this one included.",
    );
    let _ = writeln!(
        out,
        "lamina_metrics_scrapes_total {}",
        m.scrapes.load(Ordering::Relaxed)
    );
    out
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A bound metrics endpoint, not yet serving.
pub struct Endpoint {
    listener: Listener,
    address: MetricsAddress,
}

/// Binds the endpoint and turns collection on.
pub fn bind(address: &MetricsAddress) -> anyhow::Result<Endpoint> {
    let listener = match address {
        MetricsAddress::Tcp(a) => {
            let l = TcpListener::bind(a).with_context(|| format!("binding the metrics address {a}"))?;
            l.set_nonblocking(true)?;
            Listener::Tcp(l)
        }
        MetricsAddress::Unix(p) => {
            let l = lamina_docker::server::bind_socket_with_mode(p, 0o600)
                .with_context(|| format!("binding the metrics socket {}", p.display()))?;
            l.set_nonblocking(true)?;
            Listener::Unix(l)
        }
    };
    METRICS.enabled.store(true, Ordering::Relaxed);
    Ok(Endpoint {
        listener,
        address: address.clone(),
    })
}

impl Endpoint {
    /// The address a TCP endpoint actually got (for port 0), else the configured one.
    pub fn local_address(&self) -> String {
        match &self.listener {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| self.address.to_string()),
            Listener::Unix(_) => self.address.to_string(),
        }
    }

    /// Serves scrapes on a thread until `stop`; removes a unix socket at the end.
    pub fn spawn(self, store: Arc<Store>, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<()>> {
        let started = SystemTime::now();
        info!(address = %self.local_address(), "serving Prometheus metrics at /metrics");
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let accepted: std::io::Result<Box<dyn Conn>> = match &self.listener {
                        Listener::Tcp(l) => l.accept().map(|(c, _)| Box::new(c) as Box<dyn Conn>),
                        Listener::Unix(l) => l.accept().map(|(c, _)| Box::new(c) as Box<dyn Conn>),
                    };
                    match accepted {
                        Ok(mut c) => {
                            if let Err(e) = serve_one(c.as_mut(), &store, started) {
                                debug!(error = %e, "metrics request failed");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => {
                            warn!(error = %e, "metrics accept failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
                if let MetricsAddress::Unix(p) = &self.address {
                    let _ = std::fs::remove_file(p);
                }
            })
            .context("starting the metrics thread")
    }
}

trait Conn: Read + Write {
    fn prepare(&mut self) -> std::io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn prepare(&mut self) -> std::io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(Duration::from_secs(5)))?;
        self.set_write_timeout(Some(Duration::from_secs(10)))
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn prepare(&mut self) -> std::io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(Duration::from_secs(5)))?;
        self.set_write_timeout(Some(Duration::from_secs(10)))
    }
}

/// Answers one request (HTTP/1.0 style: one response, then close).
fn serve_one(conn: &mut dyn Conn, store: &Store, started: SystemTime) -> anyhow::Result<()> {
    conn.prepare()?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > 8192 {
            bail!("request head too large");
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the request head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(store, started),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "lamina serves /metrics only\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "use GET\n".to_string(),
        ),
    };
    let mut resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        resp.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&resp)?;
    conn.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            MetricsAddress::parse("127.0.0.1:9323").unwrap(),
            MetricsAddress::Tcp("127.0.0.1:9323".into())
        );
        assert_eq!(
            MetricsAddress::parse("unix:/run/lamina/metrics.sock").unwrap(),
            MetricsAddress::Unix("/run/lamina/metrics.sock".into())
        );
        assert!(MetricsAddress::parse("[::1]:9323").is_ok());
        for bad in ["9323", "localhost", "unix:rel.sock", ":9323", "h:port"] {
            assert!(MetricsAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn histogram_exposition_is_cumulative() {
        static H: Histogram<18> = Histogram::new(&LATENCY_BUCKETS, 1e6);
        H.record(0.00005);
        H.record(0.003);
        H.record(100.0);
        let mut out = String::new();
        H.expose(&mut out, "x", "op=\"Get\",");
        assert!(out.contains("x_bucket{op=\"Get\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{op=\"Get\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{op=\"Get\",le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{op=\"Get\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{op=\"Get\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{op=\"Get\"} 100.00305"), "{out}");
        let mut plain = String::new();
        H.expose(&mut plain, "y", "");
        assert!(plain.contains("y_bucket{le=\"+Inf\"} 3\n"), "{plain}");
        assert!(plain.contains("y_count 3\n"), "{plain}");
    }

    #[test]
    fn every_op_has_distinct_labels() {
        let mut seen = std::collections::HashSet::new();
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
            assert!(seen.insert(op.labels()));
        }
    }
}
