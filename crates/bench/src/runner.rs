//! The `lamina-bench` runner: arguments, the workload registry, the loop-backed filesystems and the run loop.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::engines::unmount_under;
use super::loopfs::{free_bytes, install_signal_teardown, ScratchFs};
use super::report::{self, load_avg, Machine, RunInfo, WorkloadResult};
use super::{graph, Ctx, FsKind, Progress, Workload};

/// `lamina-bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The small version (CI): every workload end to end in under 2 minutes; figures are not meaningful.
    #[arg(long)]
    pub quick: bool,
    /// Results directory (results.md, results.json, one SVG per workload).
    #[arg(long, value_name = "DIR", required_unless_present = "list")]
    pub out: Option<PathBuf>,
    /// Filesystems to measure on, each a fresh loop-backed one [default: ext4,xfs; --quick: ext4].
    #[arg(long, value_delimiter = ',', value_name = "FS,...")]
    pub fs: Vec<FsKind>,
    /// Run only these workloads (see --list).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub only: Vec<String>,
    /// List the workloads and exit.
    #[arg(long)]
    pub list: bool,
    /// Repetitions of each timed case [default: 5; --quick: 1].
    #[arg(long, value_name = "N")]
    pub runs: Option<usize>,
    /// Where the loop devices' sparse backing files go (never under --out).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/lamina-bench")]
    pub work: PathBuf,
    /// Size of each loop-backed filesystem in GiB [default: 20; --quick: 3].
    #[arg(long, value_name = "GIB")]
    pub size: Option<u64>,
}

/// Every workload, in run order.
pub fn workloads() -> Vec<Workload> {
    let mut v = Vec::new();
    // ---- bench-a: graph-driver workloads (graph.rs) ----
    v.extend(graph::workloads());
    // ---- bench-b: docker / containerd / volume workloads: add yours below this line ----
    v.extend([
        super::docker::COMMIT,
        super::docker::CONTAINERS100,
        super::docker::BUILD,
        super::docker::PAGECACHE,
        super::containerd::SNAPSHOTTER,
        super::volume::VOLUME,
        super::rbd::RBD_LAYERS,
        super::cluster::CLUSTER_TIER,
    ]);
    v
}

/// Programs the runner itself needs.
const TOOLS: [&str; 6] = ["losetup", "mount", "df", "sync", "tar", "kill"];

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists())
}

/// Runs `lamina-bench`.
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let all = workloads();
    if args.list {
        for w in &all {
            println!(
                "{:<12} {}{}",
                w.name,
                w.about,
                if w.per_fs { "" } else { " (first --fs only)" }
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let out = args.out.clone().context("--out DIR is required")?;
    if !lamina_sys::fs::running_as_root() {
        bail!("lamina-bench needs root (loop devices, mounts, drop_caches, dockerd); run it with sudo");
    }
    for t in TOOLS {
        if !have(t) {
            bail!("lamina-bench needs the `{t}` program");
        }
    }
    let mut kinds = if !args.fs.is_empty() {
        args.fs.clone()
    } else if args.quick {
        vec![FsKind::Ext4]
    } else {
        vec![FsKind::Ext4, FsKind::Xfs]
    };
    kinds.dedup();
    for k in &kinds {
        let mkfs = format!("mkfs.{}", k.name());
        if !have(&mkfs) {
            bail!(
                "--fs {} needs `{mkfs}` ({} package)",
                k.name(),
                if *k == FsKind::Xfs {
                    "xfsprogs"
                } else {
                    "e2fsprogs"
                }
            );
        }
    }
    let selected: Vec<&Workload> = if args.only.is_empty() {
        all.iter().collect()
    } else {
        for n in &args.only {
            if !all.iter().any(|w| w.name == n) {
                let names: Vec<&str> = all.iter().map(|w| w.name).collect();
                bail!("no workload named {n:?} (there are: {})", names.join(", "));
            }
        }
        all.iter()
            .filter(|w| args.only.iter().any(|n| n == w.name))
            .collect()
    };
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 5 }).max(1);
    let size_gib = args.size.unwrap_or(if args.quick { 3 } else { 20 });

    let cwd = std::env::current_dir().context("reading the current directory")?;
    if cwd.join(&args.work).starts_with(cwd.join(&out)) {
        bail!(
            "--work {} must not be inside --out {}",
            args.work.display(),
            out.display()
        );
    }
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::create_dir_all(&args.work).with_context(|| format!("creating {}", args.work.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let work = args
        .work
        .canonicalize()
        .with_context(|| format!("resolving {}", args.work.display()))?;
    if work.starts_with(&out) {
        bail!(
            "--work {} must not be inside --out {}",
            work.display(),
            out.display()
        );
    }
    let free = free_bytes(&work)?;
    let need = size_gib << 30;
    if free < need {
        bail!(
            "{} has {:.1} GiB free, but each loop filesystem may fill {size_gib} GiB; free some space, point --work \
             at a roomier disk, or pass a smaller --size (e.g. --size {}; large workloads may then fail for lack of room)",
            work.display(),
            free as f64 / (1u64 << 30) as f64,
            (free >> 30).saturating_sub(1).max(1)
        );
    }
    install_signal_teardown()?;
    if cfg!(debug_assertions) && !args.quick {
        eprintln!(
            "lamina-bench: this is a debug build; its figures say little (cargo build --release -p lamina -p lamina-bench)"
        );
    }

    let progress = Progress::new();
    let started = Instant::now();
    let date = report::utc_now();
    let load0 = load_avg();
    let lamina_exe =
        lamina_testkit::find_workspace_bin("lamina", "LAMINA_BIN").map_err(anyhow::Error::msg)?;
    let tag = format!("run{}", std::process::id());
    let mut results: Vec<WorkloadResult> = Vec::new();
    let mut filesystems = Vec::new();

    for (fs_index, &kind) in kinds.iter().enumerate() {
        let todo: Vec<&&Workload> = selected.iter().filter(|w| w.per_fs || fs_index == 0).collect();
        if todo.is_empty() {
            continue;
        }
        progress.set_prefix(kind.name());
        progress.say(&format!("making a {size_gib} GiB loop-backed {}", kind.name()));
        let lfs = match ScratchFs::create(&work, kind, need, &tag) {
            Ok(l) => l,
            Err(e) => {
                let e = format!("making the loop-backed {}: {e:#}", kind.name());
                progress.println(&format!("FAILED: {e}"));
                for w in todo {
                    results.push(WorkloadResult {
                        name: w.name,
                        about: w.about,
                        fs: kind,
                        error: Some(e.clone()),
                        seconds: 0.0,
                        figures: Vec::new(),
                    });
                }
                continue;
            }
        };
        filesystems.push(lfs.describe.clone());
        for w in todo {
            progress.set_prefix(&format!("{} {}", kind.name(), w.name));
            progress.say("starting");
            let scratch = lfs.mnt.join(w.name);
            if scratch.exists() {
                clear_dir(&scratch);
            }
            fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
            let ctx = Ctx {
                quick: args.quick,
                runs,
                fs: kind,
                scratch: scratch.clone(),
                out: out.clone(),
                lamina_exe: lamina_exe.clone(),
                progress: progress.clone(),
            };
            let mut figures = Vec::new();
            let t0 = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| (w.run)(&ctx, &mut figures)));
            let error = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(panic) => Some(format!(
                    "panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                )),
            };
            let seconds = t0.elapsed().as_secs_f64();
            for f in &mut figures {
                f.fs = Some(kind);
            }
            match &error {
                None => progress.println(&format!("{} on {}: done in {seconds:.1} s", w.name, kind.name())),
                Some(e) => progress.println(&format!(
                    "{} on {}: FAILED after {seconds:.1} s: {e}",
                    w.name,
                    kind.name()
                )),
            }
            if error.is_some() {
                keep_logs(
                    &scratch,
                    &out.join("raw").join(format!("{}-{}", kind.name(), w.name)),
                );
            }
            results.push(WorkloadResult {
                name: w.name,
                about: w.about,
                fs: kind,
                error,
                seconds,
                figures,
            });
            clear_dir(&scratch);
            // Give the freed blocks back to the backing file's filesystem (the loop device passes discards
            // on as holes), so a long run does not keep its high-water mark of disk space.
            let _ = Command::new("fstrim")
                .arg(&lfs.mnt)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        progress.set_prefix(kind.name());
        progress.say("tearing down the loop filesystem");
        drop(lfs);
    }
    progress.finish();

    let info = RunInfo {
        machine: Machine::probe(),
        date,
        lamina_version: env!("CARGO_PKG_VERSION").to_owned(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .to_owned(),
        quick: args.quick,
        runs,
        filesystems,
        duration_s: started.elapsed().as_secs_f64(),
        load_avg: (load0, load_avg()),
    };
    report::write(&out, &info, &results)?;
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    eprintln!(
        "lamina-bench: {} workload run(s), {failed} failed, {:.0} s; results in {}",
        results.len(),
        info.duration_s,
        out.join("results.md").display()
    );
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Copies the engine logs (`*.log` files up to 16 MiB) a failed workload left in `scratch` to `dest`, their
/// paths flattened (`dockerd-lamina/dockerd.log` -> `dockerd-lamina_dockerd.log`). Mount points are skipped.
fn keep_logs(scratch: &Path, dest: &Path) {
    let mounts = lamina_sys::mount::mounts_under(scratch).unwrap_or_default();
    let mut stack = vec![scratch.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() && !mounts.contains(&p) {
                stack.push(p);
            } else if meta.is_file() && p.extension().is_some_and(|x| x == "log") && meta.len() <= 16 << 20 {
                let rel = p
                    .strip_prefix(scratch)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .replace('/', "_");
                if fs::create_dir_all(dest).is_ok() {
                    let _ = fs::copy(&p, dest.join(rel));
                }
            }
        }
    }
}

/// Unmounts whatever a workload left mounted below `dir`, then removes it.
fn clear_dir(dir: &Path) {
    unmount_under(dir);
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("lamina-bench: could not remove {}: {e}", dir.display());
        }
    }
}
