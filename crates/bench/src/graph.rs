//! Graph-driver workloads: ApplyDiff throughput, Get/Put latency, daemon start with many layers, peak RSS.
//!
//! Each measures lamina through its plugin socket (the requests dockerd sends) and, in the same run and on
//! the same filesystem, the baseline: GNU tar + one syncfs, dockerd's own overlay2, the bare overlay
//! mount/umount syscalls, an empty store, GNU tar's memory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::engines::{
    dockerd, drop_caches, graph_session, lamina, proc_cpu_secs, run_checked, session, start, stop,
    unique_name, unmount_under, warm_file, Lamina, RssSampler, Served, Session, PLUGIN_DIR,
};
use super::targen::{gen_tar, hex_id, now_seed, tiny_tar, TarSpec, TarStats};
use super::{percentile, Ctx, Figure, Unit, Workload};

/// The graph-driver workloads, in run order.
pub fn workloads() -> Vec<Workload> {
    vec![
        Workload {
            name: "applydiff",
            about: "Create + chunked ApplyDiff of a generated layer vs GNU tar -x + syncfs; docker load on lamina vs overlay2",
            per_fs: true,
            run: applydiff,
        },
        Workload {
            name: "getput",
            about: "Create+Get, Get, Put, Put+Remove of a RW layer at depth 1-128 (RPC included) vs the bare overlay mount/umount",
            per_fs: true,
            run: getput,
        },
        Workload {
            name: "start10k",
            about: "lamina serve start-up until the plugin socket answers, with 10,000 layers vs an empty store",
            per_fs: true,
            run: start10k,
        },
        Workload {
            name: "rss",
            about: "lamina's peak RSS during one ApplyDiff, small and large layer, vs GNU tar's",
            per_fs: true,
            run: rss,
        },
    ]
}

// ------------------------------------------------------------------------------------------------------------
// Generated layers
// ------------------------------------------------------------------------------------------------------------

/// One generated layer tar.
struct TarCase {
    /// Case label for the report.
    label: &'static str,
    spec: TarSpec,
}

/// The small (quick) layer: ~20 MB, 3,000 files.
fn small_case() -> TarCase {
    TarCase {
        label: "20MB/3k files",
        spec: TarSpec {
            files: 3_000,
            dirs: 150,
            payload: 17_000_000,
            median: 2048,
            large_files: 0,
            large_size: 0,
            seed: 3,
        },
    }
}

/// The reference layer of performance.md: ~250 MB, 42,000 files in 2,000 directories, median 2 KiB.
fn reference_case() -> TarCase {
    TarCase {
        label: "250MB/42k files",
        spec: TarSpec {
            files: 42_000,
            dirs: 2_000,
            payload: 215_000_000,
            median: 2048,
            large_files: 0,
            large_size: 0,
            seed: 1,
        },
    }
}

/// The large layer: the reference set plus 4 × 192 MiB files (~1.05 GB).
fn large_case() -> TarCase {
    let mut c = reference_case();
    c.label = "1GB (42k files + 4×192MiB)";
    c.spec.large_files = 4;
    c.spec.large_size = 192 << 20;
    c.spec.seed = 2;
    c
}

/// Small for --quick, else the reference and the large layer.
fn cases(ctx: &Ctx) -> Vec<TarCase> {
    if ctx.quick {
        vec![small_case()]
    } else {
        vec![reference_case(), large_case()]
    }
}

fn make_tar(ctx: &Ctx, case: &TarCase, name: &str) -> Result<(PathBuf, TarStats)> {
    ctx.say(format!("generating the {} tar", case.label));
    let path = ctx.scratch.join(name);
    let st = gen_tar(&path, &case.spec)?;
    ctx.progress.println(&format!(
        "{}: {:.1} MB tar, {} entries ({} files, {} dirs), {:.1} MB of file data",
        case.label,
        st.tar_bytes as f64 / 1e6,
        st.entries,
        st.files,
        st.dirs,
        st.payload as f64 / 1e6
    ));
    Ok((path, st))
}

/// Create + ApplyDiff of `tar` as a new layer; returns (seconds, layer id).
fn lamina_apply(c: &mut Session, tar: &Path) -> Result<(f64, String)> {
    let id = hex_id(now_seed());
    let mut f = fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
    let t0 = Instant::now();
    c.call(
        "GraphDriver.Create",
        &json!({"ID": id, "Parent": "", "MountLabel": "", "StorageOpt": null}),
    )?;
    c.apply_diff(&id, "", &mut f)?;
    Ok((t0.elapsed().as_secs_f64(), id))
}

/// GNU `tar -xf` into a new directory plus `sync -f` on it (one syncfs); returns seconds.
/// Also returns tar's CPU seconds (user + sys) when GNU time is installed to report them.
fn gnu_tar_apply(tar: &Path, dest: &Path) -> Result<(f64, Option<f64>)> {
    fs::create_dir_all(dest)?;
    let timed = Path::new(GNU_TIME).exists();
    let mut cmd = if timed {
        let mut c = Command::new(GNU_TIME);
        c.args(["-f", "cpu_s=%U %S", "tar"]);
        c
    } else {
        Command::new("tar")
    };
    cmd.arg("-xf").arg(tar).arg("-C").arg(dest);
    let t0 = Instant::now();
    let out = run_checked(&mut cmd)?;
    run_checked(Command::new("sync").arg("-f").arg(dest))?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = timed
        .then(|| {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .find_map(|l| l.trim().strip_prefix("cpu_s="))?
                .to_owned();
            line.split_whitespace()
                .map(|v| v.parse::<f64>().ok())
                .sum::<Option<f64>>()
        })
        .flatten();
    Ok((wall, cpu))
}

/// GNU time, for the CPU time and peak RSS of GNU tar.
const GNU_TIME: &str = "/usr/bin/time";

fn remove_tree(dir: &Path) -> Result<()> {
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    run_checked(
        Command::new("sync")
            .arg("-f")
            .arg(dir.parent().unwrap_or(Path::new("/"))),
    )?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// applydiff
// ------------------------------------------------------------------------------------------------------------

const APPLY_GOAL: &str = "<= 1.0x gnu-tar+syncfs";

fn applydiff(ctx: &Ctx, out: &mut Vec<Figure>) -> Result<()> {
    let cases = cases(ctx);
    let mut tars = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        tars.push(make_tar(ctx, case, &format!("layer{i}.tar"))?.0);
    }

    // 1. Straight through the plugin socket vs GNU tar, runs alternating so drift hits both alike.
    {
        let lamina = start(lamina(ctx, "lamina"));
        let mut c = graph_session(&lamina)?;
        for (case, tar) in cases.iter().zip(&tars) {
            let mut gnu = Figure::new("applydiff", case.label, "gnu-tar+syncfs", "wall", Unit::Seconds);
            let mut lam =
                Figure::new("applydiff", case.label, "lamina", "wall", Unit::Seconds).goal(APPLY_GOAL);
            let mut gnu_cpu = Figure::new(
                "applydiff",
                case.label,
                "gnu-tar+syncfs",
                "CPU (user+sys)",
                Unit::Seconds,
            );
            let mut lam_cpu = Figure::new("applydiff", case.label, "lamina", "CPU (user+sys)", Unit::Seconds);
            for run in 1..=ctx.runs {
                ctx.say(format!("{}: GNU tar run {run}/{}", case.label, ctx.runs));
                let dest = ctx.scratch.join("gnutar");
                drop_caches(&ctx.scratch)?;
                warm_file(tar)?;
                let (wall, cpu) = gnu_tar_apply(tar, &dest)?;
                gnu.push(wall);
                if let Some(cpu) = cpu {
                    gnu_cpu.push(cpu);
                }
                remove_tree(&dest)?;

                ctx.say(format!("{}: lamina run {run}/{}", case.label, ctx.runs));
                drop_caches(&ctx.scratch)?;
                warm_file(tar)?;
                let cpu0 = proc_cpu_secs(&lamina.pid().unwrap_or(0).to_string());
                let (secs, id) = lamina_apply(&mut c, tar)?;
                let cpu1 = proc_cpu_secs(&lamina.pid().unwrap_or(0).to_string());
                lam.push(secs);
                if let (Some(a), Some(b)) = (cpu0, cpu1) {
                    lam_cpu.push(b - a);
                }
                c.call("GraphDriver.Remove", &json!({"ID": id}))?;
            }
            out.push(lam);
            out.push(gnu);
            out.push(lam_cpu);
            if !gnu_cpu.samples.is_empty() {
                out.push(gnu_cpu);
            }
        }
    }

    // 2. docker load of an image made of the same layer: dockerd on lamina vs dockerd on overlay2.
    ctx.say("starting dockerd on overlay2 and on lamina");
    let plugin = unique_name("bench");
    let lamina = start(
        lamina(ctx, "lamina-docker").plugin_socket(&Path::new(PLUGIN_DIR).join(format!("{plugin}.sock"))),
    );
    let on_lamina = dockerd(ctx, "dockerd-lamina", &plugin)?;
    let on_overlay2 = dockerd(ctx, "dockerd-overlay2", "overlay2")?;
    for (i, (case, tar)) in cases.iter().zip(&tars).enumerate() {
        ctx.say(format!("{}: building the image tar", case.label));
        let tag = format!("lamina-bench/layer{i}:latest");
        let image = image_tar(ctx, tar, &tag, i)?;
        let label = format!("docker load {}", case.label);
        let mut lam = Figure::new("applydiff", &label, "lamina", "wall", Unit::Seconds);
        let mut ovl = Figure::new("applydiff", &label, "overlay2", "wall", Unit::Seconds);
        for run in 1..=ctx.runs {
            for (d, fig, name) in [
                (&on_overlay2, &mut ovl, "overlay2"),
                (&on_lamina, &mut lam, "lamina"),
            ] {
                ctx.say(format!("{label}: {name} run {run}/{}", ctx.runs));
                drop_caches(&ctx.scratch)?;
                warm_file(&image)?;
                let image_s = image.to_string_lossy();
                let t0 = Instant::now();
                d.ok(&["load", "-q", "-i", &image_s]);
                fig.push(t0.elapsed().as_secs_f64());
                d.ok(&["rmi", &tag]);
            }
        }
        out.push(lam);
        out.push(ovl);
        fs::remove_file(&image).ok();
    }
    drop(on_lamina);
    drop(on_overlay2);
    drop(lamina);
    Ok(())
}

/// A `docker save`-format archive (manifest.json, config, one layer.tar) holding `layer` as its only layer,
/// tagged `tag`.
fn image_tar(ctx: &Ctx, layer: &Path, tag: &str, n: usize) -> Result<PathBuf> {
    let dir = ctx.scratch.join(format!("image{n}"));
    let layer_dir = dir.join("layer");
    fs::create_dir_all(&layer_dir)?;
    fs::hard_link(layer, layer_dir.join("layer.tar")).context("linking the layer into the image dir")?;
    let sum = run_checked(Command::new("sha256sum").arg(layer))?;
    let diff_id = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    if diff_id.len() != 64 {
        bail!("sha256sum printed no digest for {}", layer.display());
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "lamina bench"}],
    });
    fs::write(dir.join("config.json"), serde_json::to_vec(&config)?)?;
    let manifest = json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]);
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let image = ctx.scratch.join(format!("image{n}.tar"));
    run_checked(
        Command::new("tar")
            .arg("-cf")
            .arg(&image)
            .arg("-C")
            .arg(&dir)
            .args(["manifest.json", "config.json", "layer"]),
    )?;
    fs::remove_dir_all(&dir)?;
    Ok(image)
}

// ------------------------------------------------------------------------------------------------------------
// getput
// ------------------------------------------------------------------------------------------------------------

const DEPTHS: [usize; 4] = [1, 10, 64, 128];

/// Per-call latencies of one run, seconds.
#[derive(Default)]
struct Lat {
    create_get: Vec<f64>,
    get: Vec<f64>,
    put: Vec<f64>,
    put_remove: Vec<f64>,
}

impl Lat {
    /// One cycle from its five instants: start, created, got, put, removed.
    fn record(&mut self, [t0, t1, t2, t3, t4]: [Instant; 5]) {
        self.create_get.push((t2 - t0).as_secs_f64());
        self.get.push((t2 - t1).as_secs_f64());
        self.put.push((t3 - t2).as_secs_f64());
        self.put_remove.push((t4 - t2).as_secs_f64());
    }
}

fn get_goal(depth: usize) -> Option<&'static str> {
    match depth {
        0..=10 => Some("<= 0.3 ms"),
        128 => Some("<= 0.7 ms"),
        _ => None,
    }
}

fn getput(ctx: &Ctx, out: &mut Vec<Figure>) -> Result<()> {
    let iters = ctx.pick(20, 500);
    let warmup = ctx.pick(3, 30);
    let mut spec = lamina(ctx, "lamina");
    // lamina's own latency histograms: the server-side time of each Get, without the RPC.
    let metrics = spec.dir().join("metrics.sock");
    spec.extra_args = vec!["--metrics-address".into(), format!("unix:{}", metrics.display())];
    let lamina = start(spec);
    let mut c = graph_session(&lamina)?;
    for depth in DEPTHS {
        let case = format!("depth {depth}");
        ctx.say(format!("{case}: building the layer chain"));
        let seed = now_seed();
        let mut ids: Vec<String> = Vec::with_capacity(depth);
        for i in 0..depth {
            let id = hex_id(seed.wrapping_add(i as u64));
            let parent = ids.last().cloned().unwrap_or_default();
            c.call(
                "GraphDriver.Create",
                &json!({"ID": id, "Parent": parent, "MountLabel": "", "StorageOpt": null}),
            )?;
            c.apply_diff(&id, &parent, &mut tiny_tar(&i.to_string())?.as_slice())?;
            ids.push(id);
        }
        let top = ids.last().cloned().unwrap_or_default();
        let floor = FloorDir::new(&ctx.scratch.join(format!("floor{depth}")), depth)?;

        let mut figs: Vec<Figure> = Vec::new();
        let metric = |subject: &str, m: &str| Figure::new("getput", &case, subject, m, Unit::Micros);
        let names = [
            "Get p50",
            "Get p99",
            "Put p50",
            "Put p99",
            "Create+Get p50",
            "Create+Get p99",
            "Put+Remove p50",
            "Put+Remove p99",
        ];
        for subject in ["lamina", "overlay-syscalls"] {
            for m in names {
                let mut f = metric(subject, m);
                if subject != "lamina" {
                    f = f.floor();
                }
                if subject == "lamina" {
                    if m == "Get p50" {
                        if let Some(g) = get_goal(depth) {
                            f = f.goal(g);
                        }
                    } else if m == "Get p99" {
                        f = f.goal("<= 2 ms");
                    }
                }
                figs.push(f);
            }
        }
        // lamina's own part of a Get (RPC, lookups, option string): its p50 minus the floor's, per run.
        let mut own =
            Figure::new("getput", &case, "lamina", "Get p50 own part", Unit::Micros).goal("<= 0.06 ms");
        // The same part for a server that does nothing but the floor's mount, woken by its request over a
        // socket: what any storage daemon pays beyond the in-line floor (the hand-off and a woken thread's
        // kernel work), and lamina's own part beyond it.
        let mut served_own = Figure::new(
            "getput",
            &case,
            "overlay-syscalls-served",
            "Get p50 own part",
            Unit::Micros,
        )
        .floor();
        let mut served_get = Figure::new(
            "getput",
            &case,
            "overlay-syscalls-served",
            "Get p50",
            Unit::Micros,
        )
        .bound();
        let mut beyond = Figure::new(
            "getput",
            &case,
            "lamina",
            "Get p50 own part beyond a served floor",
            Unit::Micros,
        );
        let mut server = Figure::new("getput", &case, "lamina", "Get server-side mean", Unit::Micros);
        // The RPC and the lookups of a Get alone: a Get of a layer that is already mounted answers its path
        // without mounting anything (the layer's mount count goes up and its Put takes it down again).
        let mut held = Figure::new(
            "getput",
            &case,
            "lamina",
            "Get p50 of a mounted layer (RPC + lookups)",
            Unit::Micros,
        );
        for run in 1..=ctx.runs {
            ctx.say(format!("{case}: lamina, run {run}/{} ({iters} cycles)", ctx.runs));
            let (sum0, n0) = served(&metrics, "Get")?;
            let lam = lamina_cycles(
                &mut c,
                &top,
                warmup,
                iters,
                seed.rotate_left(17).wrapping_add(run as u64),
            )?;
            let (sum1, n1) = served(&metrics, "Get")?;
            server.push((sum1 - sum0) / (n1 - n0).max(1.0) * 1e6);
            let hits = mounted_gets(&mut c, &top, iters, seed.rotate_left(29).wrapping_add(run as u64))?;
            held.push(percentile(&hits, 50.0) * 1e6);
            ctx.say(format!(
                "{case}: overlay syscalls, run {run}/{} ({iters} cycles)",
                ctx.runs
            ));
            let bare = floor.cycles(warmup, iters)?;
            let served = floor.served_gets(warmup, iters)?;
            let (lam50, bare50, served50) = (
                percentile(&lam.get, 50.0),
                percentile(&bare.get, 50.0),
                percentile(&served, 50.0),
            );
            own.push((lam50 - bare50) * 1e6);
            served_own.push((served50 - bare50) * 1e6);
            served_get.push(served50 * 1e6);
            beyond.push((lam50 - served50) * 1e6);
            for (k, lat) in [(0usize, &lam), (8, &bare)] {
                for (j, (v, p)) in [
                    (&lat.get, 50.0),
                    (&lat.get, 99.0),
                    (&lat.put, 50.0),
                    (&lat.put, 99.0),
                    (&lat.create_get, 50.0),
                    (&lat.create_get, 99.0),
                    (&lat.put_remove, 50.0),
                    (&lat.put_remove, 99.0),
                ]
                .into_iter()
                .enumerate()
                {
                    figs[k + j].push(percentile(v, p) * 1e6);
                }
            }
        }
        out.extend(figs);
        out.push(own);
        // The served floor is also the lower bound of a Get and of its own part: no daemon answers sooner.
        out.push(served_own.clone().bound());
        out.push(served_own);
        out.push(served_get);
        out.push(beyond);
        out.push(held);
        out.push(server);
        for id in ids.iter().rev() {
            c.call("GraphDriver.Remove", &json!({"ID": id}))?;
        }
        floor.remove();
    }
    Ok(())
}

/// Seconds spent in, and number of, lamina's GraphDriver `op` calls so far, from its metrics socket (the time
/// from the request's dispatch to its answer, without the RPC).
fn served(metrics: &Path, op: &str) -> Result<(f64, f64)> {
    let h = Served::read(metrics, "graphdriver", op)?;
    anyhow::ensure!(
        !h.buckets.is_empty(),
        "no GraphDriver.{op} histogram in lamina's metrics"
    );
    Ok((h.sum, h.count))
}

/// `iters` Gets of a container layer on `parent` that an untimed Get keeps mounted, each followed by its Put, in
/// seconds: what a Get costs without a mount (the round trip over the socket, the name's lookup and the mount
/// count).
fn mounted_gets(c: &mut Session, parent: &str, iters: usize, seed: u64) -> Result<Vec<f64>> {
    let id = hex_id(seed);
    c.call(
        "GraphDriver.CreateReadWrite",
        &json!({"ID": id, "Parent": parent, "MountLabel": "", "StorageOpt": null}),
    )?;
    let get = json!({"ID": id, "MountLabel": ""});
    let put = json!({"ID": id});
    c.call("GraphDriver.Get", &get)?;
    let mut hits = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        c.call("GraphDriver.Get", &get)?;
        hits.push(t0.elapsed().as_secs_f64());
        c.call("GraphDriver.Put", &put)?;
    }
    c.call("GraphDriver.Put", &put)?;
    c.call("GraphDriver.Remove", &put)?;
    Ok(hits)
}

/// `iters` container-like cycles after `warmup` untimed ones: CreateReadWrite, Get, Put, Remove.
fn lamina_cycles(c: &mut Session, parent: &str, warmup: usize, iters: usize, seed: u64) -> Result<Lat> {
    let mut lat = Lat::default();
    for i in 0..warmup + iters {
        let id = hex_id(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        let t0 = Instant::now();
        c.call(
            "GraphDriver.CreateReadWrite",
            &json!({"ID": id, "Parent": parent, "MountLabel": "", "StorageOpt": null}),
        )?;
        let t1 = Instant::now();
        let v = c.call("GraphDriver.Get", &json!({"ID": id, "MountLabel": ""}))?;
        let t2 = Instant::now();
        c.call("GraphDriver.Put", &json!({"ID": id}))?;
        let t3 = Instant::now();
        c.call("GraphDriver.Remove", &json!({"ID": id}))?;
        let t4 = Instant::now();
        if v.get("Dir").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
            bail!("Get replied without a Dir: {v}");
        }
        if i >= warmup {
            lat.record([t0, t1, t2, t3, t4]);
        }
    }
    Ok(lat)
}

/// The floor: `depth` tiny lower directories on the same filesystem, laid out as lamina lays out its layers
/// (`<base>/data/layers/<n>/diff`, at the depth lamina's data root has below the scratch directory: the kernel
/// walks every path and checks every ancestor of each layer at mount time, so a shallower floor would count
/// that walk as lamina's), mounted as an overlay with a fresh layer directory (`diff`, `work`, `merged`) per
/// cycle through lamina-sys (the calls lamina makes), unmounted detached as lamina's Put.
pub(crate) struct FloorDir {
    base: PathBuf,
    layers: PathBuf,
    lowers: Vec<PathBuf>,
}

impl FloorDir {
    pub(crate) fn new(base: &Path, depth: usize) -> Result<FloorDir> {
        let layers = base.join("data").join("layers");
        let mut lowers = Vec::with_capacity(depth);
        for i in 0..depth {
            let l = layers.join(format!("{:x}", i + 1)).join("diff");
            fs::create_dir_all(&l)?;
            fs::write(l.join(format!("layer-{i}.txt")), format!("layer {i}\n"))?;
            lowers.push(l);
        }
        // Top-most lower first, as lamina orders them.
        lowers.reverse();
        Ok(FloorDir {
            base: base.to_path_buf(),
            layers,
            lowers,
        })
    }

    fn cycles(&self, warmup: usize, iters: usize) -> Result<Lat> {
        use lamina_sys::mount::unmount;
        let mut lat = Lat::default();
        for i in 0..warmup + iters {
            let dir = self.layers.join(format!("c{i:x}"));
            let (upper, work, merged) = (dir.join("diff"), dir.join("work"), dir.join("merged"));
            let t0 = Instant::now();
            fs::create_dir(&dir)?;
            fs::create_dir(&upper)?;
            fs::create_dir(&work)?;
            fs::create_dir(&merged)?;
            let t1 = Instant::now();
            self.mount(&dir)?;
            let t2 = Instant::now();
            unmount(&merged, true).with_context(|| format!("unmounting {}", merged.display()))?;
            let t3 = Instant::now();
            fs::remove_dir_all(&dir)?;
            let t4 = Instant::now();
            if i >= warmup {
                lat.record([t0, t1, t2, t3, t4]);
            }
        }
        Ok(lat)
    }

    /// The floor's overlay of the fresh layer directory `dir` (`diff`, `work`, `merged`), mounted on `merged`.
    fn mount(&self, dir: &Path) -> Result<()> {
        let spec = lamina_sys::mount::OverlaySpec {
            lowers: self.lowers.clone(),
            upper: Some(dir.join("diff")),
            work: Some(dir.join("work")),
            label: None,
            read_only: false,
        };
        let merged = dir.join("merged");
        lamina_sys::mount::mount_overlay(&merged, &spec)
            .with_context(|| format!("mounting {}", merged.display()))
    }

    /// The Gets of [`FloorDir::cycles`] served: each mount is done by a thread that waits for its request (the
    /// cycle's number, 8 bytes) on one end of a socket pair and answers one byte, as a daemon that does nothing
    /// else would; the rest of each cycle as in `cycles`, untimed. The round trips of the `iters` cycles after
    /// `warmup`, in seconds.
    fn served_gets(&self, warmup: usize, iters: usize) -> Result<Vec<f64>> {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let (mut client, mut server) = UnixStream::pair()?;
        let dir_of = |i: u64| self.layers.join(format!("s{i:x}"));
        thread::scope(|scope| {
            let worker = scope.spawn(move || -> Result<()> {
                let mut req = [0u8; 8];
                while server.read_exact(&mut req).is_ok() {
                    let done = self.mount(&dir_of(u64::from_le_bytes(req)));
                    server.write_all(&[u8::from(done.is_err())])?;
                    done?;
                }
                Ok(())
            });
            let mut gets = Vec::with_capacity(iters);
            let cycles = (|| -> Result<()> {
                for i in 0..(warmup + iters) as u64 {
                    let dir = dir_of(i);
                    for d in [
                        dir.clone(),
                        dir.join("diff"),
                        dir.join("work"),
                        dir.join("merged"),
                    ] {
                        fs::create_dir(&d)?;
                    }
                    let t0 = Instant::now();
                    client.write_all(&i.to_le_bytes())?;
                    let mut answer = [0u8; 1];
                    client.read_exact(&mut answer)?;
                    let took = t0.elapsed().as_secs_f64();
                    if answer[0] != 0 {
                        bail!("the served floor's mount failed");
                    }
                    if i >= warmup as u64 {
                        gets.push(took);
                    }
                    lamina_sys::mount::unmount(&dir.join("merged"), true)?;
                    fs::remove_dir_all(&dir)?;
                }
                Ok(())
            })();
            // The worker ends when its end of the pair reads nothing more.
            drop(client);
            let worker = worker
                .join()
                .map_err(|_| anyhow::anyhow!("the served floor's thread panicked"))?;
            // A failed mount is the cause of the failed cycle: its error first.
            worker.and(cycles).map(|()| gets)
        })
    }

    /// The kernel work of `n` containers' storage as dockerd asks for it (per container: two layer directories
    /// made and removed, three overlay mounts and unmounts), in seconds.
    pub(crate) fn containers(&self, n: usize) -> Result<f64> {
        let lat = self.cycles(0, 2 * n)?;
        let full: f64 = lat
            .create_get
            .iter()
            .zip(&lat.put_remove)
            .map(|(a, b)| a + b)
            .sum();
        let again: f64 = lat.get.iter().zip(&lat.put).take(n).map(|(a, b)| a + b).sum();
        Ok(full + again)
    }

    pub(crate) fn remove(self) {
        unmount_under(&self.base);
        let _ = fs::remove_dir_all(&self.base);
    }
}

// ------------------------------------------------------------------------------------------------------------
// start10k
// ------------------------------------------------------------------------------------------------------------

fn start10k(ctx: &Ctx, out: &mut Vec<Figure>) -> Result<()> {
    let n = ctx.pick(1_000, 10_000);
    let case = if ctx.quick {
        "1,000 layers"
    } else {
        "10,000 layers"
    };
    {
        let lamina = start(lamina(ctx, "full"));
        // Full: image layers with content (Create + ApplyDiff). Quick: Create only (an ApplyDiff costs two
        // syncfs; start-up does the same per-layer work for empty and filled layers).
        build_layers(ctx, &lamina, n, !ctx.quick)?;
    }
    drop(start(lamina(ctx, "empty")));

    let mut figs = Vec::new();
    for (tag, subject) in [("full", "lamina"), ("empty", "lamina, empty store")] {
        let mut cold = Figure::new("start10k", case, subject, "start (cold cache)", Unit::Seconds);
        let mut warm = Figure::new("start10k", case, subject, "start (warm cache)", Unit::Seconds);
        if subject == "lamina" {
            cold = cold.goal("<= 1 s");
            warm = warm.goal("<= 1 s");
        }
        for run in 1..=ctx.runs {
            ctx.say(format!("{subject}: cold start {run}/{}", ctx.runs));
            drop_caches(&ctx.scratch)?;
            let mut p = start(lamina(ctx, tag));
            cold.push(p.ready_after.as_secs_f64());
            stop(&mut p)?;
            ctx.say(format!("{subject}: warm start {run}/{}", ctx.runs));
            let mut p = start(lamina(ctx, tag));
            warm.push(p.ready_after.as_secs_f64());
            stop(&mut p)?;
        }
        figs.push(cold);
        figs.push(warm);
    }
    out.extend(figs);
    Ok(())
}

/// Fills the store of a running daemon with `n` image layers (Create, plus an ApplyDiff of a one-file tar when
/// `apply`), in chains of 50, from 4 clients at once.
fn build_layers(ctx: &Ctx, lamina: &Lamina, n: usize, apply: bool) -> Result<()> {
    const CLIENTS: usize = 4;
    const CHAIN: usize = 50;
    let started = Instant::now();
    let seed = now_seed();
    let results: Vec<Result<()>> = thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let mut c = session(lamina);
                let home = lamina.dir().join("home");
                s.spawn(move || -> Result<()> {
                    c.handshake(&home)?;
                    let mut parent = String::new();
                    for i in (t..n).step_by(CLIENTS) {
                        let id = hex_id(seed.wrapping_add(i as u64));
                        if (i / CLIENTS).is_multiple_of(CHAIN) {
                            parent.clear();
                        }
                        c.call(
                            "GraphDriver.Create",
                            &json!({"ID": id, "Parent": parent, "MountLabel": "", "StorageOpt": null}),
                        )?;
                        if apply {
                            c.apply_diff(&id, &parent, &mut tiny_tar(&i.to_string())?.as_slice())?;
                        }
                        parent = id;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut progress_at = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            if progress_at.elapsed() > Duration::from_secs(1) {
                ctx.say(format!(
                    "building {n} layers ({:.0} s)",
                    started.elapsed().as_secs_f64()
                ));
                progress_at = Instant::now();
            }
            thread::sleep(Duration::from_millis(100));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a layer-building thread panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// rss
// ------------------------------------------------------------------------------------------------------------

fn rss(ctx: &Ctx, out: &mut Vec<Figure>) -> Result<()> {
    let cases = if ctx.quick {
        vec![small_case()]
    } else {
        vec![reference_case(), large_case()]
    };
    for (i, case) in cases.iter().enumerate() {
        let (tar, _) = make_tar(ctx, case, &format!("layer{i}.tar"))?;
        let mut lam = Figure::new("rss", case.label, "lamina", "peak RSS", Unit::MiB).goal("<= 64 MiB");
        let mut gnu = Figure::new("rss", case.label, "gnu-tar", "peak RSS", Unit::MiB);
        for run in 1..=ctx.runs {
            ctx.say(format!("{}: lamina run {run}/{}", case.label, ctx.runs));
            // A fresh daemon per run: its peak covers this one ApplyDiff (and start-up).
            let lamina = start(lamina(ctx, &format!("lamina{i}-{run}")));
            let mut c = graph_session(&lamina)?;
            drop_caches(&ctx.scratch)?;
            warm_file(&tar)?;
            let sampler = RssSampler::start(lamina.pid().unwrap_or(0), Duration::from_millis(10));
            lamina_apply(&mut c, &tar)?;
            lam.push(sampler.finish().peak_mib());
            drop(c);
            drop(lamina);

            ctx.say(format!("{}: GNU tar run {run}/{}", case.label, ctx.runs));
            let dest = ctx.scratch.join("gnutar");
            fs::create_dir_all(&dest)?;
            drop_caches(&ctx.scratch)?;
            warm_file(&tar)?;
            gnu.push(gnu_tar_peak_mib(&tar, &dest)?);
            remove_tree(&dest)?;
        }
        out.push(lam);
        out.push(gnu);
        fs::remove_file(&tar).ok();
    }
    Ok(())
}

/// GNU tar's peak RSS (MiB) extracting `tar` into `dest`: GNU time's `%M` when installed, else VmRSS
/// sampled every 5 ms.
fn gnu_tar_peak_mib(tar: &Path, dest: &Path) -> Result<f64> {
    if !Path::new(GNU_TIME).exists() {
        let mut child = Command::new("tar")
            .arg("-xf")
            .arg(tar)
            .arg("-C")
            .arg(dest)
            .spawn()
            .context("starting tar")?;
        let sampler = RssSampler::start(child.id(), Duration::from_millis(5));
        let st = child.wait()?;
        let peak = sampler.finish();
        if !st.success() {
            bail!("tar -xf {} failed ({st})", tar.display());
        }
        return Ok(peak.rss_kib as f64 / 1024.0);
    }
    let out = run_checked(
        Command::new(GNU_TIME)
            .args(["-f", "maxrss_kib=%M", "tar", "-xf"])
            .arg(tar)
            .arg("-C")
            .arg(dest),
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    let kib: f64 = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("maxrss_kib="))
        .and_then(|v| v.trim().parse().ok())
        .context("GNU time printed no maxrss")?;
    Ok(kib / 1024.0)
}
