//! `clustertier`: the shared layer tier (docs/cluster.md) on testkit's cluster harness: a throw-away MooseFS
//! cluster, a registry serving a generated image (busybox + five data layers, 200 MB; `--quick`: 20 MB), two
//! hosts each with its own containerd 1.6 and lamina sharing one tier directory, and a third containerd on its
//! built-in overlayfs snapshotter as the baseline.
//!
//! - **Pull.** containerd's Pull with unpack (its Go client, `tests/cluster/pull`): host A once (fetch, unpack,
//!   publish of every layer: subject `lamina-host-a`), host B `runs` times (every layer adopted from the tier:
//!   subject `lamina`), the overlayfs containerd `runs` times (fetch and unpack). The image and its snapshots
//!   are removed (and containerd's GC run) between repetitions.
//! - **Prepare of a chain id in the tier.** containerd's Snapshots service on host B, `Prepare` labelled
//!   `containerd.io/snapshot.ref` = the bottom layer's chain id, which the tier holds and host B does not:
//!   lamina adopts it and answers AlreadyExists (p50 of `runs` × a few calls; the adopted layer is removed by
//!   containerd's GC between calls, untimed). Baseline: the same Prepare on overlayfs, where the chain id is
//!   already a local snapshot (containerd answers from its metadata).
//! - **Reads.** MB/s of reading the files of the top data layer (a fifth of the image) from the tier (subject
//!   `lamina`: host B's layer is a link to its mount of the layer's EROFS image, read through the MooseFS
//!   mount) and from host A's local copy (`lamina-local`, on the scratch filesystem), cold (caches dropped) and
//!   warm.
//!
//! - **Layer format.** One layer of many small files (10,000 of 1 KiB in 100 directories; `--quick`: 2,000)
//!   and one big file (64 MiB; `--quick`: 16 MiB), in the tier as a directory tree (copied with `cp -a`,
//!   renamed into place: subject `tier-dir`) and as one EROFS image (`mkfs.erofs` on the local disk, copied
//!   into the tier, fsynced, renamed, and mounted read-only backed by the file, as lamina mounts its image
//!   layers: subject `tier-erofs`):
//!   publication time and the master's operations for it (`mfscli -SMO` of a mount used for nothing else),
//!   the mount of the image, and a read of every file cold (caches dropped) and warm, with its operations.
//!   Without `mkfs.erofs` (Debian's erofs-utils) the EROFS form records `skipped`.
//!
//! Needs root, containerd, MooseFS, docker-registry, Go with containerd's Go sources and this workspace's
//! `tests/cluster/pull`; without them the workload records a `skipped` figure.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use lamina_snapshotter::proto::containerd::services::snapshots::v1 as pb;
use lamina_snapshotter::tonic;

use super::engines_ctr::percentile;
use super::{Ctx, Figure, Unit, Workload};
use lamina_testkit::cluster::{have_go_containerd, layered_image, pull_with_unpack, push_image, ClusterHost};
use lamina_testkit::containerd::{Containerd, PROXY_NAME};
use lamina_testkit::moosefs::{have_moosefs, MooseCluster};
use lamina_testkit::plugin::Registry;

/// The workload.
pub const CLUSTER_TIER: Workload = Workload {
    name: "clustertier",
    about: "cluster tier on MooseFS: host B's pull vs host A's and containerd's overlayfs, Prepare of a chain id \
            in the tier through containerd, reads of a tier layer vs a local one (cold, warm)",
    per_fs: false,
    run,
};

const NAME: &str = "clustertier";
const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

fn push(figs: &mut Vec<Figure>, case: &str, subject: &str, metric: &str, unit: Unit, samples: Vec<f64>) {
    Figure::push_to(figs, NAME, (case, subject, metric), unit, samples);
}

fn have_all() -> bool {
    let bin = |b: &str| lamina_testkit::find_bin(b).is_some();
    bin("containerd") && bin("docker-registry") && have_moosefs() && have_go_containerd()
}

fn run(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    if !have_all() {
        Figure::push_skipped(
            figs,
            NAME,
            "containerd, MooseFS, docker-registry, Go or tests/cluster/pull missing",
        );
        return Ok(());
    }
    let dir = ctx.scratch.join("ct");
    ctx.say("starting MooseFS, a registry and two cluster hosts");
    let mfs = MooseCluster::start_in(&dir.join("mfs"), 2);
    let (mnt_a, mnt_b) = (mfs.scratch("mnt-a"), mfs.scratch("mnt-b"));
    mfs.mount(&mnt_a, "/");
    mfs.mount(&mnt_b, "/");
    fs::create_dir_all(mnt_a.join("tier"))?;
    let (tier_a, tier_b) = (mnt_a.join("tier"), mnt_b.join("tier"));
    let formats = layer_formats(ctx, &mfs, &dir, figs);
    if let Err(e) = &formats {
        ctx.say(format!("layer formats: {e:#}"));
    }
    let registry = Registry::start(&dir.join("registry"));
    let a = ClusterHost::start(&dir.join("a"), &tier_a, "bench-a", 30);
    let b = ClusterHost::start(&dir.join("b"), &tier_b, "bench-b", 30);
    let base = Containerd::start(&dir.join("base"), None);
    let result = measure(ctx, &dir, &registry, &a, &b, &base, &tier_b, figs);
    // containerd before lamina (inside each host), the hosts before MooseFS.
    drop(base);
    drop(b);
    drop(a);
    drop(registry);
    drop(mfs);
    result.and(formats)
}

/// The master's operation count (all kinds) of the mount at `mnt` so far this hour (`mfscli -SMO`).
fn master_ops(mfs: &MooseCluster, mnt: &Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("mfscli")
        .args(["-H", &mfs.master_host(), "-SMO", "-m", "1", "-p", "-s", ";"])
        .output()
        .context("mfscli")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mnt = mnt.to_string_lossy();
    text.lines()
        .find(|l| l.split(';').any(|f| f == mnt))
        .and_then(|l| l.rsplit(';').next())
        .and_then(|t| t.trim().parse().ok())
        .with_context(|| format!("no operation counters of {mnt} in: {text}"))
}

/// Drops the page cache after flushing only the filesystems of `paths` (`sync -f`): a global `sync` waits for
/// every filesystem of the machine, and one stuck FUSE mount of another job stalls it for good.
fn drop_caches_of(paths: &[&Path]) -> anyhow::Result<()> {
    for p in paths {
        crate::engines::drop_caches(p)?;
    }
    Ok(())
}

/// Every file below `dir` read to the end: bytes, files.
fn read_tree(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let mut f = fs::File::open(e.path())?;
                bytes += std::io::copy(&mut f, &mut std::io::sink())?;
                files += 1;
            }
        }
    }
    Ok((bytes, files))
}

/// The layer-format comparison (module docs): a directory tree against one EROFS image per layer.
fn layer_formats(ctx: &Ctx, mfs: &MooseCluster, dir: &Path, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let (files, big_mb) = (ctx.pick(2_000usize, 10_000), ctx.pick(16usize, 64));
    ctx.say(format!(
        "layer formats: {files} small files and one {big_mb} MiB file"
    ));
    let src = dir.join("fmt-src");
    for i in 0..files {
        let d = src.join(format!("d{:02}", i % 100));
        if i < 100 {
            fs::create_dir_all(&d)?;
        }
        fs::write(d.join(format!("f{i}")), vec![(i % 251) as u8; 1024])?;
    }
    let chunk = vec![7u8; 1 << 20];
    let mut big = fs::File::create(src.join("big"))?;
    for _ in 0..big_mb {
        std::io::Write::write_all(&mut big, &chunk)?;
    }
    drop(big);
    let mnt = mfs.scratch("mnt-fmt");
    mfs.mount(&mnt, "/");
    let tier = mnt.join("fmt");
    fs::create_dir_all(&tier)?;
    let case = format!("{files} files of 1 KiB + one {big_mb} MiB file");
    let ops = || master_ops(mfs, &mnt);
    let run = |cmd: &mut std::process::Command| -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    // The figures of one step started at `t` with the master at `o` operations: its seconds and the master's
    // operations.
    let step_done =
        |subject: &str, step: &str, t: Instant, o: u64, figs: &mut Vec<Figure>| -> anyhow::Result<()> {
            push(
                figs,
                &case,
                subject,
                step,
                Unit::Seconds,
                vec![t.elapsed().as_secs_f64()],
            );
            let ops = vec![ops()?.saturating_sub(o) as f64];
            push(
                figs,
                &case,
                subject,
                &format!("master ops, {step}"),
                Unit::Count,
                ops,
            );
            Ok(())
        };
    // Reads every file of `root` cold then warm, `runs` times: seconds and the master's operations of each.
    let reads = |subject: &str, root: &Path, figs: &mut Vec<Figure>| -> anyhow::Result<()> {
        let (mut cold, mut warm, mut cold_ops, mut warm_ops) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ctx.runs {
            for (first, secs, n) in [
                (true, &mut cold, &mut cold_ops),
                (false, &mut warm, &mut warm_ops),
            ] {
                if first {
                    drop_caches_of(&[root, dir])?;
                }
                let o = ops()?;
                let t = Instant::now();
                let (_, read) = read_tree(root)?;
                secs.push(t.elapsed().as_secs_f64());
                n.push(ops()?.saturating_sub(o) as f64);
                anyhow::ensure!(read == files as u64 + 1, "{subject}: read {read} files");
            }
        }
        push(figs, &case, subject, "read all, cold", Unit::Seconds, cold);
        push(
            figs,
            &case,
            subject,
            "master ops, cold read",
            Unit::Count,
            cold_ops,
        );
        push(figs, &case, subject, "read all, warm", Unit::Seconds, warm);
        push(
            figs,
            &case,
            subject,
            "master ops, warm read",
            Unit::Count,
            warm_ops,
        );
        Ok(())
    };

    // Directory tree.
    ctx.say("layer formats: directory tree");
    let o = ops()?;
    let t = Instant::now();
    run(std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(tier.join("staging-dir")))?;
    fs::rename(tier.join("staging-dir"), tier.join("dir"))?;
    step_done("tier-dir", "publish", t, o, figs)?;
    reads("tier-dir", &tier.join("dir"), figs)?;
    let _ = fs::remove_dir_all(tier.join("dir"));

    // One EROFS image.
    if lamina_testkit::find_bin("mkfs.erofs").is_none() {
        push(
            figs,
            &case,
            "tier-erofs",
            "skipped (no mkfs.erofs)",
            Unit::Count,
            vec![0.0],
        );
    } else {
        ctx.say("layer formats: EROFS image");
        let local = dir.join("fmt.erofs");
        let o = ops()?;
        let t = Instant::now();
        run(std::process::Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&local)
            .arg(&src))?;
        let made = t.elapsed().as_secs_f64();
        fs::copy(&local, tier.join("staging.erofs"))?;
        fs::File::open(tier.join("staging.erofs"))?.sync_all()?;
        fs::rename(tier.join("staging.erofs"), tier.join("layer.erofs"))?;
        step_done("tier-erofs", "publish", t, o, figs)?;
        push(
            figs,
            &case,
            "tier-erofs",
            "mkfs.erofs (part of publish)",
            Unit::Seconds,
            vec![made],
        );
        push(
            figs,
            &case,
            "tier-erofs",
            "image size",
            Unit::MiB,
            vec![fs::metadata(&local)?.len() as f64 / (1 << 20) as f64],
        );
        let _ = fs::remove_file(&local);
        let o = ops()?;
        let t = Instant::now();
        let mnt = dir.join("fmt-erofs-mnt");
        fs::create_dir_all(&mnt)?;
        lamina_sys::mount::mount_erofs_file(&tier.join("layer.erofs"), &mnt)?;
        step_done("tier-erofs", "mount", t, o, figs)?;
        let read = reads("tier-erofs", &mnt, figs);
        lamina_sys::mount::unmount(&mnt, true)?;
        read?;
    }
    let _ = fs::remove_dir_all(&src);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure(
    ctx: &Ctx,
    dir: &Path,
    registry: &Registry,
    a: &ClusterHost,
    b: &ClusterHost,
    base: &Containerd,
    tier: &Path,
    figs: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let mb = ctx.pick(20, 200);
    ctx.say(format!("building and pushing a {mb} MB image"));
    let work = dir.join("image");
    let (layout, archive, _) = layered_image(&work, "lamina/tier:v1", mb, 1);
    push_image(&registry.addr, &layout, &archive, "lamina/tier", "v1");
    let _ = fs::remove_dir_all(&work);
    let reference = format!("{}/lamina/tier:v1", registry.addr);
    let case = format!("{mb} MB, {} layers", archive.chain_ids.len());
    let pull = |c: &Containerd, sn: &str| -> anyhow::Result<f64> {
        pull_with_unpack(c, sn, &reference)
            .map(|d| d.as_secs_f64())
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let forget = |c: &Containerd| {
        c.ctr_ok(&["images", "rm", "--sync", &reference]);
        c.gc_now();
    };

    ctx.say("host A pulls (fetch, unpack, publish)");
    let t_a = pull(&a.ctrd, PROXY_NAME)?;
    push(figs, &case, "lamina-host-a", "pull", Unit::Seconds, vec![t_a]);
    let mut t_b = Vec::new();
    let mut t_o = Vec::new();
    for i in 0..ctx.runs {
        ctx.say(format!("host B pulls from the tier ({}/{})", i + 1, ctx.runs));
        t_b.push(pull(&b.ctrd, PROXY_NAME)?);
        forget(&b.ctrd);
        ctx.say(format!("overlayfs pulls ({}/{})", i + 1, ctx.runs));
        t_o.push(pull(base, "overlayfs")?);
        if i + 1 < ctx.runs {
            forget(base);
        }
    }
    push(figs, &case, "lamina", "pull", Unit::Seconds, t_b);
    push(figs, &case, "overlayfs", "pull", Unit::Seconds, t_o);

    ctx.say("Prepare of a chain id in the tier, through containerd");
    let chain = archive.chain_ids[0].clone();
    let log_mark = fs::metadata(&b.lamina.log).map(|m| m.len()).unwrap_or(0);
    let adopt = prepare_p50(ctx, &b.ctrd, PROXY_NAME, &chain, true)?;
    // Where an adoption's time goes: the steps host B's lamina logs (at debug level) for each.
    for (step, mut us) in adoption_steps(&b.lamina.log, log_mark) {
        let p50 = percentile(&mut us, 50.0);
        push(
            figs,
            "Prepare of a chain id in the tier, lamina's steps",
            "lamina",
            &format!("{step} p50"),
            Unit::Micros,
            vec![p50],
        );
    }
    push(
        figs,
        "Prepare of a chain id in the tier",
        "lamina",
        "p50",
        Unit::Millis,
        adopt,
    );
    if let Some(f) = figs.last_mut() {
        f.goal = Some("<= 5 ms".into());
    }
    let local = prepare_p50(ctx, base, "overlayfs", &chain, false)?;
    push(
        figs,
        "Prepare of a chain id in the tier",
        "overlayfs",
        "p50",
        Unit::Millis,
        local,
    );

    let top_hex = archive
        .chain_ids
        .last()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    // The tier's copy as a host reads it: its image mounted backed by the file (as lamina mounts an image
    // layer), or a directory layer's tree.
    let layer = tier.join("layers").join(&top_hex);
    let image = layer.join("layer.erofs");
    let mnt = dir.join("top-erofs-mnt");
    let tier_dir = if image.exists() {
        fs::create_dir_all(&mnt)?;
        lamina_sys::mount::mount_erofs_file(&image, &mnt)?;
        mnt.join("data/l5")
    } else {
        layer.join("diff/data/l5")
    };
    let read = reads_of_top_layer(ctx, a, &tier_dir, figs);
    if image.exists() {
        lamina_sys::mount::unmount(&mnt, true)?;
    }
    read
}

/// MB/s of reading the files of the top data layer from the tier (`tier_dir`) and from host A's local copy,
/// cold and warm.
fn reads_of_top_layer(
    ctx: &Ctx,
    a: &ClusterHost,
    tier_dir: &Path,
    figs: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let local_dir = find_dir(&a.lamina.data_root, Path::new("data/l5"))
        .context("host A's local copy of the top layer")?;
    for (subject, d) in [("lamina", tier_dir), ("lamina-local", local_dir.as_path())] {
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for _ in 0..ctx.runs {
            drop_caches_of(&[d, &local_dir])?;
            cold.push(read_mbps(d)?);
            warm.push(read_mbps(d)?);
        }
        push(
            figs,
            "read of a layer's files, cold",
            subject,
            "read",
            Unit::MBps,
            cold,
        );
        push(
            figs,
            "read of a layer's files, warm",
            subject,
            "read",
            Unit::MBps,
            warm,
        );
    }
    Ok(())
}

/// Per run, the p50 of a few Prepares labelled with chain id `chain` (answered AlreadyExists) through
/// containerd's Snapshots service on `snapshotter`; with `forget`, containerd's GC removes the layer between
/// calls (untimed), so that each Prepare finds it in the tier only.
fn prepare_p50(
    ctx: &Ctx,
    c: &Containerd,
    snapshotter: &str,
    chain: &str,
    forget: bool,
) -> anyhow::Result<Vec<f64>> {
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(lamina_snapshotter::client::connect(&c.address))?;
    let per_run = ctx.pick(3, 10);
    let mut p50s = Vec::new();
    for r in 0..ctx.runs {
        let mut times = Vec::new();
        for i in 0..per_run {
            if forget {
                c.gc_now();
            }
            let mut req = tonic::Request::new(pb::PrepareSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: format!("bench-adopt-{r}-{i}"),
                parent: String::new(),
                labels: HashMap::from([(SNAPSHOT_REF.to_string(), chain.to_string())]),
            });
            req.metadata_mut().insert(
                "containerd-namespace",
                c.namespace.parse().expect("ascii namespace"),
            );
            let mut cl = client.clone();
            let t = Instant::now();
            let res = rt.block_on(cl.prepare(req));
            let ms = t.elapsed().as_secs_f64() * 1e3;
            match res {
                Err(s) if s.code() == tonic::Code::AlreadyExists => times.push(ms),
                Err(s) => anyhow::bail!("{snapshotter}: Prepare labelled {chain}: {s}"),
                Ok(_) => anyhow::bail!("{snapshotter}: Prepare labelled {chain} made a new snapshot"),
            }
        }
        p50s.push(percentile(&mut times, 50.0));
    }
    Ok(p50s)
}

/// The `adoption steps` debug lines of a lamina log after byte `from`: each step's microseconds, in order.
fn adoption_steps(log: &Path, from: u64) -> Vec<(String, Vec<f64>)> {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    let mut steps: Vec<(String, Vec<f64>)> = Vec::new();
    for line in text.lines().filter(|l| l.contains("adoption steps")) {
        for tok in line.split_whitespace() {
            let tok = tok.trim_matches('"');
            let Some((step, us)) = tok.strip_prefix("steps=").unwrap_or(tok).split_once('=') else {
                continue;
            };
            let Some(us) = us.strip_suffix("us").and_then(|u| u.parse::<f64>().ok()) else {
                continue;
            };
            match steps.iter_mut().find(|(s, _)| s == step) {
                Some((_, v)) => v.push(us),
                None => steps.push((step.to_string(), vec![us])),
            }
        }
    }
    steps
}

/// The first directory below `root` whose path ends with `tail` (symbolic links not followed).
fn find_dir(root: &Path, tail: &Path) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let p = e.path();
                if p.ends_with(tail) {
                    return Some(p);
                }
                stack.push(p);
            }
        }
    }
    None
}

/// Reads every file of `dir`; MB/s.
fn read_mbps(dir: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut bytes = 0u64;
    for e in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let mut f = fs::File::open(e?.path())?;
        bytes += std::io::copy(&mut f, &mut std::io::sink())?;
    }
    let secs = t.elapsed().max(Duration::from_micros(1)).as_secs_f64();
    Ok(bytes as f64 / 1e6 / secs)
}
