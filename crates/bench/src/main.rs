//! `lamina-bench`: lamina against the built-in alternatives (overlay2, containerd's overlayfs snapshotter,
//! GNU tar, bind mounts, bare mfsmount), measured in the same run on a fresh loop-backed filesystem.
//!
//! It starts the `lamina` binary next to its own (`cargo build --release -p lamina -p lamina-bench`), or the
//! one `LAMINA_BIN` names, and builds on the engines of `lamina-testkit`.
//!
//! The shape, shared by every workload module:
//! - The runner (`runner.rs`) parses the arguments, makes one fresh loop-backed filesystem per kind asked
//!   for (ext4, xfs), mounts it under a private directory and hands each workload a [`Ctx`].
//! - A workload is a [`Workload`]: a name, and a function that measures lamina **and** its baseline with the
//!   engines it starts itself (each with its own roots and sockets on the scratch filesystem, stopped by PID
//!   before it returns, also on error) and pushes [`Figure`]s.
//! - The report (`report.rs`) pairs each lamina figure with the baseline figure of the same workload, case,
//!   metric and filesystem, computes the ratio of medians, and writes `results.md`, `results.json` and SVG
//!   plots into `--out`.
//!
//! Timings are never asserted: `--quick` (CI) checks that every workload runs end to end.

mod engines;
mod graph;
mod loopfs;
mod report;
mod runner;
mod targen;
// bench-b's workloads and their engines.
mod cluster;
mod containerd;
mod docker;
mod docker_floor;
mod engines_ctr;
mod proxy_floor;
mod rbd;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use runner::{run, BenchArgs};

/// Command line of `lamina-bench`.
#[derive(Debug, Parser)]
#[command(
    name = "lamina-bench",
    version,
    about = "Benchmarks lamina against the built-in alternatives on fresh loop-backed filesystems (needs root)."
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> ExitCode {
    match run(Cli::parse().args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lamina-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Filesystem kinds a run can use for its scratch space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// A fresh ext4.
    Ext4,
    /// A fresh xfs (reflink=1, the mkfs default).
    Xfs,
}

/// What a workload gets from the runner.
// Part of the shape shared by the workload modules; not every workload reads every field.
#[allow(dead_code)]
#[derive(Debug)]
pub struct Ctx {
    /// The small version (CI): sizes and repetitions cut so the whole run takes under 2 minutes.
    pub quick: bool,
    /// Repetitions of each timed case (median reported).
    pub runs: usize,
    /// The filesystem kind of `scratch`.
    pub fs: FsKind,
    /// A directory on the fresh loop-backed filesystem, empty, for this workload alone (removed after it).
    pub scratch: PathBuf,
    /// The results directory (`--out`); workloads may leave raw logs under `out/raw/`.
    pub out: PathBuf,
    /// The `lamina` binary, for starting `lamina serve`.
    pub lamina_exe: PathBuf,
    /// Progress display: [`Ctx::say`] sets the current step.
    pub progress: Progress,
}

impl Ctx {
    /// Shows what the workload is doing now (a progress line; plain lines when stderr is not a terminal).
    pub fn say(&self, msg: impl AsRef<str>) {
        self.progress.say(msg.as_ref());
    }

    /// `quick` when the run is `--quick`, else `full`.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// The progress display of a run: an `indicatif` spinner on a terminal, plain timestamped lines otherwise.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    prefix: std::sync::Arc<std::sync::Mutex<String>>,
    start: std::time::Instant,
}

impl Progress {
    /// A spinner when stderr is a terminal.
    pub fn new() -> Progress {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            {
                b.set_style(style);
            }
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            prefix: Default::default(),
            start: std::time::Instant::now(),
        }
    }

    /// Sets the part shown before every message (e.g. `ext4 applydiff`).
    pub fn set_prefix(&self, prefix: &str) {
        *self.prefix.lock().unwrap_or_else(|e| e.into_inner()) = prefix.to_owned();
    }

    /// Shows `msg` as the current step.
    pub fn say(&self, msg: &str) {
        let prefix = self.prefix.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let line = if prefix.is_empty() {
            msg.to_owned()
        } else {
            format!("{prefix}: {msg}")
        };
        match &self.bar {
            Some(b) => b.set_message(line),
            None => eprintln!("[bench {:7.1}s] {line}", self.start.elapsed().as_secs_f64()),
        }
    }

    /// Prints a line that stays (above the spinner on a terminal).
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("[bench {:7.1}s] {msg}", self.start.elapsed().as_secs_f64()),
        }
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// Units a figure can be in (used for the tables and plot axes).
#[allow(dead_code)] // offered to every workload module; not all are in use
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Seconds.
    Seconds,
    /// Milliseconds.
    Millis,
    /// Microseconds.
    Micros,
    /// Bytes.
    Bytes,
    /// Mebibytes.
    MiB,
    /// Megabytes per second.
    MBps,
    /// Operations per second.
    OpsPerSec,
    /// A plain count.
    Count,
}

/// One measured quantity: all samples of one metric of one subject in one case.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Workload name (`applydiff`, `getput`, ...), the same as [`Workload::name`].
    pub workload: &'static str,
    /// Case within the workload, e.g. `250MB/40k files`, `depth 10`.
    pub case: String,
    /// `lamina`, or the baseline's name (`overlay2`, `gnu-tar+syncfs`, `overlay-syscalls`, `overlayfs`, ...).
    pub subject: String,
    /// Metric, e.g. `wall`, `p50`, `p99`, `peak rss`, `share`.
    pub metric: String,
    /// Unit of the samples.
    pub unit: Unit,
    /// Every sample (one per run; for latency percentiles, one percentile value per run).
    pub samples: Vec<f64>,
    /// True when smaller is better (times, memory); false for throughputs.
    pub lower_is_better: bool,
    /// The goal the project set for this figure, e.g. `<= 1.1x gnu-tar+syncfs` or `<= 0.3 ms`, if any.
    pub goal: Option<String>,
    /// Filled in by the runner.
    pub fs: Option<FsKind>,
    /// The subject is a floor (the bare kernel work of the same operations, no daemon): shown in the report's
    /// floor column; the ratio is taken against it only where no other baseline exists.
    pub floor: bool,
    /// The subject is a lower bound of lamina's figure: the least that any implementation pays for the same
    /// calls under the same conditions, added up from floors measured in the same run (e.g. the proxy floor
    /// plus a durable record). Never a baseline; where lamina misses its goal and the bound misses it too,
    /// the report calls the goal out of reach on this machine.
    pub bound: bool,
}

impl Figure {
    /// A figure where smaller is better, with no goal.
    pub fn new(
        workload: &'static str,
        case: impl Into<String>,
        subject: impl Into<String>,
        metric: impl Into<String>,
        unit: Unit,
    ) -> Self {
        Figure {
            workload,
            case: case.into(),
            subject: subject.into(),
            metric: metric.into(),
            unit,
            samples: Vec::new(),
            lower_is_better: true,
            goal: None,
            fs: None,
            floor: false,
            bound: false,
        }
    }

    /// Pushes a figure of `samples` onto `figs`; higher is better for throughputs (MB/s, operations/s).
    pub fn push_to(
        figs: &mut Vec<Figure>,
        workload: &'static str,
        (case, subject, metric): (&str, &str, &str),
        unit: Unit,
        samples: Vec<f64>,
    ) {
        let mut f = Figure::new(workload, case, subject, metric, unit);
        f.samples = samples;
        f.lower_is_better = !matches!(unit, Unit::MBps | Unit::OpsPerSec);
        figs.push(f);
    }

    /// Pushes a figure of `workload` whose case says what was not measured and why (so that the results say
    /// it, not only the docs).
    pub fn push_skipped(figs: &mut Vec<Figure>, workload: &'static str, why: &str) {
        Figure::push_to(figs, workload, (why, "lamina", "skipped"), Unit::Count, vec![0.0]);
    }

    /// Marks the figure as a floor.
    pub fn floor(mut self) -> Self {
        self.floor = true;
        self
    }

    /// Marks the figure as a lower bound of lamina's figure of the same case and metric.
    pub fn bound(mut self) -> Self {
        self.bound = true;
        self
    }

    /// Sets the goal (e.g. `<= 1.1x gnu-tar+syncfs`, `<= 0.3 ms`, `<= 64 MiB`).
    pub fn goal(mut self, goal: impl Into<String>) -> Self {
        self.goal = Some(goal.into());
        self
    }

    /// Sets the samples.
    pub fn samples(mut self, samples: Vec<f64>) -> Self {
        self.samples = samples;
        self
    }

    /// Adds one sample.
    pub fn push(&mut self, v: f64) {
        self.samples.push(v);
    }

    /// Median of the samples (NaN when there are none).
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }
}

/// Median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile `p` (0-100) of `v` (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// A benchmark workload.
pub struct Workload {
    /// Short name (`--only NAME` selects it).
    pub name: &'static str,
    /// One line for `--list` and the report.
    pub about: &'static str,
    /// Whether it runs on every `--fs` kind (true) or only on the first one (false: e.g. RPC latency).
    pub per_fs: bool,
    /// Measures lamina and its baseline, pushing figures.
    pub run: fn(&Ctx, &mut Vec<Figure>) -> anyhow::Result<()>,
}
