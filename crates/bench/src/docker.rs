//! The dockerd workloads: lamina as dockerd 20.10's graph driver (`dockerd --experimental -s <plugin>`) against
//! the same dockerd binary with its built-in `overlay2`, both daemons started by the workload with their own
//! roots on the scratch filesystem and the same busybox image imported into each.
//!
//! - `commit`: `docker commit` of a stopped container that wrote 1 KiB, on images of two sizes: wall time of the
//!   command, and for lamina its share (the plugin calls dockerd makes meanwhile, through the timing proxy).
//! - `containers100`: N × `docker run -d` then N × `docker rm -f`, wall time, and lamina's share of it measured by
//!   a timing proxy between dockerd and lamina's plugin socket; the same cycle through a third dockerd on the
//!   served floor's driver (`docker_floor.rs`), behind a proxy of its own, gives the floor of that share.
//! - `build`: `docker build --no-cache` (classic builder) of a 10-step Dockerfile on the imported busybox.
//! - `pagecache`: page cache added by N containers of one image reading the same file.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::docker_floor::FloorPlugin;
use super::engines::{
    busybox_image, dockerd, drop_caches, lamina, proc_cpu_secs, start, unique_name, Dockerd, Lamina, Served,
    PLUGIN_DIR,
};
use super::engines_ctr::{
    busybox_tree, calls_between, cgroup_page_cache, meminfo_cached, run as run_cmd, RunDir, TarWriter,
    TimingProxy,
};
use super::graph::FloorDir;
use super::{Ctx, Figure, Unit, Workload};

/// `commit` workload.
pub const COMMIT: Workload = Workload {
    name: "commit",
    about:
        "docker commit of a 1 KiB change in a container of a 10 MB and a 5 GB image (quick: 10 MB, 100 MB), \
            lamina vs overlay2 on one dockerd version",
    per_fs: true,
    run: run_commit,
};

/// `containers100` workload.
pub const CONTAINERS100: Workload = Workload {
    name: "containers100",
    about: "100 x docker run -d busybox sleep + 100 x docker rm -f (quick: 10): wall time, and lamina's share of \
            it (timing proxy on the plugin socket); vs overlay2",
    per_fs: true,
    run: run_containers,
};

/// `build` workload.
pub const BUILD: Workload = Workload {
    name: "build",
    about: "docker build --no-cache (classic builder) of a 10-step Dockerfile (ADDs, deletes, a large file, many \
            small files) on busybox; vs overlay2",
    per_fs: true,
    run: run_build,
};

/// `pagecache` workload.
pub const PAGECACHE: Workload = Workload {
    name: "pagecache",
    about: "page cache added by 10 containers reading the same 200 MB file of one image (quick: 2, 20 MB), \
            first vs the others; vs overlay2",
    per_fs: true,
    run: run_pagecache,
};

const BASELINE: &str = "overlay2";
const BUSYBOX_TAG: &str = "bench-busybox:1";
/// The subject of the served floor's figures (`docker_floor.rs`).
const SERVED_FLOOR: &str = "served-floor";

/// lamina (optionally behind a timing proxy) with its dockerd, and an overlay2 dockerd. Fields drop in order:
/// both dockerds stop before the proxy and lamina.
struct Engines {
    lamina_d: Dockerd,
    overlay_d: Dockerd,
    proxy: Option<TimingProxy>,
    /// lamina's metrics socket (with the proxy): its own time per call, without the RPC.
    metrics: Option<PathBuf>,
    lamina: Lamina,
    run_dir: RunDir,
}

/// The served floor's dockerd, its timing proxy and its driver, dropped in that order (before the [`Engines`]
/// whose run directory holds the driver's socket).
struct FloorEngine {
    d: Dockerd,
    proxy: TimingProxy,
    plugin: FloorPlugin,
}

impl Engines {
    /// Both daemons, with busybox imported as [`BUSYBOX_TAG`] into each.
    fn start(ctx: &Ctx, with_proxy: bool) -> anyhow::Result<Engines> {
        ctx.say("starting lamina and two dockerds");
        let name = unique_name("bench");
        // lamina's own socket (behind the proxy) on a short path.
        let run_dir = RunDir::new()?;
        // dockerd makes its plugin directory only when it starts, after the socket is bound here.
        fs::create_dir_all(PLUGIN_DIR).with_context(|| format!("create {PLUGIN_DIR}"))?;
        let (lamina, proxy, metrics) = if with_proxy {
            let metrics = run_dir.path.join("metrics.sock");
            let mut spec = lamina(ctx, "lam").plugin_socket(&run_dir.path.join("plugin.sock"));
            spec.extra_args = vec!["--metrics-address".into(), format!("unix:{}", metrics.display())];
            let lamina = start(spec);
            let listen = Path::new(PLUGIN_DIR).join(format!("{name}.sock"));
            let proxy = TimingProxy::start(&listen, &lamina.socket)?;
            (lamina, Some(proxy), Some(metrics))
        } else {
            let plugin_socket = Path::new(PLUGIN_DIR).join(format!("{name}.sock"));
            (
                start(lamina(ctx, "lam").plugin_socket(&plugin_socket)),
                None,
                None,
            )
        };
        // Both daemons start at the same time (each takes a few seconds).
        let (ld, od) = thread::scope(|s| {
            let l = s.spawn(|| dockerd(ctx, "dl", &name));
            let o = s.spawn(|| dockerd(ctx, "do", BASELINE));
            (l.join(), o.join())
        });
        let lamina_d = ld.map_err(|_| anyhow::anyhow!("dockerd start panicked"))??;
        let overlay_d = od.map_err(|_| anyhow::anyhow!("dockerd start panicked"))??;
        let e = Engines {
            lamina_d,
            overlay_d,
            proxy,
            metrics,
            lamina,
            run_dir,
        };
        ctx.say("importing busybox");
        for d in e.both() {
            busybox_image(d.1, BUSYBOX_TAG);
        }
        Ok(e)
    }

    /// A third dockerd on the served floor's driver (`docker_floor.rs`) behind a timing proxy of its own, with
    /// busybox imported as [`BUSYBOX_TAG`].
    fn start_floor(&self, ctx: &Ctx) -> anyhow::Result<FloorEngine> {
        ctx.say("starting the served floor's driver and its dockerd");
        let name = unique_name("bench-floor");
        let plugin = FloorPlugin::start(
            &ctx.scratch.join("flr").join("data"),
            &self.run_dir.path.join("floor.sock"),
        )?;
        let proxy = TimingProxy::start(
            &Path::new(PLUGIN_DIR).join(format!("{name}.sock")),
            &self.run_dir.path.join("floor.sock"),
        )?;
        let d = dockerd(ctx, "df", &name)?;
        busybox_image(&d, BUSYBOX_TAG);
        Ok(FloorEngine { d, proxy, plugin })
    }

    /// (subject, daemon) pairs: lamina first.
    fn both(&self) -> [(&'static str, &Dockerd); 2] {
        [("lamina", &self.lamina_d), (BASELINE, &self.overlay_d)]
    }
}

/// `docker import`s a generated image as `tag`: busybox plus `data` files (name, size, seed) of pseudo-random
/// bytes, streamed into the CLI (nothing of the size of the image is held in memory or written as a file).
fn import_generated(d: &Dockerd, tag: &str, data: &[(String, u64, u64)]) -> anyhow::Result<()> {
    let mut child = d
        .docker_cmd(&["import", "--change", "CMD [\"/bin/sh\"]", "-", tag])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run docker import")?;
    let stdin = child.stdin.take().context("stdin")?;
    let data = data.to_vec();
    let writer = thread::spawn(move || -> anyhow::Result<()> {
        let mut tar = TarWriter::new(BufWriter::with_capacity(1 << 20, stdin));
        busybox_tree(&mut tar)?;
        tar.dir("data/", 0o755)?;
        for (name, size, seed) in &data {
            tar.random_file(&format!("data/{name}"), *size, *seed)?;
        }
        tar.finish()?.flush()?;
        Ok(())
    });
    let out = child.wait_with_output()?;
    let w = writer
        .join()
        .map_err(|_| anyhow::anyhow!("tar writer panicked"))?;
    if !out.status.success() {
        bail!(
            "docker import on {} failed: {}",
            d.driver,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    w
}

/// Splits `bytes` into files of at most 64 MiB: (name, size, seed).
fn data_files(bytes: u64, seed: u64) -> Vec<(String, u64, u64)> {
    const PIECE: u64 = 64 << 20;
    let mut out = Vec::new();
    let mut left = bytes;
    let mut i = 0u64;
    while left > 0 {
        let n = left.min(PIECE);
        out.push((format!("blob{i:04}"), n, seed + i));
        left -= n;
        i += 1;
    }
    out
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn figure(
    workload: &'static str,
    case: &str,
    subject: &str,
    metric: &str,
    unit: Unit,
    samples: Vec<f64>,
) -> Figure {
    Figure::new(workload, case, subject, metric, unit).samples(samples)
}

// ------------------------------------------------------------------------------------------------------------
// commit
// ------------------------------------------------------------------------------------------------------------

fn run_commit(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let e = Engines::start(ctx, true)?;
    let totals = e.proxy.as_ref().context("proxy")?.totals.clone();
    let sizes: [(&str, u64); 2] = if ctx.quick {
        [("image 10 MB", 10_000_000), ("image 100 MB", 100_000_000)]
    } else {
        [("image 10 MB", 10_000_000), ("image 5 GB", 5_000_000_000)]
    };
    let busybox_bytes = fs::metadata(super::engines_ctr::BUSYBOX).map_or(0, |m| m.len());
    for (k, (case, bytes)) in sizes.iter().enumerate() {
        let tag = format!("bench-commit-base:{k}");
        let files = data_files(bytes.saturating_sub(busybox_bytes), 0xc0ffee);
        // One daemon after the other, so that the scratch filesystem holds the big image once at a time.
        for (subject, d) in e.both() {
            ctx.say(format!("{subject}: importing the {case}"));
            import_generated(d, &tag, &files)?;
            ctx.say(format!("{subject}: commits on the {case}"));
            let (mut wall, mut share) = (Vec::new(), Vec::new());
            let (mut diff_wall, mut diff_share) = (Vec::new(), Vec::new());
            for r in 0..ctx.runs {
                let c = format!("commit-{k}-{r}");
                d.ok(&[
                    "run",
                    "--name",
                    &c,
                    &tag,
                    "sh",
                    "-c",
                    "head -c 1024 /dev/urandom > /change.bin",
                ]);
                run_cmd(std::process::Command::new("sync").arg("-f").arg(&ctx.scratch))?;
                // `docker diff` (the driver's Changes): proportional to the change, not to the image.
                let (before, _) = totals.get();
                let t = Instant::now();
                let listed = d.ok(&["diff", &c]);
                diff_wall.push(secs(t) * 1000.0);
                diff_share.push((totals.get().0 - before).as_secs_f64() * 1000.0);
                if !listed.contains("/change.bin") {
                    bail!("docker diff of {c} on {subject} does not list /change.bin: {listed}");
                }
                let (before, _) = totals.get();
                let t = Instant::now();
                d.ok(&["commit", &c, &format!("bench-committed:{k}-{r}")]);
                wall.push(secs(t) * 1000.0);
                share.push((totals.get().0 - before).as_secs_f64() * 1000.0);
                d.ok(&["rm", &c]);
                d.ok(&["rmi", &format!("bench-committed:{k}-{r}")]);
            }
            figs.push(figure(
                "commit",
                case,
                subject,
                "docker commit",
                Unit::Millis,
                wall,
            ));
            figs.push(figure(
                "commit",
                case,
                subject,
                "docker diff",
                Unit::Millis,
                diff_wall,
            ));
            if subject == "lamina" {
                let mut f = figure("commit", case, subject, "storage share", Unit::Millis, share);
                f.goal = Some("<= 50 ms".into());
                figs.push(f);
                let mut f = figure(
                    "commit",
                    case,
                    subject,
                    "docker diff storage share",
                    Unit::Millis,
                    diff_share,
                );
                f.goal = Some("<= 100 ms".into());
                figs.push(f);
            }
            d.ok(&["rmi", &tag]);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// containers100
// ------------------------------------------------------------------------------------------------------------

fn run_containers(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let e = Engines::start(ctx, true)?;
    let fl = e.start_floor(ctx)?;
    let n = if ctx.quick { 10 } else { 100 };
    let case = format!("{n} containers");
    // The served floor's share of the same cycle, and its time per call (through its own proxy).
    let mut served_floor = Vec::new();
    let mut floor_per_call: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let totals = e.proxy.as_ref().context("proxy")?.totals.clone();
    let mut runs: [[Vec<f64>; 3]; 2] = Default::default();
    let (mut share, mut calls) = (Vec::new(), Vec::new());
    // Per plugin call: (calls per container, µs per call) of each run.
    let mut per_call: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    // The kernel's part: a container's two layers on a one-layer image (two lowers), without a daemon.
    let floor_dir = FloorDir::new(&ctx.scratch.join("floor"), 2)?;
    let (mut floor, mut floor_commits) = (Vec::new(), Vec::new());
    // lamina's side of the share: its own time per call (dispatch to answer, from its metrics) and its CPU.
    let metrics = e.metrics.as_deref().context("metrics socket")?;
    let pid = e.lamina.pid().unwrap_or(0).to_string();
    let (mut served_share, mut cpu) = (Vec::new(), Vec::new());
    let mut served: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let read_served = || -> anyhow::Result<Vec<(&'static str, Served)>> {
        SERVED_OPS
            .iter()
            .map(|op| Ok((*op, Served::read(metrics, "graphdriver", op)?)))
            .collect()
    };
    for r in 0..ctx.runs {
        for (j, (subject, d)) in e.both().iter().enumerate() {
            ctx.say(format!("{subject}: run {} of {}", r + 1, ctx.runs));
            let (before, calls_before) = totals.get();
            let by_call_before = totals.by_call();
            let lamina_before = if *subject == "lamina" {
                Some((read_served()?, proc_cpu_secs(&pid)))
            } else {
                None
            };
            let (created, removed) = containers_cycle(d, r, n);
            runs[j][0].push(created);
            runs[j][1].push(removed);
            runs[j][2].push(created + removed);
            if *subject == "lamina" {
                let (after, calls_after) = totals.get();
                share.push((after - before).as_secs_f64());
                calls.push((calls_after - calls_before) as f64);
                for (call, count, took) in calls_between(&by_call_before, &totals.by_call()) {
                    let e = per_call.entry(call).or_default();
                    e.0.push(count as f64 / n as f64);
                    e.1.push(took.as_secs_f64() * 1e6 / count as f64);
                }
                if let Some((served_before, cpu_before)) = lamina_before {
                    let mut inside = 0.0;
                    for ((op, after), (_, before)) in read_served()?.iter().zip(&served_before) {
                        let (calls, mean, _) = after.since(before, 0.5);
                        if calls > 0.0 {
                            inside += calls * mean;
                            served.entry(op).or_default().push(mean * 1e6);
                        }
                    }
                    served_share.push(inside);
                    if let (Some(a), Some(b)) = (cpu_before, proc_cpu_secs(&pid)) {
                        cpu.push(b - a);
                    }
                }
            }
        }
        ctx.say(format!("{SERVED_FLOOR}: run {} of {}", r + 1, ctx.runs));
        // Two layers per container, made ahead.
        fl.plugin.driver.make_spares(2 * n)?;
        let (before, _) = fl.proxy.totals.get();
        let by_call_before = fl.proxy.totals.by_call();
        containers_cycle(&fl.d, r, n);
        served_floor.push((fl.proxy.totals.get().0 - before).as_secs_f64());
        for (call, count, took) in calls_between(&by_call_before, &fl.proxy.totals.by_call()) {
            floor_per_call
                .entry(call)
                .or_default()
                .push(took.as_secs_f64() * 1e6 / count as f64);
        }
        fl.plugin.driver.empty_trash()?;
        ctx.say(format!("kernel floor: run {} of {}", r + 1, ctx.runs));
        let kernel = floor_dir.containers(n)?;
        floor.push(kernel);
        // Per container, the two layers' records made and dropped: four durable commits.
        floor_commits.push(kernel + metadata_commits(&ctx.scratch, 4 * n)?);
    }
    floor_dir.remove();
    drop(fl);
    let [l, o] = runs;
    for (subject, [c, rm, total]) in [("lamina", l), (BASELINE, o)] {
        figs.push(figure(
            "containers100",
            &case,
            subject,
            "run -d (all)",
            Unit::Seconds,
            c,
        ));
        figs.push(figure(
            "containers100",
            &case,
            subject,
            "rm -f (all)",
            Unit::Seconds,
            rm,
        ));
        figs.push(figure(
            "containers100",
            &case,
            subject,
            "wall",
            Unit::Seconds,
            total,
        ));
    }
    let mut f = figure(
        "containers100",
        &case,
        "lamina",
        "storage share",
        Unit::Seconds,
        share,
    );
    f.goal = Some(format!("<= {:.2} s", 0.3 * n as f64 / 100.0));
    figs.push(f);
    // First of the floors: the one in the floor column. It is also the lower bound of lamina's share: what any
    // out-of-process driver doing the least work pays in the same daemons.
    let served_floor = figure(
        "containers100",
        &case,
        SERVED_FLOOR,
        "storage share",
        Unit::Seconds,
        served_floor,
    );
    figs.push(served_floor.clone().bound());
    figs.push(served_floor.floor());
    figs.push(
        figure(
            "containers100",
            &case,
            "kernel+commits-floor",
            "storage share",
            Unit::Seconds,
            floor_commits,
        )
        .floor(),
    );
    figs.push(
        figure(
            "containers100",
            &case,
            "kernel-floor",
            "storage share",
            Unit::Seconds,
            floor,
        )
        .floor(),
    );
    figs.push(figure(
        "containers100",
        &case,
        "lamina",
        "storage share inside lamina (no RPC)",
        Unit::Seconds,
        served_share,
    ));
    figs.push(figure(
        "containers100",
        &case,
        "lamina",
        "lamina CPU (user+sys)",
        Unit::Seconds,
        cpu,
    ));
    figs.push(figure(
        "containers100",
        &case,
        "lamina",
        "plugin calls",
        Unit::Count,
        calls,
    ));
    for (op, micros) in served {
        figs.push(figure(
            "containers100",
            &case,
            "lamina",
            &format!("GraphDriver.{op} inside lamina per call"),
            Unit::Micros,
            micros,
        ));
    }
    for (call, micros) in floor_per_call {
        figs.push(
            figure(
                "containers100",
                &case,
                SERVED_FLOOR,
                &format!("{} per call", call.trim_start_matches('/')),
                Unit::Micros,
                micros,
            )
            .floor(),
        );
    }
    for (call, (count, micros)) in per_call {
        let call = call.trim_start_matches('/');
        figs.push(figure(
            "containers100",
            &case,
            "lamina",
            &format!("{call} per container"),
            Unit::Count,
            count,
        ));
        figs.push(figure(
            "containers100",
            &case,
            "lamina",
            &format!("{call} per call"),
            Unit::Micros,
            micros,
        ));
    }
    Ok(())
}

/// Run `r` of `containers100` on `d`: `n` × `docker run -d` of busybox, then `n` × `docker rm -f`, one CLI
/// call after the other; the seconds each phase took.
fn containers_cycle(d: &Dockerd, r: usize, n: usize) -> (f64, f64) {
    let names: Vec<String> = (0..n).map(|i| format!("c{r}-{i}")).collect();
    let t = Instant::now();
    for c in &names {
        d.ok(&["run", "-d", "--name", c, BUSYBOX_TAG, "sleep", "1000"]);
    }
    let created = secs(t);
    let t = Instant::now();
    for c in &names {
        d.ok(&["rm", "-f", c]);
    }
    (created, secs(t))
}

/// The plugin calls whose time inside lamina `containers100` reports (those dockerd makes for `run -d`/`rm -f`).
const SERVED_OPS: [&str; 6] = ["Create", "CreateReadWrite", "Get", "Put", "Remove", "GetMetadata"];

/// The metadata part of a container's floor: `commits` durable commits (a small record put, then dropped) into a
/// fresh redb database on the scratch filesystem, in seconds. A layer's record must be on disk before its
/// directories, and its removal before its directory goes: one `fdatasync` of the database each, whatever does it.
fn metadata_commits(dir: &Path, commits: usize) -> anyhow::Result<f64> {
    Ok(durable_commits(dir, commits, Duration::ZERO, 0)?
        .iter()
        .map(Duration::as_secs_f64)
        .sum())
}

/// The time of each of `commits` durable commits (a small record put, then dropped) into a fresh redb database in
/// `dir` whose table already holds `held` rows of a layer record's size: what recording one layer costs at the
/// least (one `fdatasync` of the database; more pages to write, and so a dearer flush, in a larger table). With a
/// `pause`, the thread sleeps that long (untimed) before each commit, as a daemon waits for its next call: on this
/// virtual machine a flush that starts from idle costs more than one of a tight loop.
pub fn durable_commits(
    dir: &Path,
    commits: usize,
    pause: Duration,
    held: u64,
) -> anyhow::Result<Vec<Duration>> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("floor");
    /// About the size of a snapshot's record in lamina's `layers` table.
    const HELD_ROW: usize = 300;
    /// Keys of the rows held, above those the timed commits use.
    const HELD_KEYS: u64 = 1 << 40;
    let path = dir.join("floor.redb");
    let db = redb::Database::create(&path)?;
    if held > 0 {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            let row = [3u8; HELD_ROW];
            for k in 0..held {
                table.insert(HELD_KEYS + k, &row[..])?;
            }
        }
        txn.commit()?;
    }
    let record = [7u8; 200];
    let mut times = Vec::with_capacity(commits);
    for i in 0..commits as u64 {
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        let t = Instant::now();
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            if i % 2 == 0 {
                table.insert(i, &record[..])?;
            } else {
                table.remove(i - 1)?;
            }
        }
        txn.commit()?;
        times.push(t.elapsed());
    }
    drop(db);
    fs::remove_file(&path)?;
    Ok(times)
}

// ------------------------------------------------------------------------------------------------------------
// build
// ------------------------------------------------------------------------------------------------------------

/// Writes the build context: the Dockerfile, `small/` and `more/` trees of 1-8 KiB files, `large.bin`.
fn build_context(dir: &Path, quick: bool) -> anyhow::Result<String> {
    let (small, more, large, generated) = if quick {
        (300u64, 100u64, 8u64 << 20, 100)
    } else {
        (5_000, 2_000, 256 << 20, 2_000)
    };
    let mut buf = vec![0u8; 8192];
    for (tree, count) in [("small", small), ("more", more)] {
        for i in 0..count {
            let sub = dir.join(tree).join(format!("d{}", i / 100));
            if i % 100 == 0 {
                fs::create_dir_all(&sub)?;
            }
            let size = 1024 + (i * 2_654_435_761 % 7168) as usize;
            super::engines_ctr::fill_random(i ^ count << 32, &mut buf[..size]);
            fs::write(sub.join(format!("f{i}")), &buf[..size])?;
        }
    }
    let mut f = BufWriter::new(fs::File::create(dir.join("large.bin"))?);
    let mut piece = vec![0u8; 1 << 20];
    for i in 0..(large >> 20) {
        super::engines_ctr::fill_random(0x1a7e + i, &mut piece);
        f.write_all(&piece)?;
    }
    f.flush()?;
    let dockerfile = format!(
        "FROM {BUSYBOX_TAG}\n\
         ADD small /data/small\n\
         ADD large.bin /data/large.bin\n\
         RUN rm -rf /data/small/d0 /data/small/d1\n\
         RUN cp /data/large.bin /data/large.copy\n\
         RUN rm /data/large.bin\n\
         ADD more /data/more\n\
         RUN mkdir /data/gen && for i in $(seq 1 {generated}); do echo $i > /data/gen/f$i; done\n\
         ENV BENCH=1\n\
         RUN find /data -type f | wc -l > /data/count\n"
    );
    fs::write(dir.join("Dockerfile"), dockerfile)?;
    Ok(format!(
        "10 steps, {} small files, {} MiB file",
        small + more + generated,
        large >> 20
    ))
}

fn run_build(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let e = Engines::start(ctx, false)?;
    let context = ctx.scratch.join("context");
    fs::create_dir_all(&context)?;
    let case = build_context(&context, ctx.quick)?;
    let context_s = context.display().to_string();
    let mut samples = [Vec::new(), Vec::new()];
    for r in 0..ctx.runs {
        for (j, (subject, d)) in e.both().iter().enumerate() {
            ctx.say(format!("{subject}: build {} of {}", r + 1, ctx.runs));
            let tag = format!("bench-build:{r}");
            drop_caches(&ctx.scratch)?;
            let t = Instant::now();
            d.ok(&["build", "--no-cache", "-q", "-t", &tag, &context_s]);
            samples[j].push(secs(t));
            let count = d.ok(&["run", "--rm", &tag, "cat", "/data/count"]);
            anyhow::ensure!(
                count.trim().parse::<u64>().is_ok_and(|c| c > 0),
                "build result: {count}"
            );
            d.ok(&["rmi", &tag]);
        }
    }
    let [l, o] = samples;
    let mut f = figure("build", &case, "lamina", "docker build", Unit::Seconds, l);
    f.goal = Some("<= 1.0x overlay2".into());
    figs.push(f);
    figs.push(figure("build", &case, BASELINE, "docker build", Unit::Seconds, o));
    let _ = fs::remove_dir_all(&context);
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// pagecache
// ------------------------------------------------------------------------------------------------------------

fn run_pagecache(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let e = Engines::start(ctx, false)?;
    let (n, bytes) = if ctx.quick {
        (2usize, 20u64 << 20)
    } else {
        (10, 200 << 20)
    };
    let tag = "bench-pagecache:1";
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    for (_, d) in e.both() {
        import_generated(d, tag, &[("shared.bin".into(), bytes, 0x9a9e)])?;
    }
    let case = format!("{n} containers, {} MiB file", bytes >> 20);
    // [driver][first, others total, first meminfo, others meminfo]
    let mut out: [[Vec<f64>; 4]; 2] = Default::default();
    let mut source = "cgroup";
    for r in 0..ctx.runs {
        for (j, (subject, d)) in e.both().iter().enumerate() {
            ctx.say(format!("{subject}: run {} of {}", r + 1, ctx.runs));
            let names: Vec<String> = (0..n).map(|i| format!("pc{r}-{i}")).collect();
            let mut pids = Vec::new();
            for c in &names {
                d.ok(&["run", "-d", "--name", c, tag, "sleep", "1000"]);
                let pid: u32 = d.ok(&["inspect", "-f", "{{.State.Pid}}", c]).trim().parse()?;
                pids.push(pid);
            }
            drop_caches(&ctx.scratch)?;
            let (mut first, mut others, mut first_m, mut others_m) = (0.0, 0.0, 0.0, 0.0);
            for (i, c) in names.iter().enumerate() {
                let cg_before = cgroup_page_cache(pids[i]);
                let m_before = meminfo_cached();
                d.ok(&["exec", c, "sh", "-c", "cat /data/shared.bin > /dev/null"]);
                let m_after = meminfo_cached();
                let added = match (cg_before, cgroup_page_cache(pids[i])) {
                    (Some(b), Some(a)) => mib(a.saturating_sub(b)),
                    _ => {
                        source = "meminfo";
                        mib(m_after.saturating_sub(m_before))
                    }
                };
                let added_m = mib(m_after.saturating_sub(m_before));
                if i == 0 {
                    first = added;
                    first_m = added_m;
                } else {
                    others += added;
                    others_m += added_m;
                }
            }
            for (k, v) in [first, others, first_m, others_m].into_iter().enumerate() {
                out[j][k].push(v);
            }
            let mut rm = vec!["rm", "-f"];
            rm.extend(names.iter().map(String::as_str));
            d.ok(&rm);
        }
    }
    let [l, o] = out;
    for (subject, [first, others, first_m, others_m]) in [("lamina", l), (BASELINE, o)] {
        figs.push(figure(
            "pagecache",
            &case,
            subject,
            &format!("1st container ({source})"),
            Unit::MiB,
            first,
        ));
        let mut f = figure(
            "pagecache",
            &case,
            subject,
            &format!("containers 2..{n} together ({source})"),
            Unit::MiB,
            others,
        );
        if subject == "lamina" {
            f.goal = Some("<= 1 MiB".into());
        }
        figs.push(f);
        figs.push(figure(
            "pagecache",
            &case,
            subject,
            "1st container (meminfo Cached)",
            Unit::MiB,
            first_m,
        ));
        figs.push(figure(
            "pagecache",
            &case,
            subject,
            &format!("containers 2..{n} together (meminfo Cached)"),
            Unit::MiB,
            others_m,
        ));
    }
    Ok(())
}
