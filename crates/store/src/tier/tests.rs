//! The tier between two stores on one shared directory (a plain temporary directory here): publication,
//! adoption, the publish race, waiting on another host's claim, and garbage collection across hosts. Nothing
//! here mounts or needs root.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lamina_lease::{HostId, Lease, LeaseConfig};
use lamina_sys::mounter::{FakeMounter, Mounter};

use crate::{GarbageKind, GcOptions, LayerKind, NewLayer, OpenOptions, Store, TierOptions};

const NS: &str = "containerd:lamina";

/// `Store::adopt_shared` of the chain `name` with no parent and no labels: whether the layer is here now.
fn adopt(s: &Store, name: &str) -> bool {
    s.adopt_shared(NS, name, None, BTreeMap::new()).unwrap()
}

fn chain(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn lease(tier: &Path, host: &str) -> Lease {
    Lease::open(LeaseConfig {
        dir: tier.to_path_buf(),
        host: HostId::new(host).unwrap(),
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_secs(1),
    })
    .unwrap()
}

fn open(root: &Path, tier: &Path, lease: &Lease) -> Store {
    let mounter: Arc<dyn Mounter> = Arc::new(FakeMounter::new());
    Store::open_with_options(
        root,
        OpenOptions {
            mounter: Some(mounter),
            tier: Some(TierOptions {
                dir: tier.to_path_buf(),
                lease: lease.clone(),
                claim_wait: Duration::from_secs(1),
            }),
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// Two hosts, `a` and `b`, on one tier directory.
struct Hosts {
    _dir: tempfile::TempDir,
    tier: std::path::PathBuf,
    la: Lease,
    lb: Lease,
    a: Store,
    b: Store,
}

impl Hosts {
    fn new() -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let tier = dir.path().join("tier");
        std::fs::create_dir_all(&tier).unwrap();
        let (la, lb) = (lease(&tier, "a"), lease(&tier, "b"));
        let a = open(&dir.path().join("a"), &tier, &la);
        let b = open(&dir.path().join("b"), &tier, &lb);
        Hosts {
            _dir: dir,
            tier,
            la,
            lb,
            a,
            b,
        }
    }
}

/// A committed layer `name` holding `file` with `text`, unpacked here as containerd would (write, commit).
fn unpack(s: &Store, name: &str, file: &str, text: &str) {
    let key = format!("extract {name}");
    s.create(NewLayer::new(NS, &key, LayerKind::ReadWrite)).unwrap();
    std::fs::write(s.info(NS, &key).unwrap().diff_dir.join(file), text).unwrap();
    s.commit(NS, &key, name, BTreeMap::new()).unwrap();
}

/// Host `s` finds chain `chain` missing from the tier, claims it, unpacks it as `name` (one file) and publishes it.
fn unpack_and_publish(s: &Store, chain: &str, name: &str, file: &str, text: &str) {
    assert!(
        !adopt(s, chain),
        "{chain} is not in the tier: this host unpacks it"
    );
    unpack(s, name, file, text);
    assert!(s.publish_shared(NS, name, chain).unwrap());
}

fn tier_gc(s: &Store, dry_run: bool) -> Vec<String> {
    s.gc(&GcOptions {
        dry_run,
        ..GcOptions::default()
    })
    .unwrap()
    .items
    .into_iter()
    .filter(|g| g.kind == GarbageKind::TierLayer)
    .filter_map(|g| g.name)
    .collect()
}

#[test]
fn a_published_layer_is_adopted_by_another_host_and_collected_when_no_host_holds_it() {
    let h = Hosts::new();
    let (tier, la, lb, a, b) = (&h.tier, &h.la, &h.lb, &h.a, &h.b);
    let c1 = chain(1);

    // Host A unpacks and publishes.
    unpack_and_publish(a, &c1, "a/1/layer", "hello", "hi\n");
    let hex = c1.trim_start_matches("sha256:");
    let published = tier.join("layers").join(hex);
    assert_eq!(
        std::fs::read_to_string(published.join("diff/hello")).unwrap(),
        "hi\n"
    );
    assert!(published.join("seal.json").exists() && published.join("manifest").exists());
    assert!(std::fs::read_dir(tier.join("staging")).unwrap().next().is_none());
    assert!(
        tier.join("refs/layer").join(hex).join("a").exists(),
        "the publisher references it"
    );

    // Host B adopts it: a committed layer named by the chain id whose content is the tier's.
    let labels = BTreeMap::from([("containerd.io/snapshot.ref".to_string(), c1.clone())]);
    assert!(b.adopt_shared(NS, &c1, None, labels.clone()).unwrap());
    let (rec, _) = b.record(NS, &c1).unwrap();
    assert_eq!(rec.kind, LayerKind::ReadOnly);
    assert_eq!(rec.shared.as_deref(), Some(c1.as_str()));
    assert_eq!(rec.labels, labels);
    assert!(rec.manifest.is_some() && rec.size.is_some());
    let diff = b.info(NS, &c1).unwrap().diff_dir;
    assert!(std::fs::symlink_metadata(&diff).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(diff.join("hello")).unwrap(), "hi\n");
    assert!(adopt(b, &c1), "asked again: it exists");
    let top = a.tier_layers().unwrap().unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!((top[0].chain.as_str(), top[0].live_hosts), (c1.as_str(), 2));
    assert_eq!(top[0].hosts, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(top[0].published_by, "a");

    // Host B's own unpack of the same layer loses the publication cleanly.
    unpack(b, "b/2/layer", "hello", "hi\n");
    assert!(!b.publish_shared(NS, "b/2/layer", &c1).unwrap());
    assert!(std::fs::read_dir(tier.join("staging")).unwrap().next().is_none());

    // Collection: nothing while a live host holds the layer, even after the publisher dropped it.
    std::thread::sleep(Duration::from_millis(2100));
    la.beat().unwrap();
    lb.beat().unwrap();
    assert!(tier_gc(a, true).is_empty());
    assert!(a.remove(NS, "a/1/layer").unwrap());
    assert!(tier_gc(a, false).is_empty(), "host B still holds it");
    assert!(
        !tier.join("refs/layer").join(hex).join("a").exists(),
        "A's reference went with its layer"
    );
    assert!(published.exists());
    assert_eq!(std::fs::read_to_string(diff.join("hello")).unwrap(), "hi\n");
    assert!(b.remove(NS, &c1).unwrap());
    assert!(b.remove(NS, "b/2/layer").unwrap());
    assert_eq!(tier_gc(b, true), vec![c1.clone()], "the dry run lists it");
    assert!(published.exists(), "a dry run removes nothing");
    assert_eq!(tier_gc(b, false), vec![c1.clone()]);
    assert!(!published.exists());
}

#[test]
fn a_prepare_waits_for_another_hosts_claim_then_unpacks_itself() {
    let h = Hosts::new();
    let (a, b) = (&h.a, &h.b);
    let c2 = chain(2);
    assert!(!adopt(a, &c2), "A claims");
    let t0 = Instant::now();
    assert!(!adopt(b, &c2), "B gives up waiting");
    assert!(t0.elapsed() >= Duration::from_secs(1), "B waited for A's claim");
    // A publishes while B waits: B adopts it.
    let c3 = chain(3);
    assert!(!adopt(a, &c3));
    std::thread::scope(|s| {
        let waiting = s.spawn(|| adopt(b, &c3));
        std::thread::sleep(Duration::from_millis(300));
        unpack(a, "a/3", "x", "3");
        a.publish_shared(NS, "a/3", &c3).unwrap();
        assert!(
            waiting.join().unwrap(),
            "B adopted the layer A published while it waited"
        );
    });
    let diff = b.info(NS, &c3).unwrap().diff_dir;
    assert_eq!(std::fs::read_to_string(diff.join("x")).unwrap(), "3");
}

#[test]
fn an_applied_layer_already_in_the_tier_keeps_no_local_copy() {
    let h = Hosts::new();
    let (a, b) = (&h.a, &h.b);
    // A layer tar; as the only layer, its chain id is its DiffID.
    let mut builder = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    builder.append_data(&mut h, "motd", &b"hi\n"[..]).unwrap();
    let bytes = builder.into_inner().unwrap();
    let diff_id = lamina_archive::manifest::digest_of(&bytes);
    // Not in the tier yet: the applied layer stays local.
    b.create(NewLayer::new("docker:/x", "first", LayerKind::ReadOnly))
        .unwrap();
    b.apply("docker:/x", "first", &mut &bytes[..], &Default::default())
        .unwrap();
    assert!(!b.share_applied("docker:/x", "first").unwrap());
    // Host A publishes the same content under that chain id; host B's next apply of it links the tier.
    unpack(a, "a/1", "motd", "hi\n");
    assert!(a.publish_shared(NS, "a/1", &diff_id).unwrap());
    b.create(NewLayer::new("docker:/x", "second", LayerKind::ReadOnly))
        .unwrap();
    b.apply("docker:/x", "second", &mut &bytes[..], &Default::default())
        .unwrap();
    assert!(b.share_applied("docker:/x", "second").unwrap());
    let info = b.info("docker:/x", "second").unwrap();
    assert!(std::fs::symlink_metadata(&info.diff_dir)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(info.diff_dir.join("motd")).unwrap(),
        "hi\n"
    );
    assert!(
        !info.diff_dir.with_file_name("diff.tier").exists(),
        "the local copy is gone"
    );
    assert_eq!(
        b.record("docker:/x", "second").unwrap().0.shared.as_deref(),
        Some(diff_id.as_str())
    );
    assert!(!b.share_applied("docker:/x", "second").unwrap(), "once");
}

#[test]
fn an_abandoned_unpack_releases_its_claim_at_once() {
    let h = Hosts::new();
    let (a, b) = (&h.a, &h.b);
    let c4 = chain(4);
    assert!(!adopt(a, &c4), "A claims");
    a.release_shared_claim(&c4);
    let t0 = Instant::now();
    assert!(!adopt(b, &c4), "B claims");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "B did not wait: {:?}",
        t0.elapsed()
    );
}

#[test]
fn the_tier_shows_which_hosts_use_a_layer_and_when_it_was_last_used() {
    let h = Hosts::new();
    let (tier, a, b) = (&h.tier, &h.a, &h.b);
    let c1 = chain(7);
    unpack_and_publish(a, &c1, "a/7/layer", "f", "x\n");
    assert!(adopt(b, &c1));
    let row = |s: &Store| {
        s.tier_layers()
            .unwrap()
            .unwrap()
            .into_iter()
            .find(|l| l.chain == c1)
            .unwrap()
    };
    // Nothing runs on it yet: held by both, used by none; nothing to write.
    assert!(
        b.share_tier_usage().unwrap(),
        "the first call writes the (empty) usage"
    );
    assert!(!b.share_tier_usage().unwrap(), "unchanged: no write");
    let r = row(a);
    assert_eq!((r.live_hosts, r.users.len(), r.last_use_ns), (2, 0, 0), "{r:?}");

    // A container on host B: its active layer reaches the tier layer.
    b.create(NewLayer::new(NS, "ctr-1", LayerKind::ReadWrite).with_parent(Some(&c1)))
        .unwrap();
    assert!(b.share_tier_usage().unwrap());
    assert!(!b.share_tier_usage().unwrap(), "written once per change");
    assert!(tier.join("usage/b").exists());
    let r = row(a);
    assert_eq!(r.users, vec!["b".to_string()], "{r:?}");
    assert_eq!(r.uses, 1);
    assert!(r.last_use_ns > 0);
    let mtime = std::fs::metadata(tier.join("usage/b"))
        .unwrap()
        .modified()
        .unwrap();

    // The container goes: used by none, held by both, its last use kept.
    b.remove(NS, "ctr-1").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(b.share_tier_usage().unwrap());
    let r = row(a);
    assert_eq!((r.live_hosts, r.users.len(), r.uses), (2, 0, 0), "{r:?}");
    let ns = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(r.last_use_ns >= ns(mtime), "{r:?}");
}

#[test]
fn a_tier_layer_whose_manifest_does_not_match_its_seal_is_not_adopted() {
    let h = Hosts::new();
    let (tier, a, b) = (&h.tier, &h.a, &h.b);
    let c1 = chain(9);
    unpack_and_publish(a, &c1, "a/9/layer", "f", "x\n");
    let manifest = tier
        .join("layers")
        .join(c1.trim_start_matches("sha256:"))
        .join("manifest");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("extra line\n");
    std::fs::write(&manifest, text).unwrap();
    assert!(!adopt(b, &c1), "a damaged tier layer is unpacked here instead");
    assert!(b.record(NS, &c1).is_err(), "no layer made from it");
}
