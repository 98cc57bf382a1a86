//! End-to-end tests of the cluster tier (docs/cluster.md): a throw-away MooseFS cluster in a network namespace,
//! two "hosts" on this machine, each its own containerd 1.6 and lamina (own data roots) with the same tier
//! directory on its own MooseFS mount, and Debian's `docker-registry` on 127.0.0.1 serving an image the test
//! builds and pushes, with the registry's access log kept.
//!
//! Host A pulls with containerd's Pull-with-unpack (containerd's Go client, `tests/cluster/pull`): it fetches
//! and unpacks every layer, and lamina publishes each to the tier at Commit. Host B then pulls the same image:
//! each Prepare labelled with a chain id in the tier is answered AlreadyExists, so the registry serves B no
//! layer blob, and `ctr run` on B sees the image's files (from the tier). Then garbage collection across the
//! hosts: A's removal leaves the layers B holds; after B's removal the tier holds none of the image.
//!
//! The image is a busybox layer and five data layers (one with a whiteout) of `LAMINA_E2E_CLUSTER_MB` MB in all
//! (default 200). Needs root, containerd, MooseFS, docker-registry and Go with containerd's Go sources; without
//! them the test prints `SKIPPED` (and fails under `CI=true`).
//! Run: `cargo test -p lamina-integration-tests --test e2e_cluster -- --nocapture`.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use lamina_testkit::cluster::*;
use lamina_testkit::containerd::*;
use lamina_testkit::moosefs::{require_moosefs, MooseCluster};
use lamina_testkit::plugin::Registry;
use lamina_testkit::*;

/// Lease of the test hosts: short, so that garbage collection's grace for fresh publications passes quickly.
const LEASE_SECS: u64 = 3;

/// Fills `path` with `len` bytes of a deterministic pseudo-random stream seeded by `seed`.
fn write_noise(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    buf.truncate(len);
    fs::write(path, buf).unwrap();
}

/// The test image: busybox, then five data layers of `total_mb` MB in all under `/data/l<i>/`; layer 3 deletes
/// `/data/l2/gone` with a whiteout. Gives the layout, the archive and the files a container must see under
/// `/data` (`path size`, sorted).
fn build_image(work: &Path, name: &str, total_mb: usize) -> (OciImage, ImageArchive, Vec<String>) {
    let mut img = OciImage::new(&work.join("layout"), name);
    img.add_layer_tar(&busybox_layer(work));
    let per_layer = total_mb * 1024 * 1024 / 5;
    let files_per_layer = 8;
    let mut expect = BTreeSet::new();
    for l in 1..=5 {
        let tree = work.join(format!("tree{l}"));
        let dir = tree.join(format!("data/l{l}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..files_per_layer {
            let len = per_layer / files_per_layer;
            write_noise(&dir.join(format!("f{f}")), len, (l * 100 + f) as u64);
            expect.insert(format!("/data/l{l}/f{f} {len}"));
        }
        if l == 2 {
            fs::write(dir.join("gone"), b"deleted by layer 3\n").unwrap();
        }
        if l == 3 {
            let l2 = tree.join("data/l2");
            fs::create_dir_all(&l2).unwrap();
            fs::write(l2.join(".wh.gone"), b"").unwrap();
        }
        img.add_layer_dir(&tree);
        fs::remove_dir_all(&tree).unwrap();
    }
    let archive = img.write_archive(&work.join("image.tar"));
    let _ = fs::remove_file(work.join("image.tar"));
    (img, archive, expect.into_iter().collect())
}

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

fn gc_kinds(v: &serde_json::Value, kind: &str) -> BTreeSet<String> {
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["kind"] == kind)
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn second_host_pulls_nothing_the_cluster_has() {
    let test = "second_host_pulls_nothing_the_cluster_has";
    if !require_containerd(test)
        || !require_moosefs(test)
        || !require_bin(test, "docker-registry")
        || !require_go_containerd(test)
    {
        return;
    }
    let _serial = serial();
    let total_mb: usize = std::env::var("LAMINA_E2E_CLUSTER_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = TestDir::new(&unique_name("cluster"));
    pull_tool();

    // The cluster: MooseFS, one mount per host, the tier directory on it.
    let t0 = Instant::now();
    let mfs = MooseCluster::start("tier");
    let (mnt_a, mnt_b) = (mfs.scratch("mnt-a"), mfs.scratch("mnt-b"));
    mfs.mount(&mnt_a, "/");
    mfs.mount(&mnt_b, "/");
    fs::create_dir_all(mnt_a.join("tier")).unwrap();
    let (tier_a, tier_b) = (mnt_a.join("tier"), mnt_b.join("tier"));
    assert!(tier_b.is_dir(), "the tier is visible through the second mount");
    eprintln!(
        "[{test}] MooseFS up, mounted twice: {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The registry and the image.
    let registry = Registry::start(&dir.join("registry"));
    let (layout, archive, expect) = build_image(&dir.join("image"), "lamina/cluster:v1", total_mb);
    push_image(&registry.addr, &layout, &archive, "lamina/cluster", "v1");
    let _ = fs::remove_dir_all(dir.join("image"));
    let reference = format!("{}/lamina/cluster:v1", registry.addr);
    let layer_digests = archive.diff_ids.clone();
    eprintln!(
        "[{test}] image: {} layers, {} MB, pushed to {}",
        archive.chain_ids.len(),
        archive.layer_bytes / (1024 * 1024),
        registry.addr
    );

    let a = ClusterHost::start(&dir.join("a"), &tier_a, "host-a", LEASE_SECS);
    let b = ClusterHost::start(&dir.join("b"), &tier_b, "host-b", LEASE_SECS);

    // Host A: fetches and unpacks everything, publishes every layer.
    let mark = fs::metadata(registry.log()).map(|m| m.len()).unwrap_or(0);
    let t_a = pull_with_unpack(&a.ctrd, PROXY_NAME, &reference)
        .unwrap_or_else(|e| panic!("host A pull: {e}\nlamina A:\n{}", a.lamina.log_tail()));
    let reqs_a = registry_requests(registry.log(), mark);
    let gets_a = blob_gets(&reqs_a, &layer_digests);
    assert_eq!(
        gets_a.len(),
        layer_digests.len(),
        "host A fetches every layer blob once: {reqs_a:?}"
    );
    let published = tier_layers(&tier_b);
    for c in &archive.chain_ids {
        assert!(
            published.contains(c),
            "layer {c} is in the tier after host A's pull: {published:?}"
        );
        let hex = c.trim_start_matches("sha256:");
        for f in ["seal.json", "manifest", "diff"] {
            assert!(
                tier_b.join("layers").join(hex).join(f).exists(),
                "{c}: {f} published"
            );
        }
    }
    assert!(
        fs::read_dir(tier_b.join("staging")).unwrap().next().is_none(),
        "no publication is left half-made in staging/"
    );

    // Host B: the registry serves it the manifest and config only.
    let mark = fs::metadata(registry.log()).map(|m| m.len()).unwrap_or(0);
    let t_b = pull_with_unpack(&b.ctrd, PROXY_NAME, &reference)
        .unwrap_or_else(|e| panic!("host B pull: {e}\nlamina B:\n{}", b.lamina.log_tail()));
    let reqs_b = registry_requests(registry.log(), mark);
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

    // Host B runs the image from the tier's layers: exactly the image's files.
    let listing = b
        .ctrd
        .run_script(
            PROXY_NAME,
            &reference,
            "find /data -type f -exec stat -c '%n %s' {} + | sort; test ! -e /data/l2/gone && echo whiteout-ok",
        )
        .unwrap_or_else(|e| panic!("ctr run on host B: {e}\nlamina B:\n{}", b.lamina.log_tail()));
    let mut want = expect.join("\n");
    want.push_str("\nwhiteout-ok\n");
    assert_eq!(listing, want, "host B's container sees exactly the image's files");
    let sum_b = b
        .ctrd
        .run_script(PROXY_NAME, &reference, "sha256sum /data/l5/f7 | cut -d' ' -f1")
        .unwrap();
    let sum_a = a
        .ctrd
        .run_script(PROXY_NAME, &reference, "sha256sum /data/l5/f7 | cut -d' ' -f1")
        .unwrap();
    assert_eq!(sum_a, sum_b, "the same content on both hosts");

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
    let after_a = tier_layers(&tier_a);
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
    let left = tier_layers(&tier_a);
    assert!(
        archive.chain_ids.iter().all(|c| !left.contains(c)),
        "the tier still holds layers of the image: {left:?}"
    );
    drop(a);
    drop(b);
    drop(registry);
}
