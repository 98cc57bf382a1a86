//! `snapshotter`: lamina as containerd's proxy snapshotter against containerd's built-in `overlayfs`
//! snapshotter, both driven through one private containerd 1.6.
//!
//! - **Calls.** containerd's own Snapshots gRPC service on its socket, with `snapshotter: "lamina"` or
//!   `"overlayfs"` in each request and the `containerd-namespace` header: per depth (1 and 128 committed
//!   parents), `iters` × (Prepare + Mounts timed together; Commit timed; Remove of the commit untimed). p50 and
//!   p99 per run; the Mounts alone (p50) too: a call that changes nothing, so the difference between the two
//!   snapshotters' Mounts is mostly what reaching lamina through containerd's proxy costs. Both paths include containerd's metadata store (bolt); lamina has one more gRPC hop
//!   (containerd → lamina's socket). lamina's server-side time of Prepare, Mounts and Commit (p50 from its own
//!   latency histograms, read through its metrics socket around the timed cycles), and the same cycles sent
//!   straight to lamina's socket (one gRPC hop, no containerd), are reported beside them.
//! - **Proxy floor.** The same cycles through the same containerd to a third snapshotter, `proxy-floor`: a
//!   snapshotter in memory that does no storage work, served by lamina's own snapshots service on a socket of
//!   its own (`proxy_floor.rs`) and declared as a second proxy plugin. What any proxy snapshotter pays for a
//!   call through containerd; the floor column of Prepare+Mounts and of the Mounts alone, and a baseline
//!   row of Commit. The floor of lamina's server-side Prepare is one durable commit of a small record into a
//!   fresh redb database on the same filesystem whose table holds as many rows as lamina's does then
//!   (`durable-record`), timed after lamina's cycles of each run, in a tight loop and with a pause of 1 ms
//!   before each (`durable-record-paced`), as lamina's calls come; the proxy floor's own service time per call
//!   (the same service as lamina's, with its hand-off to the blocking pool and back) is a floor row too, and
//!   the lower bound of lamina's server-side time adds the two.
//! - **Unpack.** `ctr images import` of an OCI archive of uncompressed layers built here, with each
//!   snapshotter, timed alone and followed by a `sync` (lamina makes each layer durable with one `syncfs`;
//!   containerd's overlayfs snapshotter does not sync), minus the same import with `--no-unpack` (content
//!   ingest only) measured in the same run. The image is removed and containerd's GC run between imports.

use std::collections::HashMap;
use std::fs;
use std::io::BufWriter;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use lamina_snapshotter::proto::containerd::services::snapshots::v1 as pb;
use lamina_snapshotter::tonic;
use pb::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

use super::engines::{start, Lamina, Served};
use super::engines_ctr::{
    busybox_tree, drop_caches, oci_archive, percentile, run as run_cmd, RunDir, TarWriter, CTR_NAMESPACE,
    PROXY_NAME,
};
use super::proxy_floor::{FloorServer, FLOOR_NAME};
use super::{Ctx, Figure, Unit, Workload};
use lamina_testkit::containerd::Containerd;

/// The workload.
pub const SNAPSHOTTER: Workload = Workload {
    name: "snapshotter",
    about: "containerd snapshotter: Prepare+Mounts and Commit p50/p99 at depth 1 and 128, and image unpack \
            (ctr images import), lamina (proxy plugin) vs containerd's overlayfs, through one containerd 1.6",
    per_fs: true,
    run,
};

const NAME: &str = "snapshotter";
const BASELINE: &str = "overlayfs";
/// overlayfs's Commit plus one `syncfs` of the same filesystem: the floor of a durable Commit.
const SYNC_BASELINE: &str = "overlayfs+syncfs";
const GC_ROOT: &str = "containerd.io/gc.root";
/// One durable commit of a small record into a fresh redb database on the same filesystem: the floor of
/// lamina's server-side Prepare, whose record must be durable before it answers.
const RECORD_FLOOR: &str = "durable-record";
/// The same, each record after a pause of [`RECORD_PAUSE`], as lamina's Prepare comes after the calls of the
/// cycle before it.
const PACED_RECORD_FLOOR: &str = "durable-record-paced";
/// About the time between two of lamina's calls in a cycle through containerd.
const RECORD_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);
/// One `syncfs` of the filesystem after a `mkdir`, timed after each of overlayfs's Commits: a part of the lower
/// bound of lamina's Commit.
const SYNCFS: &str = "syncfs";
/// The snapshotters driven through containerd, in the order each run measures them.
const THROUGH_CONTAINERD: [&str; 3] = [PROXY_NAME, BASELINE, FLOOR_NAME];

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "containerd-namespace",
        CTR_NAMESPACE.parse().expect("ascii namespace"),
    );
    r
}

fn labels() -> HashMap<String, String> {
    HashMap::from([(GC_ROOT.to_string(), "2023-11-14T22:13:20Z".to_string())])
}

/// Prepare of `key` on `parent` (labelled as a GC root).
async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    snapshotter: &str,
    key: &str,
    parent: &str,
) -> Result<(), tonic::Status> {
    let req = pb::PrepareSnapshotRequest {
        snapshotter: snapshotter.into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(),
    };
    c.prepare(request(req)).await.map(|_| ())
}

/// Commit of `key` as `name` (labelled as a GC root).
async fn commit(
    c: &mut SnapshotsClient<Channel>,
    snapshotter: &str,
    name: &str,
    key: &str,
) -> Result<(), tonic::Status> {
    let req = pb::CommitSnapshotRequest {
        snapshotter: snapshotter.into(),
        name: name.into(),
        key: key.into(),
        labels: labels(),
        parent: String::new(),
    };
    c.commit(request(req)).await.map(|_| ())
}

/// The timed parts of one cycle.
struct Timed {
    /// Prepare + Mounts.
    prepare: Duration,
    /// The Mounts alone: a call that changes nothing, so through containerd mostly the cost of reaching the
    /// snapshotter (lamina: the proxy's gRPC hop).
    mounts: Duration,
    commit: Duration,
}

/// One Prepare(+Mounts)/Commit/Remove cycle on top of `parent`.
async fn cycle(
    c: &mut SnapshotsClient<Channel>,
    snapshotter: &str,
    key: &str,
    parent: &str,
) -> anyhow::Result<Timed> {
    let t = Instant::now();
    prepare(c, snapshotter, key, parent)
        .await
        .with_context(|| format!("{snapshotter}: Prepare {key}"))?;
    let tm = Instant::now();
    let mounts = c
        .mounts(request(pb::MountsRequest {
            snapshotter: snapshotter.into(),
            key: key.into(),
        }))
        .await
        .with_context(|| format!("{snapshotter}: Mounts {key}"))?;
    let mounts_alone = tm.elapsed();
    let prepare = t.elapsed();
    anyhow::ensure!(
        !mounts.get_ref().mounts.is_empty(),
        "{snapshotter}: no mounts for {key}"
    );
    let name = format!("{key}-c");
    let t = Instant::now();
    commit(c, snapshotter, &name, key)
        .await
        .with_context(|| format!("{snapshotter}: Commit {key}"))?;
    let commit = t.elapsed();
    c.remove(request(pb::RemoveSnapshotRequest {
        snapshotter: snapshotter.into(),
        key: name,
    }))
    .await
    .with_context(|| format!("{snapshotter}: Remove {key}"))?;
    Ok(Timed {
        prepare,
        mounts: mounts_alone,
        commit,
    })
}

/// Builds a chain of `depth` committed snapshots; returns the top one's name.
async fn chain(c: &mut SnapshotsClient<Channel>, snapshotter: &str, depth: usize) -> anyhow::Result<String> {
    let mut parent = String::new();
    for i in 0..depth {
        let key = format!("chain{depth}-{i}");
        prepare(c, snapshotter, &key, &parent)
            .await
            .with_context(|| format!("{snapshotter}: Prepare {key}"))?;
        let name = format!("{key}-c");
        commit(c, snapshotter, &name, &key)
            .await
            .with_context(|| format!("{snapshotter}: Commit chain {i}"))?;
        parent = name;
    }
    Ok(parent)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The snapshotter calls whose server-side time is reported (from lamina's latency histograms).
const SERVED: [&str; 3] = ["Prepare", "Mounts", "Commit"];
/// The snapshotter name of the calls made straight to lamina's socket (its own store namespace).
const DIRECT: &str = "bench-direct";

fn served_all(metrics: &Path) -> anyhow::Result<Vec<Served>> {
    SERVED
        .iter()
        .map(|op| Served::read(metrics, "snapshotter", op))
        .collect()
}

fn calls(
    ctx: &Ctx,
    ctrd: &Containerd,
    lamina_sock: &Path,
    metrics: &Path,
    floor: &FloorServer,
    figs: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let iters = if ctx.quick { 20 } else { 500 };
    // --quick: a shallower deep chain (building 128 layers per snapshotter costs seconds on a loaded machine).
    let depths: [usize; 2] = if ctx.quick { [1, 16] } else { [1, 128] };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = lamina_snapshotter::client::connect(&ctrd.address)
            .await
            .context("connect to containerd's socket")?;
        // The same calls straight to lamina's socket: what lamina costs with one gRPC hop and no containerd.
        let mut direct = lamina_snapshotter::client::connect(lamina_sock)
            .await
            .context("connect to lamina's snapshotter socket")?;
        // The records lamina's database holds during the timed cycles: the chains built so far, through
        // containerd and straight to its socket (each cycle removes what it made).
        let mut held = 0u64;
        for depth in depths {
            let case = format!("depth {depth}");
            ctx.say(format!("snapshot calls at depth {depth}"));
            let mut tops = HashMap::new();
            for sn in THROUGH_CONTAINERD {
                tops.insert(sn, chain(&mut client, sn, depth).await?);
            }
            let direct_top = chain(&mut direct, DIRECT, depth).await?;
            held += 2 * depth as u64;
            let mut out: HashMap<(&str, &str), Vec<f64>> = HashMap::new();
            for r in 0..ctx.runs {
                // Interleaved: each run measures the snapshotters back to back.
                for sn in THROUGH_CONTAINERD {
                    let top = &tops[sn];
                    // Warm-up (connections, caches).
                    for w in 0..5 {
                        cycle(&mut client, sn, &format!("warm{depth}-{r}-{w}"), top).await?;
                    }
                    let (mut p, mut m, mut c) = (
                        Vec::with_capacity(iters),
                        Vec::with_capacity(iters),
                        Vec::with_capacity(iters),
                    );
                    let before = if sn == PROXY_NAME {
                        served_all(metrics)?
                    } else {
                        Vec::new()
                    };
                    floor.served().clear();
                    for i in 0..iters {
                        let t = cycle(&mut client, sn, &format!("d{depth}-r{r}-{i}"), top).await?;
                        p.push(ms(t.prepare));
                        m.push(ms(t.mounts));
                        c.push(ms(t.commit));
                    }
                    out.entry((sn, "mounts"))
                        .or_default()
                        .push(percentile(&mut m, 50.0));
                    if sn == PROXY_NAME {
                        // lamina's own time per call (dispatch to answer) during the timed cycles.
                        for (i, after) in served_all(metrics)?.iter().enumerate() {
                            let (n, mean, p50) = after.since(&before[i], 0.5);
                            ctx.say(format!(
                                "depth {depth}: lamina served {n} {} calls, mean {:.3} ms, p50 ~{:.3} ms",
                                SERVED[i],
                                mean * 1e3,
                                p50 * 1e3
                            ));
                            out.entry((PROXY_NAME, SERVED[i])).or_default().push(p50 * 1e3);
                        }
                        for (floor, pause) in [
                            (RECORD_FLOOR, std::time::Duration::ZERO),
                            (PACED_RECORD_FLOOR, RECORD_PAUSE),
                        ] {
                            let mut records: Vec<f64> =
                                super::docker::durable_commits(&ctx.scratch, iters, pause, held)?
                                    .into_iter()
                                    .map(ms)
                                    .collect();
                            out.entry((floor, "Prepare"))
                                .or_default()
                                .push(percentile(&mut records, 50.0));
                        }
                        let (mut dp, mut dm, mut dc) = (
                            Vec::with_capacity(iters),
                            Vec::with_capacity(iters),
                            Vec::with_capacity(iters),
                        );
                        for w in 0..5 {
                            cycle(&mut direct, DIRECT, &format!("dwarm{depth}-{r}-{w}"), &direct_top).await?;
                        }
                        for i in 0..iters {
                            let key = format!("dd{depth}-r{r}-{i}");
                            let t = cycle(&mut direct, DIRECT, &key, &direct_top).await?;
                            dp.push(ms(t.prepare));
                            dm.push(ms(t.mounts));
                            dc.push(ms(t.commit));
                        }
                        for (metric, samples) in [
                            ("direct prepare+mounts", &mut dp),
                            ("direct mounts", &mut dm),
                            ("direct commit", &mut dc),
                        ] {
                            out.entry((PROXY_NAME, metric))
                                .or_default()
                                .push(percentile(samples, 50.0));
                        }
                    }
                    if sn == FLOOR_NAME {
                        // The floor's own service time per call: dispatch, the hand-off to the blocking pool and
                        // back, and a backend that does no storage work.
                        for op in SERVED {
                            let mut took: Vec<f64> = floor.served().take(op).into_iter().map(ms).collect();
                            if !took.is_empty() {
                                out.entry((FLOOR_NAME, op))
                                    .or_default()
                                    .push(percentile(&mut took, 50.0));
                            }
                        }
                    }
                    if sn == BASELINE {
                        // Commit's floor: overlayfs's commit plus one syncfs of the filesystem after a small
                        // change (what lamina adds to make the layer durable), measured alternately here.
                        let mut with_sync = Vec::with_capacity(iters);
                        let mut sync_alone = Vec::with_capacity(iters);
                        for (i, tc) in c.iter().enumerate() {
                            let d = ctx.scratch.join(format!("syncfs-{depth}-{r}-{i}"));
                            fs::create_dir(&d)?;
                            let t = Instant::now();
                            lamina_sys::mount::syncfs(&d)?;
                            let synced = ms(t.elapsed());
                            with_sync.push(tc + synced);
                            sync_alone.push(synced);
                            fs::remove_dir(&d)?;
                        }
                        out.entry((SYNC_BASELINE, "commit"))
                            .or_default()
                            .push(percentile(&mut with_sync, 50.0));
                        out.entry((SYNCFS, "commit"))
                            .or_default()
                            .push(percentile(&mut sync_alone, 50.0));
                    }
                    for (metric, samples) in [("prepare+mounts", &mut p), ("commit", &mut c)] {
                        out.entry((sn, metric))
                            .or_default()
                            .push(percentile(samples, 50.0));
                        let p99 = percentile(samples, 99.0);
                        out.entry((
                            sn,
                            if metric == "commit" {
                                "commit p99"
                            } else {
                                "prepare+mounts p99"
                            },
                        ))
                        .or_default()
                        .push(p99);
                    }
                }
            }
            // Lower bounds of lamina's figures, run by run: what a proxy snapshotter that records each snapshot
            // durably before it answers (and flushes a committed layer before its record) pays at least, from the
            // floors of the same run.
            let part = |k: (&str, &str)| out.get(&k).cloned().unwrap_or_default();
            let (paced, syncfs) = (part((PACED_RECORD_FLOOR, "Prepare")), part((SYNCFS, "commit")));
            let bounds = [
                (
                    "prepare+mounts p50",
                    format!("{FLOOR_NAME}+{PACED_RECORD_FLOOR}"),
                    sum_runs(&[&part((FLOOR_NAME, "prepare+mounts")), &paced]),
                ),
                (
                    "commit p50",
                    format!("{FLOOR_NAME}+{SYNCFS}+{PACED_RECORD_FLOOR}"),
                    sum_runs(&[&part((FLOOR_NAME, "commit")), &syncfs, &paced]),
                ),
                (
                    "Prepare server-side p50",
                    format!("{FLOOR_NAME} server-side+{PACED_RECORD_FLOOR}"),
                    sum_runs(&[&part((FLOOR_NAME, "Prepare")), &paced]),
                ),
                (
                    "Commit server-side p50",
                    format!("{FLOOR_NAME} server-side+{SYNCFS}+{PACED_RECORD_FLOOR}"),
                    sum_runs(&[&part((FLOOR_NAME, "Commit")), &syncfs, &paced]),
                ),
            ];
            let bounds: Vec<Figure> = bounds
                .into_iter()
                .filter(|(_, _, samples)| !samples.is_empty())
                .map(|(metric, subject, samples)| {
                    Figure::new(NAME, case.clone(), subject, metric, Unit::Millis)
                        .bound()
                        .samples(samples)
                })
                .collect();
            out.remove(&(SYNCFS, "commit"));
            for sn in THROUGH_CONTAINERD {
                for (metric, key) in [
                    ("prepare+mounts p50", "prepare+mounts"),
                    ("prepare+mounts p99", "prepare+mounts p99"),
                    ("mounts alone p50", "mounts"),
                    ("commit p50", "commit"),
                    ("commit p99", "commit p99"),
                ] {
                    let mut f = Figure::new(NAME, case.clone(), sn, metric, Unit::Millis)
                        .samples(out.remove(&(sn, key)).unwrap_or_default());
                    if sn == PROXY_NAME && metric == "prepare+mounts p50" {
                        f.goal = Some(format!("<= 1.1x {BASELINE}"));
                    }
                    if sn == PROXY_NAME && metric == "commit p50" {
                        f.goal = Some(format!("<= 1.0x {SYNC_BASELINE}"));
                    }
                    // Commit's floor column is overlayfs+syncfs; there the proxy floor is a baseline row.
                    if sn == FLOOR_NAME && metric != "commit p50" {
                        f = f.floor();
                    }
                    figs.push(f);
                }
            }
            // lamina's side alone: its server-side time per call (goal <= 0.3 ms) and the calls made straight to
            // its socket (one gRPC hop, no containerd).
            for op in SERVED {
                figs.push(
                    Figure::new(
                        NAME,
                        case.clone(),
                        PROXY_NAME,
                        format!("{op} server-side p50"),
                        Unit::Millis,
                    )
                    .goal("<= 0.3 ms")
                    .samples(out.remove(&(PROXY_NAME, op)).unwrap_or_default()),
                );
                for floor in [RECORD_FLOOR, PACED_RECORD_FLOOR, FLOOR_NAME] {
                    if let Some(samples) = out.remove(&(floor, op)) {
                        figs.push(
                            Figure::new(
                                NAME,
                                case.clone(),
                                floor,
                                format!("{op} server-side p50"),
                                Unit::Millis,
                            )
                            .floor()
                            .samples(samples),
                        );
                    }
                }
            }
            for (metric, key) in [
                ("prepare+mounts p50 on lamina's socket", "direct prepare+mounts"),
                ("mounts alone p50 on lamina's socket", "direct mounts"),
                ("commit p50 on lamina's socket", "direct commit"),
            ] {
                figs.push(
                    Figure::new(NAME, case.clone(), PROXY_NAME, metric, Unit::Millis)
                        .samples(out.remove(&(PROXY_NAME, key)).unwrap_or_default()),
                );
            }
            let mut f = Figure::new(NAME, case.clone(), SYNC_BASELINE, "commit p50", Unit::Millis).floor();
            f.samples = out.remove(&(SYNC_BASELINE, "commit")).unwrap_or_default();
            figs.push(f);
            figs.extend(bounds);
        }
        anyhow::Ok(())
    })
}

/// Run-by-run sums of figures with one sample per run each; empty when a part is missing or the runs differ.
fn sum_runs(parts: &[&[f64]]) -> Vec<f64> {
    let runs = parts.first().map_or(0, |p| p.len());
    if parts.iter().any(|p| p.len() != runs) {
        return Vec::new();
    }
    (0..runs).map(|r| parts.iter().map(|p| p[r]).sum()).collect()
}

/// Writes the layers of the unpack image into `dir` and packs it as an OCI archive; returns (archive, case).
fn build_image(ctx: &Ctx, dir: &Path) -> anyhow::Result<(std::path::PathBuf, String)> {
    // (layers, small files per layer, large file per layer)
    let (layers, files, large) = if ctx.quick {
        (2usize, 300u64, 4u64 << 20)
    } else {
        (4, 10_000, 32 << 20)
    };
    fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for l in 0..layers {
        let p = dir.join(format!("layer{l}.tar"));
        let mut tar = TarWriter::new(BufWriter::with_capacity(1 << 20, fs::File::create(&p)?));
        if l == 0 {
            busybox_tree(&mut tar)?;
        }
        tar.dir(&format!("l{l}/"), 0o755)?;
        for d in 0..(files / 100).max(1) {
            tar.dir(&format!("l{l}/d{d}/"), 0o755)?;
        }
        for i in 0..files {
            // 1-8 KiB, deterministic.
            let size = 1024 + (i * 2654435761 % 7168);
            tar.random_file(&format!("l{l}/d{}/f{i}", i / 100), size, (l as u64) << 40 | i)?;
        }
        tar.random_file(&format!("l{l}/large.bin"), large, 0xfeed + l as u64)?;
        tar.finish()?;
        paths.push(p);
    }
    let archive = dir.join("image.tar");
    let bytes = oci_archive(&dir.join("layout"), "bench.local/unpack:1", &paths, &archive)?;
    let case = format!(
        "{} layers, {:.0} MB, {} files",
        layers,
        bytes as f64 / 1e6,
        layers as u64 * (files + 1)
    );
    Ok((archive, case))
}

fn unpack(ctx: &Ctx, dir: &Path, ctrd: &Containerd, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    ctx.say("writing the OCI image");
    let (archive, case) = build_image(ctx, &dir.join("image"))?;
    ctx.say(format!("ctr images import ({case})"));
    let archive = archive.to_str().context("utf-8 path")?.to_string();
    let image = "bench.local/unpack:1";
    // The measured filesystem only (see `drop_caches`).
    let sync = || run_cmd(Command::new("sync").arg("-f").arg(dir));
    let clean = || -> anyhow::Result<()> {
        ctrd.ctr_ok(&["images", "rm", "--sync", image]);
        ctrd.gc_now();
        Ok(())
    };
    let mut samples: HashMap<(&str, &str), Vec<f64>> = HashMap::new();
    for _ in 0..ctx.runs {
        // Content ingest alone, for the unpack estimate.
        drop_caches(&ctx.scratch)?;
        sync()?;
        let t = Instant::now();
        ctrd.ctr_ok(&["images", "import", "--no-unpack", &archive]);
        let ingest = t.elapsed().as_secs_f64();
        clean()?;
        for sn in [PROXY_NAME, BASELINE] {
            drop_caches(&ctx.scratch)?;
            let t = Instant::now();
            ctrd.ctr_ok(&["images", "import", "--snapshotter", sn, &archive]);
            let import = t.elapsed().as_secs_f64();
            sync()?;
            let with_sync = t.elapsed().as_secs_f64();
            let list = ctrd.ctr_ok(&["snapshots", "--snapshotter", sn, "ls"]);
            anyhow::ensure!(
                list.lines().count() > 1,
                "{sn}: no snapshots after import:\n{list}"
            );
            clean()?;
            samples.entry((sn, "import")).or_default().push(import);
            samples.entry((sn, "import+sync")).or_default().push(with_sync);
            samples
                .entry((sn, "unpack"))
                .or_default()
                .push((import - ingest).max(0.0));
            samples
                .entry((sn, "unpack+sync"))
                .or_default()
                .push((with_sync - ingest).max(0.0));
        }
    }
    for sn in [PROXY_NAME, BASELINE] {
        for metric in ["import", "import+sync", "unpack", "unpack+sync"] {
            figs.push(
                Figure::new(NAME, case.clone(), sn, metric, Unit::Seconds)
                    .samples(samples.remove(&(sn, metric)).unwrap_or_default()),
            );
        }
    }
    let _ = fs::remove_file(&archive);
    Ok(())
}

fn run(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let dir = ctx.scratch.clone();
    let lamina_dir = dir.join("lam");
    fs::create_dir_all(&lamina_dir)?;
    // Sockets on a short path; everything else on the scratch filesystem.
    let run_dir = RunDir::new()?;
    let sock = run_dir.path.join("snap.sock");
    ctx.say("starting lamina and containerd");
    let mut lamina = Lamina::in_dir("lam", &lamina_dir).snapshotter(&sock);
    lamina.log_level = "warn".into();
    // lamina's own latency histograms: the server-side time of each call.
    let metrics = run_dir.path.join("metrics.sock");
    lamina.extra_args = vec!["--metrics-address".into(), format!("unix:{}", metrics.display())];
    lamina.exe = ctx.lamina_exe.clone();
    let lamina = start(lamina);
    let floor_sock = run_dir.path.join("floor.sock");
    let floor = FloorServer::start(&floor_sock)?;
    let mut ctrd = Containerd::configure(&dir.join("containerd"), &run_dir.path, Some(&sock), "info");
    ctrd.add_proxy_snapshotter(FLOOR_NAME, &floor_sock);
    ctrd.namespace = CTR_NAMESPACE.into();
    ctrd.ctr_timeout = "600s".into();
    ctrd.spawn();
    ctrd.wait_ready();
    let plugins = ctrd.ctr_ok(&["plugins", "ls"]);
    for name in [PROXY_NAME, FLOOR_NAME] {
        anyhow::ensure!(
            plugins
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name) && l.trim_end().ends_with("ok")),
            "containerd does not list the proxy snapshotter {name} as ok:\n{plugins}"
        );
    }
    calls(ctx, &ctrd, &sock, &metrics, &floor, figs)?;
    unpack(ctx, &dir, &ctrd, figs)?;
    // containerd first (it holds connections to lamina and the floor), then lamina.
    drop(ctrd);
    drop(floor);
    drop(lamina);
    drop(run_dir);
    Ok(())
}
