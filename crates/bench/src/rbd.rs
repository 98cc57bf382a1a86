//! The `rbdlayers` workload: the RBD layer backend (`[store] backend = "rbd"`, docs/rbd.md) beside the overlay
//! backend on the same machine, through the graph-driver protocol: Create of a child on a small and on a big
//! parent (a clone: flat in the parent's size), a container layer's start and removal (CreateReadWrite, Get,
//! Put, Remove), ApplyDiff throughput; and the Ceph side's own floor (`rbd bench`, 4 MiB writes). Subject
//! `lamina` is the rbd backend, `lamina-overlay` the overlay backend.
//!
//! The cluster is testkit's `CephCluster` (one monitor, one OSD on 127.0.0.1): in `--quick` a memstore OSD
//! (data in RAM) and a 100 MB big parent; otherwise bluestore on a sparse 10 GiB file in the scratch
//! filesystem and a 5000 MB big parent (five files of 1000 MB). The big parent's tar is generated while it is
//! sent (testkit's `streamed_random_tar`: never on disk), so the OSD's file and the overlay backend's copy
//! hold it: about 10 GiB of the scratch filesystem while it runs (`--size 14` is enough). Without the Ceph
//! packages the workload records a `skipped` figure.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

use super::engines::{graph_session, lamina, start};
use super::{Ctx, Figure, Unit, Workload};
use lamina_testkit::ceph::{have_ceph, CephCluster, ObjectStore};
use lamina_testkit::{streamed_random_tar, Lamina, TarWriter};

/// The workload.
pub const RBD_LAYERS: Workload = Workload {
    name: "rbdlayers",
    about:
        "RBD layer backend beside overlay: Create of a child on a small and a big parent, container layer \
            start/remove, ApplyDiff MB/s; `rbd bench` write as the Ceph floor",
    per_fs: false,
    run,
};

const NAME: &str = "rbdlayers";

fn push(figs: &mut Vec<Figure>, case: &str, subject: &str, metric: &str, unit: Unit, samples: Vec<f64>) {
    Figure::push_to(figs, NAME, (case, subject, metric), unit, samples);
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// A tar of one file of `mb` MB, written to `path` (not held in memory).
fn tar_file(path: &Path, mb: u64) -> anyhow::Result<()> {
    let mut w = TarWriter::new(std::io::BufWriter::new(fs::File::create(path)?));
    w.random_file("data", mb << 20, mb)?;
    w.finish()?;
    Ok(())
}

fn run(ctx: &Ctx, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    if !have_ceph() {
        Figure::push_skipped(figs, NAME, "Ceph packages not installed");
        return Ok(());
    }
    let store = ctx.pick(ObjectStore::Memstore, ObjectStore::Bluestore);
    ctx.say(format!("starting a Ceph cluster ({store:?})"));
    let mut cluster = CephCluster::start_in(&ctx.scratch.join("ceph"), store);
    let result = measure(ctx, &cluster, figs);
    cluster.stop();
    result
}

fn measure(ctx: &Ctx, cluster: &CephCluster, figs: &mut Vec<Figure>) -> anyhow::Result<()> {
    let mut rbd = lamina(ctx, "rbd");
    let cfg = rbd.dir().join("config.toml");
    fs::create_dir_all(rbd.dir())?;
    fs::write(
        &cfg,
        format!(
            "[store]\nbackend = \"rbd\"\n[store.rbd]\nceph_conf = \"{}\"\npool = \"{}\"\nimage_prefix = \
             \"bench-\"\nmap = \"fuse\"\nsize = \"{}\"\n",
            cluster.conf().display(),
            cluster.pool,
            ctx.pick("5G", "8G"),
        ),
    )?;
    rbd.extra_args = vec!["--config".into(), cfg.display().to_string()];
    let mut engines: Vec<(&str, Lamina)> = vec![
        ("lamina", start(rbd)),
        ("lamina-overlay", start(lamina(ctx, "overlay"))),
    ];
    let big = ctx.pick(100, 5000);
    let cases = [
        (10u64, "10 MB parent".to_string()),
        (big, format!("{big} MB parent")),
    ];
    // The small parent's tar is a file; the big one's is generated while it is sent, in files of 1000 MB.
    tar_file(&ctx.scratch.join("layer-10.tar"), 10)?;
    let big_tar = || {
        let files = (0..big.div_ceil(1000))
            .map(|i| {
                let mb = (big - i * 1000).min(1000);
                (format!("data{i}"), mb << 20, big + i)
            })
            .collect();
        streamed_random_tar(files)
    };
    for (subject, l) in &mut engines {
        let mut c = graph_session(l)?;
        for (mb, case) in &cases {
            ctx.say(format!("{subject}: ApplyDiff of {case}"));
            let parent = format!("p{mb}");
            c.call("GraphDriver.Create", &json!({"ID": parent, "Parent": ""}))?;
            let mut tar: Box<dyn std::io::Read> = if *mb == 10 {
                Box::new(fs::File::open(ctx.scratch.join("layer-10.tar"))?)
            } else {
                Box::new(big_tar())
            };
            let t = Instant::now();
            c.apply_diff(&parent, "", &mut tar)?;
            let secs = t.elapsed().as_secs_f64();
            push(
                figs,
                case,
                subject,
                "ApplyDiff",
                Unit::MBps,
                vec![*mb as f64 / secs],
            );
            ctx.say(format!("{subject}: Create of a child on the {case}"));
            let mut create = Vec::new();
            for i in 0..ctx.runs {
                let child = format!("c{mb}-{i}");
                let t = Instant::now();
                c.call("GraphDriver.Create", &json!({"ID": child, "Parent": parent}))?;
                create.push(ms(t));
                c.call("GraphDriver.Remove", &json!({"ID": child}))?;
            }
            push(figs, case, subject, "Create of a child", Unit::Millis, create);
        }
        ctx.say(format!("{subject}: container layer start/remove"));
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for i in 0..ctx.runs {
            let id = format!("ctr-{i}");
            let t = Instant::now();
            c.call("GraphDriver.CreateReadWrite", &json!({"ID": id, "Parent": "p10"}))?;
            c.call("GraphDriver.Get", &json!({"ID": id, "MountLabel": ""}))?;
            up.push(ms(t));
            let t = Instant::now();
            c.call("GraphDriver.Put", &json!({"ID": id}))?;
            c.call("GraphDriver.Remove", &json!({"ID": id}))?;
            down.push(ms(t));
        }
        push(
            figs,
            "container layer",
            subject,
            "start (create + get)",
            Unit::Millis,
            up,
        );
        push(
            figs,
            "container layer",
            subject,
            "remove (put + remove)",
            Unit::Millis,
            down,
        );
        for (mb, _) in &cases {
            c.call("GraphDriver.Remove", &json!({"ID": format!("p{mb}")}))?;
        }
        drop(c);
        cleanup(l)?;
    }
    ctx.say("rbd bench (4 MiB writes, 4 threads, 256 MiB)");
    let pool = &cluster.pool;
    let img = format!("{pool}/bench-floor");
    cluster.rbd_ok(&["create", "--size", "1G", &img]);
    let out = cluster.rbd_ok(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4M",
        "--io-threads",
        "4",
        "--io-total",
        "256M",
        "--io-pattern",
        "seq",
        &img,
    ]);
    cluster.rbd_ok(&["rm", "--no-progress", &img]);
    push(
        figs,
        "4 MiB seq writes",
        "rbd bench",
        "write",
        Unit::MBps,
        vec![bench_mbps(&out)?],
    );
    Ok(())
}

fn cleanup(l: &mut Lamina) -> anyhow::Result<()> {
    let st = l.stop();
    if !st.success() {
        bail!("lamina serve exited with {st}; log:\n{}", l.log_tail());
    }
    Ok(())
}

/// MB/s from the summary line of `rbd bench` (`elapsed: 1   ops: 64   ops/sec: 52.1   bytes/sec: 208 MiB/s`).
fn bench_mbps(out: &str) -> anyhow::Result<f64> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("bytes/sec:"))
        .context("rbd bench printed no summary")?;
    let rest = line.split("bytes/sec:").nth(1).unwrap_or_default().trim();
    let mut it = rest.split_whitespace();
    let v: f64 = it
        .next()
        .unwrap_or_default()
        .parse()
        .context("rbd bench bytes/sec")?;
    let scale = match it.next().unwrap_or_default() {
        "GiB/s" => 1024.0 * 1.048_576,
        "MiB/s" => 1.048_576,
        "KiB/s" => 1.048_576 / 1024.0,
        _ => 1.0 / 1e6,
    };
    Ok(v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_bench_summary() {
        let out = "bench  type write io_size 4194304\n  SEC  OPS\nelapsed: 0   ops: 64   ops/sec: 132.2   bytes/sec: 529 MiB/s\n";
        assert!((bench_mbps(out).unwrap() - 554.7).abs() < 0.1);
        assert!(bench_mbps("nothing").is_err());
    }
}
