//! The `lamina bench` runner: arguments, the workload registry, the loop-backed filesystems and the run loop.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

use super::{FsKind, Workload};

/// `lamina bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The small version (CI): every workload end to end in under 2 minutes; figures are not meaningful.
    #[arg(long)]
    pub quick: bool,
    /// Results directory (results.md, results.json, one SVG per workload).
    #[arg(long, value_name = "DIR", required_unless_present = "list")]
    pub out: Option<PathBuf>,
    /// Filesystems to measure on, each a fresh loop-backed one.
    #[arg(long, value_delimiter = ',', default_value = "ext4,xfs")]
    pub fs: Vec<FsKind>,
    /// Run only these workloads (see --list).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub only: Vec<String>,
    /// List the workloads and exit.
    #[arg(long)]
    pub list: bool,
    /// Repetitions of each timed case [default: 5, --quick: 1].
    #[arg(long, value_name = "N")]
    pub runs: Option<usize>,
    /// Where the loop devices' backing files go (never the results directory).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/lamina-bench")]
    pub work: PathBuf,
}

/// Every workload, in run order.
pub fn workloads() -> Vec<Workload> {
    vec![
        // ---- bench-a: graph-driver workloads (graph.rs) ----
        // ---- bench-b: docker / containerd / volume workloads: add yours below this line ----
        super::docker::COMMIT,
        super::docker::CONTAINERS100,
        super::docker::BUILD,
        super::docker::PAGECACHE,
        super::containerd::SNAPSHOTTER,
        super::volume::VOLUME,
    ]
}

/// Runs `lamina bench`.
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let all = workloads();
    if args.list {
        for w in &all {
            println!("{:<12} {}", w.name, w.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !lamina_sys::fs::running_as_root() {
        bail!("lamina bench needs root (loop devices, mounts, drop_caches, dockerd)");
    }
    bail!("not implemented yet")
}
