//! Prometheus metrics: per-call counters and latency histograms kept in atomics, store gauges read at
//! scrape time, and the `/metrics` endpoint (on the [`lamina_http`] server) answering in the text
//! exposition format 0.0.4.
//!
//! Calls are counted where the protocol crates dispatch them: the plugin router and the snapshotter
//! service report each call (its name, result and duration) to the observer [`plugin_observer`] and
//! [`snapshotter_observer`] give them. With no `metrics_address` no observer is installed and nothing is
//! timed or counted. Gauges cost one read of the metadata database and of the mount table per scrape;
//! no file under `layers/` is read.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use lamina_http::{Body, Handler, Refusal, RequestHead, Response};
use lamina_store::Store;
use tracing::{debug, info};

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

/// The `(protocol, op)` labels of every counted call, in exposition order.
fn call_labels() -> Vec<(&'static str, &'static str)> {
    let plugin = |prefix: &'static str, protocol: &'static str| {
        lamina_docker::OBSERVED_CALLS
            .iter()
            .filter_map(move |c| c.strip_prefix(prefix).map(|op| (protocol, op)))
    };
    plugin("GraphDriver.", "graphdriver")
        .chain(
            lamina_snapshotter::OBSERVED_CALLS
                .iter()
                .map(|op| ("snapshotter", *op)),
        )
        .chain(plugin("VolumeDriver.", "volume"))
        .collect()
}

/// Upper bounds of the latency buckets, in seconds (`+Inf` is implied).
/// Fine below 2 ms, where most calls answer (a p50 read from the buckets is interpolated inside one).
pub const LATENCY_BUCKETS: [f64; 25] = [
    0.00005, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of the ApplyDiff throughput buckets, in bytes per second.
pub const THROUGHPUT_BUCKETS: [f64; 10] = [1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9];

/// Bucket counters of a [`Histogram`]: enough for the most bounds of any (the latency ones) and `+Inf`.
const SLOTS: usize = LATENCY_BUCKETS.len() + 1;
const _: () = assert!(THROUGHPUT_BUCKETS.len() < SLOTS);

/// A histogram with fixed buckets (counts per bucket, not cumulative; summed at exposition).
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    /// `N` buckets and the `+Inf` one (the rest unused).
    counts: [AtomicU64; SLOTS],
    /// Sum of the recorded values times `scale` (an integer, so that it can be an atomic).
    sum_scaled: AtomicU64,
    scale: f64,
}

impl<const N: usize> Histogram<N> {
    /// `scale`: 1e6 keeps microseconds of a value in seconds; 1 keeps whole units.
    const fn new(bounds: &'static [f64; N], scale: f64) -> Self {
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; SLOTS],
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

/// The counters and latencies of one call.
#[derive(Debug)]
struct CallStats {
    protocol: &'static str,
    op: &'static str,
    ok: AtomicU64,
    error: AtomicU64,
    latency: Histogram<25>,
}

/// Every metric lamina keeps in memory.
#[derive(Debug)]
pub struct Registry {
    enabled: AtomicBool,
    calls: OnceLock<Vec<CallStats>>,
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
    calls: OnceLock::new(),
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

impl Registry {
    fn calls(&self) -> &[CallStats] {
        self.calls.get_or_init(|| {
            call_labels()
                .into_iter()
                .map(|(protocol, op)| CallStats {
                    protocol,
                    op,
                    ok: AtomicU64::new(0),
                    error: AtomicU64::new(0),
                    latency: Histogram::new(&LATENCY_BUCKETS, 1e6),
                })
                .collect()
        })
    }

    /// Counts one call of `op` of `protocol`.
    fn record(&self, protocol: &str, op: &str, ok: bool, elapsed: Duration) {
        let Some(s) = self.calls().iter().find(|s| s.op == op && s.protocol == protocol) else {
            return;
        };
        if ok { &s.ok } else { &s.error }.fetch_add(1, Ordering::Relaxed);
        s.latency.record(elapsed.as_secs_f64());
    }
}

/// Whether metrics are collected (a `metrics_address` is set).
pub fn enabled() -> bool {
    METRICS.enabled.load(Ordering::Relaxed)
}

/// The plugin router's observer: `GraphDriver.X` counts as `graphdriver`/`X`, `VolumeDriver.X` as
/// `volume`/`X`. `None` when metrics are off.
pub fn plugin_observer() -> Option<lamina_docker::Observer> {
    enabled().then(|| {
        Arc::new(|call: &'static str, ok: bool, elapsed: Duration| {
            let (protocol, op) = match call.split_once('.') {
                Some(("GraphDriver", op)) => ("graphdriver", op),
                Some(("VolumeDriver", op)) => ("volume", op),
                _ => return,
            };
            METRICS.record(protocol, op, ok, elapsed);
        }) as lamina_docker::Observer
    })
}

/// The snapshotter service's observer. `None` when metrics are off.
pub fn snapshotter_observer() -> Option<lamina_snapshotter::Observer> {
    enabled().then(|| {
        Arc::new(|rpc: &'static str, ok: bool, elapsed: Duration| {
            METRICS.record("snapshotter", rpc, ok, elapsed);
        }) as lamina_snapshotter::Observer
    })
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

/// The exposition being written: `# HELP`/`# TYPE` lines and samples.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One sample; `labels` is `k="v",...` or empty.
    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    /// A family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The whole exposition (text format 0.0.4); `store` gives the gauges.
pub fn render(store: &Store, started: SystemTime) -> String {
    METRICS.scrapes.fetch_add(1, Ordering::Relaxed);
    let mut out = Exposition(String::with_capacity(64 * 1024));
    render_calls(&mut out);
    render_transfers(&mut out);
    render_verify(&mut out);
    render_store(&mut out, store);
    render_process(&mut out, started);
    out.0
}

/// Calls by protocol, operation and result, and their latencies.
fn render_calls(out: &mut Exposition) {
    let m = &METRICS;
    out.family(
        "lamina_requests_total",
        "counter",
        "Protocol calls handled, by protocol, operation and result.",
    );
    for s in m.calls() {
        for (result, c) in [("ok", &s.ok), ("error", &s.error)] {
            let labels = format!("protocol=\"{}\",op=\"{}\",result=\"{result}\"", s.protocol, s.op);
            out.sample("lamina_requests_total", &labels, load(c));
        }
    }
    out.family(
        "lamina_request_duration_seconds",
        "histogram",
        "Latency of protocol calls (Diff: until the last byte of the stream was written).",
    );
    for s in m.calls() {
        // Unused operations would add 21 lines each; Get and Put of the graph driver always show.
        let always = s.protocol == "graphdriver" && matches!(s.op, "Get" | "Put");
        if s.latency.count() == 0 && !always {
            continue;
        }
        s.latency.expose(
            &mut out.0,
            "lamina_request_duration_seconds",
            &format!("protocol=\"{}\",op=\"{}\",", s.protocol, s.op),
        );
    }
}

/// Tar bytes applied and diffed.
fn render_transfers(out: &mut Exposition) {
    let m = &METRICS;
    out.single(
        "lamina_apply_bytes_total",
        "counter",
        "Tar bytes received and applied by ApplyDiff (successful calls) since start.",
        load(&m.apply_bytes),
    );
    out.family(
        "lamina_apply_throughput_bytes_per_second",
        "histogram",
        "Throughput of each successful ApplyDiff (tar bytes / call duration).",
    );
    m.apply_throughput
        .expose(&mut out.0, "lamina_apply_throughput_bytes_per_second", "");
    out.single(
        "lamina_diff_bytes_total",
        "counter",
        "Tar bytes streamed by Diff since start.",
        load(&m.diff_bytes),
    );
}

/// verify_on_mount checks.
fn render_verify(out: &mut Exposition) {
    let m = &METRICS;
    out.family(
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
        out.sample(
            "lamina_verify_on_mount_total",
            &format!("result=\"{r}\""),
            load(c),
        );
    }
    out.single(
        "lamina_verify_on_mount_bytes_total",
        "counter",
        "Content bytes read by verify_on_mount.",
        load(&m.verify_bytes),
    );
    out.single(
        "lamina_verify_on_mount_seconds_total",
        "counter",
        "Time spent by verify_on_mount.",
        load(&m.verify_nanos) as f64 / 1e9,
    );
}

/// Store gauges (read now) and the store's persistent counters.
fn render_store(out: &mut Exposition, store: &Store) {
    let up = render_store_gauges(out, store);
    render_store_counters(out, store);
    out.single(
        "lamina_store_up",
        "gauge",
        "1 when the store answered the gauge queries of this scrape.",
        u8::from(up),
    );
}

/// Layers, bytes and mounts, as `lamina status` shows them. `false` when the store did not answer.
fn render_store_gauges(out: &mut Exposition, store: &Store) -> bool {
    match store.overview() {
        Ok(layers) => {
            let bytes: u64 = layers.iter().filter_map(|l| l.record.size).sum();
            let mounts: u64 = layers.iter().map(|l| u64::from(l.mounts)).sum();
            let mounted = layers.iter().filter(|l| l.mounted || l.mounts > 0).count();
            let mut per_ns = std::collections::BTreeMap::<&str, u64>::new();
            for l in &layers {
                *per_ns.entry(l.record.ns.as_str()).or_default() += 1;
            }
            out.single(
                "lamina_store_layers",
                "gauge",
                "Layers in the store.",
                layers.len(),
            );
            out.family(
                "lamina_store_namespace_layers",
                "gauge",
                "Layers in the store, by engine namespace.",
            );
            for (ns, n) in per_ns {
                out.sample(
                    "lamina_store_namespace_layers",
                    &format!("namespace=\"{}\"", escape(ns)),
                    n,
                );
            }
            out.single(
                "lamina_store_bytes",
                "gauge",
                "Bytes of layer content as recorded at apply/commit (what `lamina status` calls bytes).",
                bytes,
            );
            out.single(
                "lamina_store_mounts",
                "gauge",
                "Mount references held now (sum over layers).",
                mounts,
            );
            out.single(
                "lamina_store_mounted_layers",
                "gauge",
                "Layers mounted now (referenced, or a mount of a previous run present).",
                mounted,
            );
            true
        }
        Err(e) => {
            debug!(error = %e, "metrics: store overview failed");
            false
        }
    }
}

/// The store's operation and garbage collection counters (kept across restarts).
fn render_store_counters(out: &mut Exposition, store: &Store) {
    let counters = store.counters();
    out.family(
        "lamina_store_operations_total",
        "counter",
        "The store's own operation counters (kept across restarts; `lamina status` counters).",
    );
    for (k, v) in counters.iter().filter(|(k, _)| !k.starts_with("gc_")) {
        out.sample("lamina_store_operations_total", &format!("counter=\"{k}\""), v);
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
        out.single(name, "counter", help, counters.get(key).copied().unwrap_or(0));
    }
}

/// The process: start time, version, scrapes.
fn render_process(out: &mut Exposition, started: SystemTime) {
    let start = started
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    out.single(
        "lamina_start_time_seconds",
        "gauge",
        "Start time of this lamina process (Unix time).",
        start,
    );
    out.family("lamina_build_info", "gauge", "Version of this lamina binary.");
    out.sample(
        "lamina_build_info",
        &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        1,
    );
    out.single(
        "lamina_metrics_scrapes_total",
        "counter",
        "Scrapes of this endpoint, this one included.",
        load(&METRICS.scrapes),
    );
}

/// Content type of the exposition.
const EXPOSITION_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// The `/metrics` handler: HTTP/1.0 answers, one request per connection.
struct Scrapes {
    store: Arc<Store>,
    started: SystemTime,
}

impl Handler for Scrapes {
    fn handle<'h>(&'h self, head: &RequestHead, _body: &mut Body<'_>) -> Response<'h> {
        let resp = match (head.method.as_str(), head.path()) {
            ("GET" | "HEAD", "/metrics") => Response::full(
                200,
                Some(EXPOSITION_TYPE),
                render(&self.store, self.started).into_bytes(),
            ),
            ("GET" | "HEAD", _) => {
                Response::full(404, Some(PLAIN), b"lamina serves /metrics only\n".to_vec())
            }
            _ => Response::full(405, Some(PLAIN), b"use GET\n".to_vec()),
        };
        resp.http10()
    }

    fn refuse(&self, refusal: &Refusal) -> Response<'static> {
        Response::full(
            refusal.status,
            Some(PLAIN),
            format!("{}\n", refusal.message).into_bytes(),
        )
        .http10()
    }
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
            Listener::Tcp(TcpListener::bind(a).with_context(|| format!("binding the metrics address {a}"))?)
        }
        MetricsAddress::Unix(p) => Listener::Unix(
            lamina_http::bind_socket_with_mode(p, 0o600)
                .with_context(|| format!("binding the metrics socket {}", p.display()))?,
        ),
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
        info!(address = %self.local_address(), "serving Prometheus metrics at /metrics");
        let handler = Arc::new(Scrapes {
            store,
            started: SystemTime::now(),
        });
        crate::serve::spawn_http_thread("metrics", stop, move |shutdown, cfg| {
            let served = match self.listener {
                Listener::Tcp(l) => lamina_http::serve_with_config(l, handler, shutdown, cfg),
                Listener::Unix(l) => lamina_http::serve_with_config(l, handler, shutdown, cfg),
            };
            if let MetricsAddress::Unix(p) = &self.address {
                let _ = std::fs::remove_file(p);
            }
            served
        })
    }
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
        static H: Histogram<25> = Histogram::new(&LATENCY_BUCKETS, 1e6);
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
    fn every_call_has_distinct_labels() {
        let mut seen = std::collections::HashSet::new();
        for (protocol, op) in call_labels() {
            assert!(seen.insert((protocol, op)), "{protocol} {op}");
        }
        assert_eq!(seen.len(), 29);
        assert!(seen.contains(&("graphdriver", "ApplyDiff")));
        assert!(seen.contains(&("snapshotter", "Prepare")));
        assert!(seen.contains(&("volume", "Mount")));
    }
}
