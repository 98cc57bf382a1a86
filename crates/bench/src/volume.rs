//! `volume`: lamina's VolumeDriver face against what a volume is made of.
//!
//! - **Mount/Unmount.** `VolumeDriver.Mount` and `VolumeDriver.Unmount` of one local volume on lamina's plugin
//!   socket (one keep-alive connection, the JSON dockerd sends), each call timed from the client; against the
//!   floor, a bind mount and its unmount (`mount(2)`/`umount(2)` through lamina-sys) of a directory on the same
//!   filesystem. p50 and p99 per run.
//! - **I/O.** A small fio-like loop on a file in the mounted volume (its `Mountpoint`) and on a bare directory of
//!   the same filesystem: 1 MiB sequential write (then `fsync`) and read, 4 KiB random reads and 4 KiB random
//!   writes (each followed by `fdatasync`) for a fixed time, all with `O_DIRECT` (buffered I/O, with caches
//!   dropped before reads, where the filesystem refuses it; the case name then says so).
//! - **MooseFS** (full run only; `--quick` says in the results that it skipped it): a throw-away cluster (master
//!   and two chunkservers in a network namespace). Mount/Unmount p50 of a lamina MooseFS volume against a bare
//!   `mfsmount` + unmount of a cluster subfolder, and the same I/O loop in the volume against a bare `mfsmount`
//!   of the same cluster.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::engines::{lamina, session, start};
use super::engines_ctr::{drop_caches, fill_random, open_direct, percentile, AlignedBuf, RunDir};
use super::{Ctx, Figure, Unit, Workload};
use lamina_testkit::moosefs::{have_moosefs, MooseCluster};
use lamina_testkit::Session;

/// The workload.
pub const VOLUME: Workload = Workload {
    name: "volume",
    about:
        "volume plugin: Mount/Unmount p50/p99 of a local volume vs a bind mount; sequential and random I/O \
            through the volume vs the bare directory",
    per_fs: true,
    run,
};

const NAME: &str = "volume";
const VOL: &str = "benchvol";
const MOUNT_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Mounts the volume named in `name_id`; its mount point.
fn mount_volume(c: &mut Session, name_id: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let r = c.call("VolumeDriver.Mount", name_id)?;
    let mountpoint = r
        .get("Mountpoint")
        .and_then(|v| v.as_str())
        .context("Mount answered without a Mountpoint")?;
    Ok(PathBuf::from(mountpoint))
}

/// p50 and p99 of mount and unmount times (µs), one sample of each per run.
#[derive(Default)]
struct MountTimes {
    m50: Vec<f64>,
    m99: Vec<f64>,
    u50: Vec<f64>,
    u99: Vec<f64>,
}

impl MountTimes {
    /// Times `iters` mount/unmount pairs on `state` after 10 unmeasured ones; adds their percentiles.
    fn run<S>(
        &mut self,
        iters: usize,
        state: &mut S,
        mut mount: impl FnMut(&mut S) -> anyhow::Result<()>,
        mut unmount: impl FnMut(&mut S) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let (mut m, mut u) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        for i in 0..iters + 10 {
            let t = Instant::now();
            mount(state)?;
            let tm = t.elapsed();
            let t = Instant::now();
            unmount(state)?;
            let tu = t.elapsed();
            if i >= 10 {
                m.push(us(tm));
                u.push(us(tu));
            }
        }
        self.m50.push(percentile(&mut m, 50.0));
        self.m99.push(percentile(&mut m, 99.0));
        self.u50.push(percentile(&mut u, 50.0));
        self.u99.push(percentile(&mut u, 99.0));
        Ok(())
    }

    /// Adds the four figures of `subject`; the index of the first (mount p50).
    fn push(self, figs: &mut Vec<Figure>, case: &str, subject: &str) -> usize {
        let i = push(figs, case, subject, "mount p50", Unit::Micros, self.m50);
        push(figs, case, subject, "mount p99", Unit::Micros, self.m99);
        push(figs, case, subject, "unmount p50", Unit::Micros, self.u50);
        push(figs, case, subject, "unmount p99", Unit::Micros, self.u99);
        i
    }
}

fn push(
    figs: &mut Vec<Figure>,
    case: &str,
    subject: &str,
    metric: &str,
    unit: Unit,
    samples: Vec<f64>,
) -> usize {
    Figure::push_to(figs, NAME, (case, subject, metric), unit, samples);
    figs.len() - 1
}

/// Sizes of the I/O loop.
struct IoPlan {
    file_bytes: u64,
    duration: Duration,
}

/// One measurement of every I/O pattern in `dir`: (seq write MB/s, seq read MB/s, rand read IOPS, rand write
/// IOPS), and whether `O_DIRECT` was used.
fn io_round(dir: &Path, plan: &IoPlan, seed: u64) -> anyhow::Result<([f64; 4], bool)> {
    let path = dir.join("bench-io.dat");
    let _ = fs::remove_file(&path);
    let direct = open_direct(&path)?;
    let is_direct = direct.is_some();
    let open = || -> anyhow::Result<fs::File> {
        Ok(match open_direct(&path)? {
            Some(f) => f,
            None => fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?,
        })
    };
    drop(direct);
    const BIG: usize = 1 << 20;
    const SMALL: usize = 4096;
    let mut buf = AlignedBuf::new(BIG);
    fill_random(seed, buf.as_mut());
    // Sequential write.
    let mut f = open()?;
    let t = Instant::now();
    let mut written = 0u64;
    while written < plan.file_bytes {
        f.write_all(buf.as_mut())?;
        written += BIG as u64;
    }
    f.sync_all()?;
    let seq_write = written as f64 / 1e6 / t.elapsed().as_secs_f64();
    drop(f);
    // Sequential read.
    if !is_direct {
        drop_caches(&path)?;
    }
    let mut f = open()?;
    let t = Instant::now();
    let mut read = 0u64;
    loop {
        let n = f.read(buf.as_mut())?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    anyhow::ensure!(read == written, "read {read} of {written} bytes");
    let seq_read = read as f64 / 1e6 / t.elapsed().as_secs_f64();
    // Random 4 KiB reads, then writes, each for the planned time.
    let blocks = plan.file_bytes / SMALL as u64;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * SMALL as u64
    };
    let mut small = AlignedBuf::new(SMALL);
    if !is_direct {
        drop_caches(&path)?;
    }
    let t = Instant::now();
    let mut ops = 0u64;
    while t.elapsed() < plan.duration {
        f.seek(SeekFrom::Start(next()))?;
        f.read_exact(small.as_mut())?;
        ops += 1;
    }
    let rand_read = ops as f64 / t.elapsed().as_secs_f64();
    fill_random(seed ^ 7, small.as_mut());
    let t = Instant::now();
    let mut ops = 0u64;
    while t.elapsed() < plan.duration {
        f.seek(SeekFrom::Start(next()))?;
        f.write_all(small.as_mut())?;
        f.sync_data()?;
        ops += 1;
    }
    let rand_write = ops as f64 / t.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path)?;
    Ok(([seq_write, seq_read, rand_read, rand_write], is_direct))
}

fn run(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let dir = ctx.scratch.clone();
    let mount_base = dir.join("mnt");
    let bare = dir.join("bare");
    let bind_src = dir.join("bind-src");
    let bind_dst = dir.join("bind-dst");
    for d in [&mount_base, &bare, &bind_src, &bind_dst] {
        fs::create_dir_all(d)?;
    }
    let run_dir = RunDir::new()?;
    let mut spec = lamina(ctx, "lam").plugin_socket(&run_dir.path.join("plugin.sock"));
    spec.extra_args = vec!["--volumes-mount-base".into(), mount_base.display().to_string()];
    let lamina = start(spec);
    let mut c = session(&lamina);
    c.call("VolumeDriver.Create", &json!({"Name": VOL, "Opts": {}}))
        .context("create the volume")?;
    let name_id = json!({"Name": VOL, "ID": MOUNT_ID});

    // ---- Mount/Unmount ----
    ctx.say("Mount/Unmount vs bind mounts");
    let iters = if ctx.quick { 100 } else { 2000 };
    let case = "local volume";
    let (mut lam, mut bind) = (MountTimes::default(), MountTimes::default());
    for _ in 0..ctx.runs {
        lam.run(
            iters,
            &mut c,
            |c| {
                let r = c.call("VolumeDriver.Mount", &name_id)?;
                anyhow::ensure!(
                    r.get("Mountpoint")
                        .and_then(|v| v.as_str())
                        .is_some_and(|s| !s.is_empty()),
                    "Mount answered without a Mountpoint: {r}"
                );
                Ok(())
            },
            |c| {
                c.call("VolumeDriver.Unmount", &name_id)?;
                Ok(())
            },
        )?;
        bind.run(
            iters,
            &mut (),
            |_| {
                lamina_sys::mount::bind_mount(&bind_src, &bind_dst, false)?;
                Ok(())
            },
            |_| {
                lamina_sys::mount::unmount(&bind_dst, false)?;
                Ok(())
            },
        )?;
    }
    let i = lam.push(figs, case, "lamina");
    figs[i].goal = Some("<= 1 ms".into());
    let first = bind.push(figs, case, "bind-mount");
    // A bind mount and its unmount are the kernel's part of a local volume's Mount and Unmount.
    for f in &mut figs[first..] {
        f.floor = true;
    }

    // ---- I/O through the volume vs the bare directory ----
    let plan = if ctx.quick {
        IoPlan {
            file_bytes: 32 << 20,
            duration: Duration::from_millis(500),
        }
    } else {
        IoPlan {
            file_bytes: 1 << 30,
            duration: Duration::from_secs(5),
        }
    };
    ctx.say("I/O through the volume and on the bare directory");
    let mountpoint = mount_volume(&mut c, &name_id)?;
    compare_io(ctx, &plan, "local", (&mountpoint, "bare-dir", &bare), figs)?;
    c.call("VolumeDriver.Unmount", &name_id)?;
    c.call("VolumeDriver.Remove", &json!({"Name": VOL}))?;
    drop(lamina);

    // ---- MooseFS: a lamina MooseFS volume vs a bare mfsmount of the same cluster ----
    if ctx.quick {
        skipped(figs, "moosefs: skipped in --quick (run the full bench for it)");
    } else if !have_moosefs() {
        skipped(
            figs,
            "moosefs: skipped, MooseFS is not installed (moosefs-master, -chunkserver, -client, -cli)",
        );
    } else {
        // A smaller file: MooseFS keeps two copies (goal 2) on the same scratch filesystem, through FUSE.
        let mfs_plan = IoPlan {
            file_bytes: 256 << 20,
            duration: Duration::from_secs(5),
        };
        moosefs(ctx, &dir.join("mfs"), &mfs_plan, figs)?;
    }
    Ok(())
}

/// [`Figure::push_skipped`] of this workload.
fn skipped(figs: &mut Vec<Figure>, why: &str) {
    Figure::push_skipped(figs, NAME, why);
}

/// The I/O loop on `volume` (subject `lamina`) and on `bare` (subject `bare_name`), alternating which goes first.
fn compare_io(
    ctx: &Ctx,
    plan: &IoPlan,
    what: &str,
    (volume, bare_name, bare): (&Path, &str, &Path),
    figs: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let mut vol: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut base: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut all_direct = true;
    for r in 0..ctx.runs {
        let order: [(&Path, bool); 2] = if r % 2 == 0 {
            [(volume, true), (bare, false)]
        } else {
            [(bare, false), (volume, true)]
        };
        for (d, is_vol) in order {
            let (v, direct) = io_round(d, plan, 0x5eed + r as u64)?;
            all_direct &= direct;
            let target = if is_vol { &mut vol } else { &mut base };
            for (k, x) in v.into_iter().enumerate() {
                target[k].push(x);
            }
        }
    }
    let mode = if all_direct { "O_DIRECT" } else { "buffered" };
    let case = format!("{what}, {} MiB file, {mode}", plan.file_bytes >> 20);
    let metrics = [
        ("seq write 1M", Unit::MBps),
        ("seq read 1M", Unit::MBps),
        ("rand read 4K", Unit::OpsPerSec),
        ("rand write 4K+fdatasync", Unit::OpsPerSec),
    ];
    for (k, (metric, unit)) in metrics.iter().enumerate() {
        let i = push(figs, &case, "lamina", metric, *unit, std::mem::take(&mut vol[k]));
        figs[i].goal = Some(format!(">= 0.95x {bare_name}"));
        push(
            figs,
            &case,
            bare_name,
            metric,
            *unit,
            std::mem::take(&mut base[k]),
        );
    }
    Ok(())
}

/// MooseFS: Mount/Unmount of a lamina MooseFS volume against a bare `mfsmount` + unmount of a cluster
/// subfolder, and the I/O loop in the volume against the same loop on the bare mount.
fn moosefs(ctx: &Ctx, dir: &Path, plan: &IoPlan, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    ctx.say("starting a MooseFS cluster");
    let cluster = MooseCluster::start_in(&dir.join("cluster"), 2);
    let bare_mnt = cluster.dir().join("bare-mnt");
    cluster.mount(&bare_mnt, "/");
    let bare = bare_mnt.join("bare-io");
    fs::create_dir_all(&bare)?;
    fs::create_dir_all(bare_mnt.join("mount-test"))?;
    let mount_base = dir.join("mnt");
    fs::create_dir_all(&mount_base)?;
    let run_dir = RunDir::new()?;
    let mut spec = lamina(ctx, "mfslam").plugin_socket(&run_dir.path.join("plugin.sock"));
    let toml = format!(
        "[volumes]\nbackend = \"moosefs\"\n[volumes.moosefs]\nmaster = \"{}:9421\"\nremote_path = \"/docker/volumes\"\n",
        cluster.master_host()
    );
    spec.extra_args = vec![
        "--volumes-mount-base".into(),
        mount_base.display().to_string(),
        "--config-toml".into(),
        toml,
    ];
    ctx.say("MooseFS: Mount/Unmount");
    let lamina = start(spec);
    let mut c = session(&lamina);
    c.call("VolumeDriver.Create", &json!({"Name": VOL, "Opts": {}}))
        .context("create the MooseFS volume")?;
    let name_id = json!({"Name": VOL, "ID": MOUNT_ID});
    let iters = 20;
    let case = "moosefs volume";
    let (mut lm, mut lu, mut bm, mut bu) = (vec![], vec![], vec![], vec![]);
    let target = cluster.dir().join("bare-mount-target");
    for _ in 0..ctx.runs {
        let (mut m, mut u, mut m2, mut u2) = (vec![], vec![], vec![], vec![]);
        for _ in 0..iters {
            let t = Instant::now();
            c.call("VolumeDriver.Mount", &name_id)?;
            m.push(us(t.elapsed()));
            let t = Instant::now();
            c.call("VolumeDriver.Unmount", &name_id)?;
            u.push(us(t.elapsed()));
            let t = Instant::now();
            cluster.mount(&target, "/mount-test");
            m2.push(us(t.elapsed()));
            let t = Instant::now();
            // Detached (lazily): a plain unmount right after mfsmount returns answers EBUSY.
            lamina_sys::mount::unmount(&target, true)?;
            u2.push(us(t.elapsed()));
        }
        lm.push(percentile(&mut m, 50.0));
        lu.push(percentile(&mut u, 50.0));
        bm.push(percentile(&mut m2, 50.0));
        bu.push(percentile(&mut u2, 50.0));
    }
    let i = push(figs, case, "lamina", "mount p50", Unit::Micros, lm);
    figs[i].goal = Some("<= 1 ms".into());
    push(figs, case, "lamina", "unmount p50", Unit::Micros, lu);
    push(figs, case, "mfsmount", "mount p50", Unit::Micros, bm);
    push(figs, case, "mfsmount", "unmount p50", Unit::Micros, bu);
    ctx.say("MooseFS: I/O through the volume and on a bare mfsmount");
    let mountpoint = mount_volume(&mut c, &name_id)?;
    compare_io(ctx, plan, "moosefs", (&mountpoint, "mfsmount", &bare), figs)?;
    c.call("VolumeDriver.Unmount", &name_id)?;
    c.call("VolumeDriver.Remove", &json!({"Name": VOL}))?;
    // lamina (and its own mfsmount) before the cluster.
    drop(lamina);
    drop(cluster);
    Ok(())
}
