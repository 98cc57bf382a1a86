//! End-to-end tests of the cluster tier (docs/cluster.md): a throw-away MooseFS cluster in a network namespace,
//! two "hosts" on this machine, each its own containerd 1.6 and lamina (own data roots) with the same tier
//! directory on its own MooseFS mount, and Debian's `docker-registry` on 127.0.0.1 serving an image the test
//! builds and pushes, with the registry's access log kept.
//!
//! Host A pulls with containerd's Pull-with-unpack (containerd's Go client, `tests/cluster/pull`): it fetches
//! and unpacks every layer, and lamina publishes each to the tier at Commit. Host B then pulls the same image:
//! each Prepare labelled with a chain id in the tier is answered AlreadyExists, so the registry serves B no
//! layer blob, and `ctr run` on B sees the image's files (from the tier: each layer one EROFS image, which
//! host B mounts). Then garbage collection across the
//! hosts: A's removal leaves the layers B holds; after B's removal the tier holds none of the image.
//!
//! The kubelet path: with containerd's CRI plugin on (lamina its snapshotter), `ImageService.PullImage` on host
//! A then on host B (no layer blob for B), then on B `RunPodSandbox` in the host's network namespace (no CNI),
//! `CreateContainer`, `StartContainer` and `ExecSync` of a listing (testkit's `cri` client).
//!
//! Both hosts pulling a new image at the same moment unpack each layer once in the cluster (one host waits for
//! the other's claim). A host SIGKILLed in the middle of an unpack leaves no partial layer; the other host's
//! pull completes after the dead host's claim expires, and the killed host restarts consistent.
//!
//! A third host whose lamina mounts MooseFS itself (`[cluster.moosefs]`) takes the layers host A published, keeps
//! a container running across a restart that adopts its mount (one mfsmount), mounts again a mount whose
//! mfsmount died, and leaves no mount or mfsmount behind; a master that does not answer refuses such a start.
//!
//! The images are a busybox layer and five data layers (one with a whiteout) of `LAMINA_E2E_CLUSTER_MB` MB in
//! all (default 200 for the first test, a quarter of it for the others). Needs root, containerd, MooseFS,
//! docker-registry, Go with containerd's Go sources, `mkfs.erofs` and Linux 6.12+ (EROFS mounts backed by a
//! file); without them the test prints `SKIPPED` (and fails under `CI=true`).
//! Run: `cargo test -p lamina-integration-tests --test e2e_cluster -- --nocapture`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lamina_testkit::cluster::*;
use lamina_testkit::containerd::*;
use lamina_testkit::cri::{host_pod, Cri};
use lamina_testkit::moosefs::{require_moosefs, MooseCluster};
use lamina_testkit::plugin::Registry;
use lamina_testkit::*;

/// Lease of the test hosts: short, so that garbage collection's grace for fresh publications passes quickly.
const LEASE_SECS: u64 = 3;

/// Layer blob GETs among `requests`.
fn blob_gets(requests: &[(String, String)], layers: &[String]) -> Vec<String> {
    requests
        .iter()
        .filter(|(m, p)| m == "GET" && layers.iter().any(|d| p.ends_with(&format!("/blobs/{d}"))))
        .map(|(_, p)| p.clone())
        .collect()
}

fn tier_layers(tier: &Path) -> BTreeSet<String> {
    fs::read_dir(tier.join("layers"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

/// The master's per-mount operation counters (`mfscli -SMO`), for the figures in docs/cluster.md.
fn master_ops(mfs: &MooseCluster) -> String {
    let out = std::process::Command::new("mfscli")
        .args(["-H", &mfs.master_host(), "-SMO", "-m", "1", "-p", "-s", ";"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn gc_kinds(v: &serde_json::Value, kind: &str) -> BTreeSet<String> {
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["kind"] == kind)
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .collect()
}

/// The cluster of a test: MooseFS with one mount per host, the registry, and the two hosts. Fields drop in
/// order: the hosts (containerd, then lamina) before the registry, MooseFS and the test directory.
struct Cluster {
    a: ClusterHost,
    b: ClusterHost,
    registry: Registry,
    tier_a: PathBuf,
    tier_b: PathBuf,
    mfs: MooseCluster,
    dir: TestDir,
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

fn setup(test: &str) -> Option<Cluster> {
    setup_with(test, false)
}

/// The sandbox (pause) image of the hosts' CRI plugins, pushed by [`Cluster::push_pause`].
fn pause_image(registry: &Registry) -> String {
    format!("{}/lamina/pause:v1", registry.addr)
}

/// Whether the kernel mounts an EROFS image file without a loop device (Linux 6.12 and later), as the hosts'
/// lamina mounts the tier's image layers.
fn erofs_file_mounts() -> bool {
    let known =
        fs::read_to_string("/proc/filesystems").is_ok_and(|t| t.lines().any(|l| l.ends_with("erofs")));
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    known && (major, minor) >= (6, 12)
}

/// The cluster, with containerd's CRI plugin on in both hosts when `cri`.
fn setup_with(test: &str, cri: bool) -> Option<Cluster> {
    if !require_containerd(test)
        || !require_moosefs(test)
        || !require_bin(test, "docker-registry")
        || !require_bin(test, "mfscli")
        || !require_go_containerd(test)
        || !require_bin(test, "mkfs.erofs")
        || !require_kernel_feature(
            test,
            "EROFS mounts backed by a file (Linux 6.12+)",
            erofs_file_mounts(),
        )
    {
        return None;
    }
    let serial = serial();
    let dir = TestDir::new(&unique_name(test));
    pull_tool();
    let t0 = Instant::now();
    let mfs = MooseCluster::start("tier");
    let (mnt_a, mnt_b) = (mfs.scratch("mnt-a"), mfs.scratch("mnt-b"));
    mfs.mount(&mnt_a, "/");
    mfs.mount(&mnt_b, "/");
    fs::create_dir_all(mnt_a.join("tier")).unwrap();
    let (tier_a, tier_b) = (mnt_a.join("tier"), mnt_b.join("tier"));
    assert!(tier_b.is_dir(), "the tier is visible through the second mount");
    let registry = Registry::start(&dir.join("registry"));
    let pause = pause_image(&registry);
    let cri = cri.then_some((pause.as_str(), registry.addr.as_str()));
    let a = ClusterHost::start_with(&dir.join("a"), &tier_a, "host-a", LEASE_SECS, cri);
    let b = ClusterHost::start_with(&dir.join("b"), &tier_b, "host-b", LEASE_SECS, cri);
    eprintln!(
        "[{test}] MooseFS, registry and two hosts up: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Some(Cluster {
        a,
        b,
        registry,
        tier_a,
        tier_b,
        mfs,
        dir,
        _serial: serial,
    })
}

fn image_mb(share: usize) -> usize {
    std::env::var("LAMINA_E2E_CLUSTER_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
        / share
}

impl Cluster {
    /// Builds and pushes an image `lamina/<name>:v1`; gives its reference, archive description and files.
    fn image(&self, name: &str, mb: usize, seed: u64) -> (String, ImageArchive, Vec<String>) {
        let work = self.dir.join(format!("image-{name}"));
        let (layout, archive, expect) = layered_image(&work, &format!("lamina/{name}:v1"), mb, seed);
        push_image(
            &self.registry.addr,
            &layout,
            &archive,
            &format!("lamina/{name}"),
            "v1",
        );
        let _ = fs::remove_dir_all(&work);
        (
            format!("{}/lamina/{name}:v1", self.registry.addr),
            archive,
            expect,
        )
    }

    /// Builds and pushes the pods' sandbox image: busybox sleeping.
    fn push_pause(&self) {
        let work = self.dir.join("image-pause");
        let mut img = OciImage::new(&work.join("layout"), "lamina/pause:v1");
        img.cmd = vec!["/bin/sleep".into(), "3600".into()];
        img.add_layer_tar(&busybox_layer(&work));
        let archive = img.write_archive(&work.join("image.tar"));
        push_image(&self.registry.addr, &img, &archive, "lamina/pause", "v1");
        let _ = fs::remove_dir_all(&work);
    }

    /// Host `h`'s pull with unpack of `reference`: its time and the requests the registry logged meanwhile;
    /// the master's operation counters are printed after it.
    fn pull(&self, h: &ClusterHost, reference: &str) -> (Duration, Vec<(String, String)>) {
        let mark = fs::metadata(self.registry.log()).map(|m| m.len()).unwrap_or(0);
        let t = pull_with_unpack(&h.ctrd, PROXY_NAME, reference)
            .unwrap_or_else(|e| panic!("{} pull: {e}\nlamina:\n{}", h.host, h.lamina.log_tail()));
        let requests = registry_requests(self.registry.log(), mark);
        eprintln!(
            "master operations after {}'s pull:\n{}",
            h.host,
            master_ops(&self.mfs)
        );
        (t, requests)
    }

    /// Every published layer is whole: content, manifest and seal.
    /// Every published layer is whole: an image layer (the hosts' default format) with its manifest and seal.
    fn assert_tier_whole(&self) {
        for c in tier_layers(&self.tier_b) {
            let hex = c.trim_start_matches("sha256:");
            for f in ["seal-erofs.json", "manifest", "layer.erofs"] {
                assert!(
                    self.tier_b.join("layers").join(hex).join(f).exists(),
                    "{c}: {f} missing"
                );
            }
        }
    }
}

/// Host `h`'s pull of `reference`, tried again every second until it succeeds within `timeout`.
fn pull_eventually(h: &ClusterHost, reference: &str, timeout: Duration) {
    let mut last = String::new();
    let pulled = poll(timeout, || {
        match pull_with_unpack(&h.ctrd, PROXY_NAME, reference) {
            Ok(t) => Some(t),
            Err(e) => {
                last = e;
                std::thread::sleep(Duration::from_secs(1));
                None
            }
        }
    });
    assert!(
        pulled.is_some(),
        "{} pull: {last}\n{}",
        h.host,
        h.lamina.log_tail()
    );
}

/// Lines of `log` (a lamina log) that contain every one of `words`.
fn log_lines(log: &Path, words: &[&str]) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(str::to_string)
        .collect()
}

/// Host `h`'s lamina starts again; `h` pulls `reference` once containerd's connection to the proxy snapshotter
/// is back (after its gRPC reconnect backoff), and a new container sees exactly `expect`.
fn starts_pulls_and_runs(h: &mut ClusterHost, reference: &str, expect: &[String], what: &str) {
    h.lamina.start_again();
    pulls_and_runs(h, reference, expect, what);
}

/// Host `h` pulls `reference` once containerd's connection to the proxy snapshotter is back, and a new
/// container sees exactly `expect`.
fn pulls_and_runs(h: &ClusterHost, reference: &str, expect: &[String], what: &str) {
    pull_eventually(h, reference, Duration::from_secs(60));
    assert_runs_image(h, reference, expect, what);
}

/// A new container of `reference` on host `h` sees exactly the files `expect` under `/data`.
fn assert_runs_image(h: &ClusterHost, reference: &str, expect: &[String], what: &str) {
    let got = h
        .ctrd
        .run_script(
            PROXY_NAME,
            reference,
            "find /data -type f -exec stat -c '%n %s' {} + | sort",
        )
        .unwrap();
    let want = format!("{}\n", expect.join("\n"));
    if got != want {
        // What a second container sees, with its root mount's layers, and where each layer's content is.
        let again = h.ctrd.run_script(
            PROXY_NAME,
            reference,
            "find /data 2>&1 | head -40; grep ' / ' /proc/mounts",
        );
        let layers = h.lamina.layers_dir();
        let contents: Vec<String> = fs::read_dir(&layers)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| {
                        let diff = e.path().join("diff");
                        let link = fs::read_link(&diff).map(|l| l.display().to_string());
                        let entries = fs::read_dir(&diff).map(|d| d.count()).unwrap_or(0);
                        format!("{}: {link:?}, {entries} entries", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        panic!(
            "{what}: the container saw\n{got}\nwanted\n{want}\na second container: {again:?}\nlayers: {contents:#?}\nlamina:\n{}",
            h.lamina.log_tail()
        );
    }
}

/// What a new container of `reference` running `script` must print.
struct Listing<'a> {
    what: String,
    reference: &'a str,
    script: &'a str,
    want: String,
}

/// Asserts that `got` (a container's listing) is `l.want`; on a difference, names the lines missing and the
/// lines extra, what the tier holds for each differing path as host `h` sees it (a directory layer through its
/// mount of the shared filesystem, `tier`; an image layer through its mount of the image), what a second
/// container sees a moment later, and host `h`'s lamina log: a failure says whether the tier's copy, the mount's
/// view or the container's view differs.
fn assert_listing(l: &Listing, got: &str, h: &ClusterHost, tier: &Path, archive: &ImageArchive) {
    let (what, want) = (&l.what, l.want.as_str());
    if got == want {
        return;
    }
    let got_lines: BTreeSet<&str> = got.lines().collect();
    let want_lines: BTreeSet<&str> = want.lines().collect();
    let missing: Vec<&str> = want_lines.difference(&got_lines).copied().collect();
    let extra: Vec<&str> = got_lines.difference(&want_lines).copied().collect();
    let mut report = format!(
        "{what}: the listing differs\n  missing: {missing:?}\n  extra: {extra:?}\n  got {} lines, want {}\n",
        got.lines().count(),
        want.lines().count()
    );
    let paths: BTreeSet<&str> = missing
        .iter()
        .chain(&extra)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| p.starts_with('/'))
        .collect();
    for p in paths {
        for c in &archive.chain_ids {
            let hex = c.trim_start_matches("sha256:");
            let rel = p.trim_start_matches('/');
            let image = h.lamina.data_root.join("tier").join(hex).join(rel);
            let dir = tier.join("layers").join(hex).join("diff").join(rel);
            if let Ok(m) = fs::symlink_metadata(&image).or_else(|_| fs::symlink_metadata(&dir)) {
                report.push_str(&format!(
                    "  tier {c}: {p}: {} bytes, mode {:o}, mtime {:?}\n",
                    m.len(),
                    std::os::unix::fs::MetadataExt::mode(&m),
                    m.modified().ok()
                ));
            }
        }
    }
    // A second look a moment later tells a stale view (it then matches) from a wrong layer (it does not).
    std::thread::sleep(Duration::from_secs(2));
    match h.ctrd.run_script(PROXY_NAME, l.reference, l.script) {
        Ok(again) if again == want => report.push_str("a new container 2 s later sees the right listing\n"),
        Ok(again) => report.push_str(&format!("a new container 2 s later sees:\n{again}")),
        Err(e) => report.push_str(&format!("a new container 2 s later: {e}\n")),
    }
    report.push_str(&format!("lamina {}:\n{}", h.host, h.lamina.log_tail()));
    panic!("{report}");
}

#[test]
fn second_host_pulls_nothing_the_cluster_has() {
    let test = "second_host_pulls_nothing_the_cluster_has";
    let Some(cl) = setup(test) else { return };
    let (a, b) = (&cl.a, &cl.b);
    let total_mb = image_mb(1);
    let (reference, archive, expect) = cl.image("cluster", total_mb, 1);
    let layer_digests = archive.diff_ids.clone();
    eprintln!(
        "[{test}] image: {} layers, {} MB, pushed to {}",
        archive.chain_ids.len(),
        archive.layer_bytes / (1024 * 1024),
        cl.registry.addr
    );

    // Host A: fetches and unpacks everything, publishes every layer.
    eprintln!(
        "[{test}] master operations before the pulls:\n{}",
        master_ops(&cl.mfs)
    );
    let (t_a, reqs_a) = cl.pull(a, &reference);
    let gets_a = blob_gets(&reqs_a, &layer_digests);
    assert_eq!(
        gets_a.len(),
        layer_digests.len(),
        "host A fetches every layer blob once: {reqs_a:?}"
    );
    let published = tier_layers(&cl.tier_b);
    for c in &archive.chain_ids {
        assert!(
            published.contains(c),
            "layer {c} is in the tier after host A's pull: {published:?}"
        );
    }
    cl.assert_tier_whole();
    assert!(
        fs::read_dir(cl.tier_b.join("staging")).unwrap().next().is_none(),
        "no publication is left half-made in staging/"
    );
    // Host B: the registry serves it the manifest and config only.
    let (t_b, reqs_b) = cl.pull(b, &reference);
    let gets_b = blob_gets(&reqs_b, &layer_digests);
    assert!(
        gets_b.is_empty(),
        "the registry served host B layer blobs: {gets_b:?}"
    );
    eprintln!(
        "[{test}] pull with unpack: host A {:.2} s, host B {:.2} s ({:.3}x); registry requests from B: {reqs_b:?}",
        t_a.as_secs_f64(),
        t_b.as_secs_f64(),
        t_b.as_secs_f64() / t_a.as_secs_f64()
    );
    for l in log_lines(&a.lamina.log, &["layer shared with the cluster tier"]) {
        eprintln!("[{test}] host A: {l}");
    }
    for l in log_lines(&b.lamina.log, &["layer taken from the cluster tier"]) {
        eprintln!("[{test}] host B: {l}");
    }

    // Cluster statistics, read from the tier: every layer held by both hosts.
    let top = lamina_cli_json(&a.lamina.data_root, &["layers", "top", "--cluster", "-n", "100"]);
    for c in &archive.chain_ids {
        let row = top
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["chain"] == c.as_str())
            .unwrap_or_else(|| panic!("{c} in layers top --cluster: {top}"));
        assert_eq!(row["live_hosts"], 2, "{row}");
    }
    eprintln!(
        "[{test}] lamina layers top --cluster:\n{}",
        lamina_cli_ok(&a.lamina.data_root, &["layers", "top", "--cluster"])
    );

    // Host B runs the image from the tier's layers: exactly the image's files.
    let script =
        "find /data -type f -exec stat -c '%n %s' {} + | sort; test ! -e /data/l2/gone && echo whiteout-ok";
    let listing = b
        .ctrd
        .run_script(PROXY_NAME, &reference, script)
        .unwrap_or_else(|e| panic!("ctr run on host B: {e}\nlamina B:\n{}", b.lamina.log_tail()));
    let check = Listing {
        what: "host B's container sees exactly the image's files".into(),
        reference: &reference,
        script,
        want: format!("{}\nwhiteout-ok\n", expect.join("\n")),
    };
    assert_listing(&check, &listing, b, &cl.tier_b, &archive);
    let sum = |h: &ClusterHost| {
        h.ctrd
            .run_script(PROXY_NAME, &reference, "sha256sum /data/l5/f7 | cut -d' ' -f1")
            .unwrap()
    };
    assert_eq!(sum(a), sum(b), "the same content on both hosts");

    // Cluster statistics of use: a container running on host B uses every layer of the image; once it is
    // gone, no host uses them and both still hold them, with their last use kept.
    let id = "tier-user";
    b.ctrd
        .try_run_in(
            &b.ctrd.namespace,
            &["-d"],
            PROXY_NAME,
            &reference,
            id,
            "sleep 600",
        )
        .unwrap_or_else(|e| panic!("ctr run -d on host B: {e}"));
    let running = Instant::now();
    // Settled when every layer shows exactly the users wanted: host A's own use (its container just before)
    // may still be on record for a heartbeat.
    let rows = |want_users: &[&str]| {
        poll(Duration::from_secs(30), || {
            let top = lamina_cli_json(&a.lamina.data_root, &["layers", "top", "--cluster", "-n", "100"]);
            let rows: Vec<serde_json::Value> = top
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| archive.chain_ids.iter().any(|c| l["chain"] == c.as_str()))
                .cloned()
                .collect();
            let settled = rows.len() == archive.chain_ids.len()
                && rows.iter().all(|r| r["users"] == serde_json::json!(want_users));
            settled.then_some(rows)
        })
    };
    let used = rows(&["host-b"]).unwrap_or_else(|| {
        panic!(
            "layers top --cluster on host A shows every layer used by host B: {}",
            lamina_cli_ok(&a.lamina.data_root, &["layers", "top", "--cluster", "-n", "100"])
        )
    });
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    for r in &used {
        assert_eq!(r["users"][0], "host-b", "{r}");
        assert_eq!(r["live_hosts"], 2, "{r}");
        assert!(r["uses"].as_u64() >= Some(1), "{r}");
        let age_s = now_ns().saturating_sub(r["last_use_ns"].as_u64().unwrap()) as f64 / 1e9;
        assert!(age_s < 30.0, "a recent last use while the container runs: {r}");
    }
    eprintln!(
        "[{test}] host B's container seen in use after {:.1} s:\n{}",
        running.elapsed().as_secs_f64(),
        lamina_cli_ok(&a.lamina.data_root, &["layers", "top", "--cluster"])
    );
    b.ctrd.ctr_ok(&["task", "rm", "-f", id]);
    b.ctrd.ctr_ok(&["containers", "rm", id]);
    let stopped_ns = now_ns();
    let idle = rows(&[]).unwrap_or_else(|| {
        panic!(
            "layers top --cluster on host A shows no user after the container stopped: {}",
            lamina_cli_ok(&a.lamina.data_root, &["layers", "top", "--cluster", "-n", "100"])
        )
    });
    for r in &idle {
        assert_eq!(r["live_hosts"], 2, "both hosts still hold it: {r}");
        assert_eq!(r["uses"], 0, "{r}");
        let last = r["last_use_ns"].as_u64().unwrap();
        // Recorded by the write that found the use ended (the tier's clock counts whole seconds).
        assert!(
            last + 2_000_000_000 >= stopped_ns,
            "the last use is the end of the container's use: {r}"
        );
    }
    eprintln!(
        "[{test}] after the container stopped:\n{}",
        lamina_cli_ok(&a.lamina.data_root, &["layers", "top", "--cluster"])
    );

    // Garbage collection across hosts. Fresh publications are kept for a lease; wait it out.
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 1));
    let dry = a.gc(true);
    assert!(
        gc_kinds(&dry, "tier_layer").is_empty(),
        "both hosts hold the image: no tier layer is garbage: {dry}"
    );
    // Host A removes the image; its snapshots go with containerd's collection, its references with lamina's.
    a.ctrd.ctr_ok(&["images", "rm", "--sync", &reference]);
    a.ctrd.gc_now();
    let gc_a = a.gc(false);
    assert!(
        gc_kinds(&gc_a, "tier_layer").is_empty(),
        "host B still holds every layer: host A's collection takes none: {gc_a}"
    );
    let after_a = tier_layers(&cl.tier_a);
    for c in &archive.chain_ids {
        assert!(after_a.contains(c), "{c} stays in the tier while host B holds it");
    }
    let again = b
        .ctrd
        .run_script(PROXY_NAME, &reference, "cat /data/l1/f0 | wc -c")
        .unwrap();
    assert_eq!(
        again.trim(),
        (total_mb * 1024 * 1024 / 5 / 8).to_string(),
        "host B still reads its layers"
    );
    // Host B removes it too: the tier holds none of the image after its collection.
    b.ctrd.ctr_ok(&["images", "rm", "--sync", &reference]);
    b.ctrd.gc_now();
    let dry_b = b.gc(true);
    let listed: BTreeSet<String> = gc_kinds(&dry_b, "tier_layer");
    let want: BTreeSet<String> = archive.chain_ids.iter().cloned().collect();
    assert_eq!(
        listed, want,
        "lamina gc --dry-run on host B lists the image's tier layers: {dry_b}"
    );
    let gc_b = b.gc(false);
    assert_eq!(gc_kinds(&gc_b, "tier_layer"), want, "{gc_b}");
    let left = tier_layers(&cl.tier_a);
    assert!(
        archive.chain_ids.iter().all(|c| !left.contains(c)),
        "the tier still holds layers of the image: {left:?}"
    );
}

#[test]
fn simultaneous_pulls_unpack_each_layer_once() {
    let test = "simultaneous_pulls_unpack_each_layer_once";
    let Some(cl) = setup(test) else { return };
    let (reference, archive, expect) = cl.image("together", image_mb(4), 2);
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| pull_with_unpack(&cl.a.ctrd, PROXY_NAME, &reference));
        let tb = s.spawn(|| pull_with_unpack(&cl.b.ctrd, PROXY_NAME, &reference));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let ta = ra.unwrap_or_else(|e| panic!("host A: {e}\n{}", cl.a.lamina.log_tail()));
    let tb = rb.unwrap_or_else(|e| panic!("host B: {e}\n{}", cl.b.lamina.log_tail()));
    // Every layer was unpacked (committed with its chain id and offered to the tier) once in the cluster.
    let mut unpacked = Vec::new();
    for (h, host) in [(&cl.a, "A"), (&cl.b, "B")] {
        for c in &archive.chain_ids {
            let n = log_lines(&h.lamina.log, &["layer shared with the cluster tier", c]).len();
            unpacked.extend(std::iter::repeat_n(format!("{host} {c}"), n));
        }
    }
    eprintln!(
        "[{test}] pulls at the same moment: A {:.2} s, B {:.2} s; unpacks: {unpacked:?}",
        ta.as_secs_f64(),
        tb.as_secs_f64()
    );
    assert_eq!(
        unpacked.len(),
        archive.chain_ids.len(),
        "each layer unpacked once in the cluster"
    );
    cl.assert_tier_whole();
    let listing_cmd = "find /data -type f -exec stat -c '%n %s' {} + | sort";
    for h in [&cl.a, &cl.b] {
        let got = h.ctrd.run_script(PROXY_NAME, &reference, listing_cmd).unwrap();
        let tier = if h.host == cl.a.host {
            &cl.tier_a
        } else {
            &cl.tier_b
        };
        let check = Listing {
            what: format!("host {} runs the image", h.host),
            reference: &reference,
            script: listing_cmd,
            want: format!("{}\n", expect.join("\n")),
        };
        assert_listing(&check, &got, h, tier, &archive);
    }
}

#[test]
fn killed_host_leaves_no_partial_layer() {
    let test = "killed_host_leaves_no_partial_layer";
    let Some(mut cl) = setup(test) else { return };
    let (reference, archive, expect) = cl.image("killed", image_mb(4), 3);
    let claims = cl.tier_b.join("claims/layer");
    // Host A pulls; it is SIGKILLed as soon as it holds a claim past the first layer (it is unpacking).
    let first_hex = archive.chain_ids[0].trim_start_matches("sha256:").to_string();
    let killed_at = std::thread::scope(|s| {
        let pull = s.spawn(|| pull_with_unpack(&cl.a.ctrd, PROXY_NAME, &reference));
        let claimed = poll(Duration::from_secs(120), || {
            fs::read_dir(&claims).ok()?.filter_map(|e| e.ok()).find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = fs::read_to_string(e.path()).is_ok_and(|t| t.contains("host-a"));
                (ours && !name.starts_with('.') && name != first_hex).then_some(name)
            })
        });
        let claimed = claimed.expect("host A claimed a layer");
        cl.a.lamina.kill9();
        let r = pull.join().unwrap();
        assert!(r.is_err(), "host A's pull cannot finish without its snapshotter");
        claimed
    });
    eprintln!("[{test}] host A killed while it held the claim on sha256:{killed_at}");
    cl.assert_tier_whole();
    assert!(
        !tier_layers(&cl.tier_b).contains(&format!("sha256:{killed_at}")),
        "the layer host A was unpacking is not in the tier"
    );
    // Host B's pull completes once A's claim expires, and unpacks what A did not publish.
    let t0 = Instant::now();
    let tb = pull_with_unpack(&cl.b.ctrd, PROXY_NAME, &reference)
        .unwrap_or_else(|e| panic!("host B: {e}\n{}", cl.b.lamina.log_tail()));
    eprintln!(
        "[{test}] host B's pull: {:.2} s (the lease is {LEASE_SECS} s)",
        tb.as_secs_f64()
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "host B waited too long");
    cl.assert_tier_whole();
    for c in &archive.chain_ids {
        assert!(
            tier_layers(&cl.tier_b).contains(c),
            "{c} in the tier after host B's pull"
        );
    }
    // Host A restarts consistent: it pulls the image (from the tier) and runs it.
    starts_pulls_and_runs(
        &mut cl.a,
        &reference,
        &expect,
        "host A runs the image after its restart",
    );
    let staging: Vec<_> = fs::read_dir(cl.tier_b.join("staging")).unwrap().collect();
    assert!(
        staging.is_empty(),
        "host A's restart removed its cut-short publication: {staging:?}"
    );
}

#[test]
fn host_killed_after_a_commit_before_its_publication_runs_the_image_after_restart() {
    killed_before_publication(
        "host_killed_after_a_commit_before_its_publication_runs_the_image_after_restart",
        "store.commit.done=kill@2",
    );
}

#[test]
fn host_killed_during_a_publication_runs_the_image_after_restart() {
    killed_before_publication(
        "host_killed_during_a_publication_runs_the_image_after_restart",
        "tier.publish.rename=kill@2",
    );
}

/// Host A dies at its second layer's Commit (at the fault point `fault`, between the commit and the end of
/// the layer's publication): it holds a committed layer containerd never recorded and the tier never
/// received. Host B publishes the image; host A, restarted, pulls it from the tier and runs it.
fn killed_before_publication(test: &str, fault: &str) {
    let Some(mut cl) = setup(test) else { return };
    let (reference, archive, expect) = cl.image("commit-kill", image_mb(4), 4);
    cl.a.lamina.kill9_and_start(Some(fault));
    // containerd's connection to the restarted snapshotter comes back after its reconnect backoff: pulls
    // fail fast until then.
    let t0 = Instant::now();
    while cl.a.lamina.running() {
        let r = pull_with_unpack(&cl.a.ctrd, PROXY_NAME, &reference);
        assert!(r.is_err(), "host A's pull cannot finish: its lamina dies");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "host A's lamina died at its second commit"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let second = &archive.chain_ids[1];
    assert!(
        !tier_layers(&cl.tier_b).contains(second),
        "the layer committed at the kill is not in the tier"
    );
    // Host B publishes every layer (it waits for A's claim to expire).
    cl.pull(&cl.b, &reference);
    for c in &archive.chain_ids {
        assert!(tier_layers(&cl.tier_b).contains(c), "{c} in the tier");
    }
    // Host A restarts: its pull takes the layers from the tier and its container sees the whole image.
    cl.a.lamina.env.retain(|(k, _)| k != "LAMINA_FAULTS");
    starts_pulls_and_runs(
        &mut cl.a,
        &reference,
        &expect,
        "host A runs the image after its restart",
    );
    // A restart after it (containerd's view, lamina's records and the tier agree) still runs it.
    cl.a.lamina.restart();
    pulls_and_runs(
        &cl.a,
        &reference,
        &expect,
        "host A runs the image after a second restart",
    );
}

/// The one `mfsmount` serving something below `data_root`; panics (naming them) unless there is exactly one.
fn one_mfsmount(data_root: &Path, when: &str) -> u32 {
    let pids = lamina_testkit::moosefs::mfsmount_pids(data_root);
    assert_eq!(
        pids.len(),
        1,
        "{when}: exactly one mfsmount of the tier: {pids:?}"
    );
    pids[0]
}

#[test]
fn a_host_that_mounts_moosefs_itself_uses_the_tier_and_adopts_its_mount() {
    let test = "a_host_that_mounts_moosefs_itself_uses_the_tier_and_adopts_its_mount";
    let Some(cl) = setup(test) else { return };
    let (reference, archive, expect) = cl.image("own-mount", image_mb(8), 5);
    cl.pull(&cl.a, &reference);
    // A master that does not answer: lamina refuses to start, at once, saying why; nothing is mounted.
    let mut refused = lamina_testkit::containerd::LaminaSnap::new(&cl.dir.join("unreachable"));
    refused.use_config(&format!(
        "[cluster.moosefs]\nmaster = \"{}:1\"\nremote_path = \"/tier\"\n",
        cl.mfs.master_host()
    ));
    refused.spawn();
    let t0 = Instant::now();
    match refused.poll_ready(Duration::from_secs(30)) {
        Ready::Exited(st) => assert!(!st.success(), "{st}"),
        other => panic!(
            "lamina with an unreachable master: {other:?}\n{}",
            refused.log_tail()
        ),
    }
    let refused_after = t0.elapsed();
    assert!(
        refused_after < Duration::from_secs(10),
        "refused in {refused_after:?}"
    );
    let log = fs::read_to_string(&refused.log).unwrap();
    assert!(
        log.contains("[cluster.moosefs]: mounting the tier's MooseFS") && log.contains("is unreachable"),
        "{log}"
    );
    assert!(mounts_under(&refused.data_root).is_empty());
    eprintln!("[{test}] an unreachable master refused the start in {refused_after:?}");
    drop(refused);
    // Host C: its lamina mounts MooseFS itself, the tier being the directory host A's operator mount shows.
    let t0 = Instant::now();
    let mut c = ClusterHost::start_mounting(
        &cl.dir.join("c"),
        &cl.mfs.master_addr(),
        "/tier",
        "host-c",
        LEASE_SECS,
    );
    let data_root = c.lamina.data_root.clone();
    let mountpoint = data_root.join("cluster/moosefs");
    eprintln!(
        "[{test}] host C (lamina mounting MooseFS itself) up: {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        is_mounted(&mountpoint),
        "lamina mounted MooseFS at {}",
        mountpoint.display()
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(data_root.join("cluster")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "the mount's parent is private");
    let first = one_mfsmount(&data_root, "after the first start");
    // Host C takes every layer from the tier: no layer blob from the registry.
    let (tc, requests) = cl.pull(&c, &reference);
    assert!(
        blob_gets(&requests, &archive.diff_ids).is_empty(),
        "host C fetched no layer blob: {requests:?}"
    );
    eprintln!("[{test}] host C's pull: {:.2} s", tc.as_secs_f64());
    for chain in &archive.chain_ids {
        let image = data_root.join("tier").join(chain.trim_start_matches("sha256:"));
        assert!(is_mounted(&image), "{chain}: its image is mounted on host C");
    }
    let script = "sha256sum /data/l5/f7 | cut -d' ' -f1";
    let want = cl.a.ctrd.run_script(PROXY_NAME, &reference, script).unwrap();
    // A container runs on host C's tier layers across a restart of its lamina, which adopts its mount.
    let id = "own-mount-user";
    c.ctrd
        .try_run_in(
            &c.ctrd.namespace,
            &["-d"],
            PROXY_NAME,
            &reference,
            id,
            "sleep 600",
        )
        .unwrap_or_else(|e| panic!("ctr run -d on host C: {e}"));
    c.lamina.restart();
    assert!(
        !log_lines(
            &c.lamina.log,
            &["cluster tier on lamina's MooseFS mount", "adopted=true"]
        )
        .is_empty(),
        "the restart adopted the mount:\n{}",
        c.lamina.log_tail()
    );
    assert_eq!(
        one_mfsmount(&data_root, "after a restart"),
        first,
        "the same mfsmount"
    );
    assert_eq!(
        c.ctrd.exec(id, script),
        want,
        "the running container reads its layers after the restart"
    );
    pull_eventually(&c, &reference, Duration::from_secs(60));
    c.ctrd.remove_container(id);
    // Its mfsmount died while lamina was down: the dead mount is detached and made again, and the image
    // layers, mounted through the dead one, are mounted again through the new one.
    let st = c.lamina.stop();
    assert!(st.success(), "lamina exited with {st} on SIGTERM");
    assert!(
        is_mounted(&mountpoint),
        "a stop leaves the mount for the next start"
    );
    signal(first, "KILL");
    assert!(
        poll(Duration::from_secs(10), || {
            lamina_testkit::moosefs::mfsmount_pids(&data_root)
                .is_empty()
                .then_some(())
        })
        .is_some(),
        "mfsmount killed"
    );
    c.lamina.start_again();
    let second = one_mfsmount(&data_root, "after a start on a dead mount");
    assert_ne!(second, first, "a new mfsmount");
    assert_eq!(
        log_lines(
            &c.lamina.log,
            &["image layer mount of the previous MooseFS mount detached"]
        )
        .len(),
        archive.chain_ids.len(),
        "the image layers' mounts made through the dead mount were detached:\n{}",
        c.lamina.log_tail()
    );
    pull_eventually(&c, &reference, Duration::from_secs(60));
    assert_eq!(
        c.ctrd.run_script(PROXY_NAME, &reference, script).unwrap(),
        want,
        "host C runs the image through its new mount"
    );
    assert_runs_image(&c, &reference, &expect, "host C sees the image's files");
    // Nothing of host C is left mounted or running once it is gone.
    drop(c);
    let clean = poll(Duration::from_secs(20), || {
        (lamina_testkit::moosefs::mfsmount_pids(&data_root).is_empty() && mounts_under(&data_root).is_empty())
            .then_some(())
    });
    assert!(
        clean.is_some(),
        "host C left mfsmount {:?} and mounts {:?}",
        lamina_testkit::moosefs::mfsmount_pids(&data_root),
        mounts_under(&data_root)
    );
}

#[test]
fn a_stopped_master_fails_pulls_fast_and_they_work_again_after_it() {
    let test = "a_stopped_master_fails_pulls_fast_and_they_work_again_after_it";
    let Some(mut cl) = setup(test) else { return };
    let (first, _, expect) = cl.image("before", image_mb(8), 4);
    let (second, _, _) = cl.image("during", image_mb(8), 5);
    cl.pull(&cl.a, &first);
    cl.mfs.kill_master();
    // A pull that needs the tier fails with the tier's error, soon.
    let t0 = Instant::now();
    let err =
        pull_with_unpack(&cl.b.ctrd, PROXY_NAME, &second).expect_err("a pull without the tier's master");
    eprintln!(
        "[{test}] pull with the master down failed after {:.1} s: {err}",
        t0.elapsed().as_secs_f64()
    );
    assert!(err.contains("cluster tier"), "the error names the tier: {err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "the pull failed fast");
    // Host A's layers are local (it unpacked them): its containers keep working.
    let listing_cmd = "find /data -type f -exec stat -c '%n %s' {} + | sort";
    let got = cl.a.ctrd.run_script(PROXY_NAME, &first, listing_cmd).unwrap();
    assert_eq!(
        got,
        format!("{}\n", expect.join("\n")),
        "host A runs its local image"
    );
    // The master comes back: the same pull works, without an operator.
    cl.mfs.start_master(true);
    pull_eventually(&cl.b, &second, Duration::from_secs(90));
}

#[test]
fn kubelet_path_pulls_nothing_the_cluster_has() {
    let test = "kubelet_path_pulls_nothing_the_cluster_has";
    let Some(cl) = setup_with(test, true) else { return };
    cl.push_pause();
    let (reference, archive, expect) = cl.image("cri", image_mb(8), 6);
    let (cri_a, cri_b) = (Cri::connect(&cl.a.ctrd), Cri::connect(&cl.b.ctrd));
    let v = cri_b
        .version()
        .unwrap_or_else(|e| panic!("CRI Version: {e}\ncontainerd B:\n{}", cl.b.ctrd.log_tail()));
    eprintln!(
        "[{test}] CRI: {} {} (API {})",
        v.runtime_name, v.runtime_version, v.runtime_api_version
    );
    // Host A pulls through the CRI plugin: fetches and unpacks every layer, lamina publishes them.
    let t0 = Instant::now();
    cri_a
        .pull(&reference)
        .unwrap_or_else(|e| panic!("CRI PullImage on host A: {e}\n{}", cl.a.lamina.log_tail()));
    let t_a = t0.elapsed();
    let published = tier_layers(&cl.tier_b);
    assert!(
        archive.chain_ids.iter().all(|c| published.contains(c)),
        "host A's CRI pull published every layer: {published:?}"
    );
    // Host B's PullImage: manifest and config only from the registry.
    let mark = fs::metadata(cl.registry.log()).map(|m| m.len()).unwrap_or(0);
    let t0 = Instant::now();
    let image_ref = cri_b
        .pull(&reference)
        .unwrap_or_else(|e| panic!("CRI PullImage on host B: {e}\n{}", cl.b.lamina.log_tail()));
    let t_b = t0.elapsed();
    let reqs_b = registry_requests(cl.registry.log(), mark);
    let gets_b = blob_gets(&reqs_b, &archive.diff_ids);
    assert!(
        gets_b.is_empty(),
        "the registry served host B layer blobs through CRI: {gets_b:?}"
    );
    eprintln!(
        "[{test}] CRI PullImage: host A {:.2} s, host B {:.2} s ({image_ref}); registry requests from B: {reqs_b:?}",
        t_a.as_secs_f64(),
        t_b.as_secs_f64()
    );
    // A pod in the host's network namespace (no CNI), a container of the image in it.
    let pod = host_pod("tier");
    let pod_id = cri_b.run_pod(&pod).unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox on host B: {e}\ncontainerd B:\n{}",
            cl.b.ctrd.log_tail()
        )
    });
    let ctr_id = cri_b
        .start_container(&pod_id, &pod, "data", &reference, &["/bin/sleep", "3600"])
        .unwrap_or_else(|e| {
            panic!(
                "Create/StartContainer on host B: {e}\ncontainerd B:\n{}",
                cl.b.ctrd.log_tail()
            )
        });
    let script =
        "find /data -type f -exec stat -c '%n %s' {} + | sort; test ! -e /data/l2/gone && echo whiteout-ok";
    let got = cri_b
        .exec(&ctr_id, &["/bin/sh", "-c", script])
        .unwrap_or_else(|e| panic!("ExecSync on host B: {e}"));
    assert_eq!(
        got,
        format!("{}\nwhiteout-ok\n", expect.join("\n")),
        "host B's CRI container sees exactly the image's files"
    );
    cri_b.remove_pod(&pod_id).expect("remove the pod");
}

/// Bytes of the regular files below `dir`, symbolic links not followed (a layer linked to the tier counts
/// nothing here).
fn local_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

#[test]
fn dockerd_keeps_no_local_copy_of_layers_the_tier_has() {
    let test = "dockerd_keeps_no_local_copy_of_layers_the_tier_has";
    if !require_docker(test) {
        return;
    }
    let Some(cl) = setup(test) else { return };
    let (reference, archive, expect) = cl.image("dockerd", image_mb(4), 7);
    // Host A's containerd pull publishes every layer.
    cl.pull(&cl.a, &reference);
    let published = tier_layers(&cl.tier_b);
    assert!(archive.chain_ids.iter().all(|c| published.contains(c)));

    // Host D: dockerd 20.10 on a lamina graph driver in the same cluster (the tier through host B's mount).
    let mut lamina = Lamina::new(&unique_name("tierd"));
    lamina.use_config(&format!(
        "[cluster]\ndir = {:?}\nhost_id = \"host-d\"\nlease_secs = {LEASE_SECS}\nheartbeat_secs = 1\n",
        cl.tier_b
    ));
    lamina.spawn();
    lamina.wait_ready();
    let d = Dockerd::start(&lamina.name);
    // dockerd fetches and applies every layer itself (the registry is on 127.0.0.1: plain HTTP is allowed).
    let t0 = Instant::now();
    d.ok(&["pull", &reference]);
    eprintln!("[{test}] docker pull: {:.2} s", t0.elapsed().as_secs_f64());
    let swapped = log_lines(
        &lamina.log,
        &["applied layer stored in the cluster tier instead of a local copy"],
    );
    assert_eq!(
        swapped.len(),
        archive.chain_ids.len(),
        "every applied layer became a link to the tier:\n{}",
        lamina.log_tail()
    );
    // Every image layer's content directory is a link to this host's mount of the tier's image of that
    // layer; no second local copy.
    let layers = lamina.data_root.join("layers");
    let mut links = BTreeSet::new();
    for e in fs::read_dir(&layers).unwrap().filter_map(|e| e.ok()) {
        let diff = e.path().join("diff");
        if let Ok(target) = fs::read_link(&diff) {
            links.insert(target);
        }
    }
    let want_links: BTreeSet<PathBuf> = archive
        .chain_ids
        .iter()
        .map(|c| {
            lamina
                .data_root
                .join("tier")
                .join(c.trim_start_matches("sha256:"))
        })
        .collect();
    assert_eq!(links, want_links, "the image's layers link to their mounts");
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for c in &archive.chain_ids {
        let hex = c.trim_start_matches("sha256:");
        let image = cl.tier_b.join("layers").join(hex).join("layer.erofs");
        let mount = lamina.data_root.join("tier").join(hex);
        assert!(
            table.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let dash = f.iter().position(|x| *x == "-").unwrap_or(f.len());
                f.get(4) == Some(&mount.to_str().unwrap())
                    && f.get(dash + 1) == Some(&"erofs")
                    && f.get(dash + 2) == Some(&image.to_str().unwrap())
            }),
            "{} is the tier's image {} mounted read-only",
            mount.display(),
            image.display()
        );
    }
    let local = local_bytes(&layers);
    eprintln!(
        "[{test}] local bytes under the data root's layers: {local} (the image's layers: {})",
        archive.layer_bytes
    );
    assert!(
        local < archive.layer_bytes / 10,
        "no second local copy: {local} bytes local for {} bytes of layers",
        archive.layer_bytes
    );
    // A container reads the image's files from the tier.
    let script =
        "find /data -type f -exec stat -c '%n %s' {} + | sort; test ! -e /data/l2/gone && echo whiteout-ok";
    let run_sh = |script: &str| {
        let args = [
            "run",
            "--rm",
            "--network",
            "none",
            &reference,
            "/bin/sh",
            "-c",
            script,
        ];
        d.ok(&args)
    };
    let got = run_sh(script);
    assert_eq!(
        format!("{got}\n"),
        format!("{}\nwhiteout-ok\n", expect.join("\n")),
        "docker run on the tier's layers sees exactly the image's files"
    );
    let sum = run_sh("sha256sum /data/l5/f7 | cut -d' ' -f1");
    let on_a =
        cl.a.ctrd
            .run_script(PROXY_NAME, &reference, "sha256sum /data/l5/f7 | cut -d' ' -f1")
            .unwrap();
    assert_eq!(sum.trim(), on_a.trim(), "the same content as host A's");
    // dockerd before its driver.
    drop(d);
    drop(lamina);
}
