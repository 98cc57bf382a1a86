//! `lamina bench`: lamina against the built-in alternatives (overlay2, containerd's overlayfs snapshotter,
//! GNU tar, bind mounts, bare mfsmount), measured in the same run on a fresh loop-backed filesystem.
//!
//! The shape, shared by every workload module:
//! - The runner (this module) parses the arguments, makes one fresh loop-backed filesystem per kind asked
//!   for (ext4, xfs), mounts it under a private directory and hands each workload a [`Ctx`].
//! - A workload is a [`Workload`]: a name, and a function that measures lamina **and** its baseline with the
//!   engines it starts itself (each with its own roots and sockets on the scratch filesystem, stopped by PID
//!   before it returns, also on error) and pushes [`Figure`]s.
//! - The report (`report.rs`) pairs each lamina figure with the baseline figure of the same workload, case,
//!   metric and filesystem, computes the ratio of medians, and writes `results.md`, `results.json` and SVG
//!   plots into `--out`.
//!
//! Timings are never asserted: `--quick` (CI) checks that every workload runs end to end.

pub mod client;
pub mod engines;
mod runner;
pub mod targen;
// bench-b's workloads and their engines.
pub mod containerd;
pub mod docker;
pub mod engines_ctr;
pub mod volume;

use std::path::PathBuf;

use serde::Serialize;

pub use runner::{run, BenchArgs};

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
    /// This binary, for starting `lamina serve`.
    pub lamina_exe: PathBuf,
}

/// Units a figure can be in (used for the tables and plot axes).
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
        }
    }
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
