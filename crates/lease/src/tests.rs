use std::fs;
use std::time::{Duration, SystemTime};

use super::*;

fn lease(dir: &Path, host: &str) -> Lease {
    Lease::open(LeaseConfig {
        dir: dir.to_path_buf(),
        host: HostId::new(host).unwrap(),
        lease: Duration::from_secs(10),
        heartbeat: Duration::from_secs(1),
    })
    .unwrap()
}

/// Makes `path` look written `ago` before now (what a silent host or an unrenewed claim looks like).
fn age(path: &Path, ago: Duration) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

fn ids(v: &[&str]) -> Vec<HostId> {
    v.iter().map(|h| HostId::new(*h).unwrap()).collect()
}

#[test]
fn references_count_live_hosts_only() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (lease(t.path(), "host-a"), lease(t.path(), "host-b"));
    assert!(a.holders("volume", "v1").unwrap().is_empty());
    a.hold("volume", "v1").unwrap();
    a.hold("volume", "v1").unwrap();
    b.hold("volume", "v1").unwrap();
    b.hold("volume", "v2").unwrap();
    assert_eq!(a.holders("volume", "v1").unwrap(), ids(&["host-a", "host-b"]));
    assert_eq!(b.references("volume").unwrap(), vec!["v1", "v2"]);
    assert_eq!(a.references("volume").unwrap(), vec!["v1"]);
    assert!(a.references("layer").unwrap().is_empty());

    age(&t.path().join("hosts/host-b"), Duration::from_secs(3600));
    assert_eq!(
        a.holders("volume", "v1").unwrap(),
        ids(&["host-a"]),
        "a silent host does not count"
    );
    let all = a.all_holders("volume", "v1").unwrap();
    let bs = all.iter().find(|s| s.host.as_str() == "host-b").unwrap();
    assert!(!bs.alive);
    assert!(bs.silent.unwrap() >= Duration::from_secs(3599), "{bs:?}");
    let refs = a.all_references("volume").unwrap();
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[1].0, "v2");
    assert!(!refs[1].1[0].alive);

    b.beat().unwrap();
    assert_eq!(
        a.holders("volume", "v1").unwrap(),
        ids(&["host-a", "host-b"]),
        "alive again"
    );

    a.release("volume", "v1").unwrap();
    a.release("volume", "v1").unwrap();
    assert_eq!(a.holders("volume", "v1").unwrap(), ids(&["host-b"]));
    b.release("volume", "v1").unwrap();
    assert!(
        !t.path().join("refs/volume/v1").exists(),
        "the last release removes the directory"
    );

    age(&t.path().join("hosts/host-b"), Duration::from_secs(3600));
    assert_eq!(a.prune_dead("volume", "v2").unwrap(), ids(&["host-b"]));
    assert!(!t.path().join("refs/volume/v2").exists());
}

#[test]
fn hosts_and_the_filesystem_clock() {
    let t = tempfile::tempdir().unwrap();
    let a = lease(t.path(), "a");
    let _b = lease(t.path(), "b");
    let before = SystemTime::now() - Duration::from_secs(1);
    let now = a.now().unwrap();
    assert!(now >= before && now <= SystemTime::now() + Duration::from_secs(1));
    let hosts = a.hosts().unwrap();
    assert_eq!(
        hosts.iter().map(|h| h.host.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(hosts.iter().all(|h| h.alive));
    let never = a.host_state(&HostId::new("c").unwrap()).unwrap();
    assert!(!never.alive && never.silent.is_none());
    assert!(a.is_fresh());
    let left: Vec<_> = fs::read_dir(t.path().join("clock")).unwrap().collect();
    assert!(left.is_empty(), "probes are removed");
}

#[test]
fn one_claim_at_a_time() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (lease(t.path(), "host-a"), lease(t.path(), "host-b"));
    let c = a.claim("unpack", "sha256:abc").unwrap();
    assert!(c.is_held());
    match b.claim("unpack", "sha256:abc") {
        Err(LeaseError::HeldBy { host, until, .. }) => {
            assert_eq!(host, "host-a");
            assert!(until > SystemTime::now());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(a.claim("unpack", "sha256:abc"), Err(LeaseError::HeldBy { .. })),
        "not re-entrant"
    );
    let info = b.claim_state("unpack", "sha256:abc").unwrap().unwrap();
    assert_eq!(info.host.as_str(), "host-a");
    assert!(!info.expired);
    let msg = b.claim("unpack", "sha256:abc").unwrap_err().to_string();
    assert!(msg.contains("claimed by host host-a until unix time"), "{msg}");
    c.renew().unwrap();
    c.release().unwrap();
    assert!(b.claim_state("unpack", "sha256:abc").unwrap().is_none());
    let d = b.claim("unpack", "sha256:abc").unwrap();
    drop(d);
    assert!(
        a.claim_state("unpack", "sha256:abc").unwrap().is_none(),
        "dropping releases"
    );
}

#[test]
fn an_expired_claim_is_taken_over_and_its_owner_learns_it() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (lease(t.path(), "host-a"), lease(t.path(), "host-b"));
    let c = a.claim("unpack", "x").unwrap();
    age(&t.path().join("claims/unpack/x"), Duration::from_secs(11));
    let info = b.claim_state("unpack", "x").unwrap().unwrap();
    assert!(info.expired);
    let d = b.claim("unpack", "x").unwrap();
    assert!(matches!(c.renew(), Err(LeaseError::Lost { .. })));
    assert!(!c.is_held());
    drop(c);
    assert_eq!(
        a.claim_state("unpack", "x").unwrap().unwrap().host.as_str(),
        "host-b",
        "the loser's drop leaves the new claim alone"
    );
    d.renew().unwrap();
    let names: Vec<_> = fs::read_dir(t.path().join("claims/unpack"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["x"], "no temporaries left");
}

#[test]
fn renewal_moves_the_expiry() {
    let t = tempfile::tempdir().unwrap();
    let a = lease(t.path(), "a");
    let c = a.claim("k", "n").unwrap();
    age(&t.path().join("claims/k/n"), Duration::from_secs(8));
    let before = a.claim_state("k", "n").unwrap().unwrap().until;
    a.beat().unwrap();
    let after = a.claim_state("k", "n").unwrap().unwrap().until;
    assert!(
        after >= before + Duration::from_secs(7),
        "the heartbeat renews held claims"
    );
    drop(c);
}

/// Every lease claims `k`/`name` at once; how many got it.
fn race(leases: &[Lease], name: &str) -> usize {
    let won: Vec<Option<Claim>> = std::thread::scope(|s| {
        let hs: Vec<_> = leases
            .iter()
            .map(|l| s.spawn(move || l.claim("k", name).ok()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    won.iter().flatten().count()
}

#[test]
fn a_renewal_racing_the_release_does_not_bring_the_claim_back() {
    let t = tempfile::tempdir().unwrap();
    let a = lease(t.path(), "host-a");
    for i in 0..200 {
        let c = a.claim("remove", "v").unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..(i % 4) {
                    let _ = c.renew();
                }
            });
            std::thread::sleep(Duration::from_micros(50 * (i % 5)));
            c.release_inner().unwrap();
        });
        drop(c);
        assert!(
            a.claim_state("remove", "v").unwrap().is_none(),
            "round {i}: a released claim is back"
        );
    }
}

#[test]
fn concurrent_claimers_one_wins() {
    let t = tempfile::tempdir().unwrap();
    let leases: Vec<Lease> = (0..8).map(|i| lease(t.path(), &format!("h{i}"))).collect();
    for round in 0..20 {
        let name = format!("n{round}");
        assert_eq!(race(&leases, &name), 1, "round {round}");
    }
}

#[test]
fn concurrent_takers_of_an_expired_claim_one_wins() {
    let t = tempfile::tempdir().unwrap();
    let leases: Vec<Lease> = (0..8).map(|i| lease(t.path(), &format!("h{i}"))).collect();
    let dead = lease(t.path(), "dead");
    for round in 0..20 {
        let name = format!("n{round}");
        std::mem::forget(dead.claim("k", &name).unwrap());
        age(&t.path().join("claims/k").join(&name), Duration::from_secs(60));
        assert_eq!(race(&leases, &name), 1, "round {round}");
    }
}

#[test]
fn names_are_checked() {
    let t = tempfile::tempdir().unwrap();
    let a = lease(t.path(), "a");
    for (kind, name) in [
        ("Volume", "v"),
        ("", "v"),
        ("v/x", "v"),
        ("volume", ""),
        ("volume", ".tmp-x"),
        ("volume", "a/b"),
    ] {
        assert!(
            matches!(a.hold(kind, name), Err(LeaseError::BadName { .. })),
            "{kind:?} {name:?}"
        );
        assert!(
            matches!(a.claim(kind, name), Err(LeaseError::BadName { .. })),
            "{kind:?} {name:?}"
        );
    }
    a.hold("layer", "sha256:0123abcd").unwrap();
    for bad in ["", ".a", "-a", "a b", "a/b", &"x".repeat(201)] {
        assert!(HostId::new(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn host_id_is_kept() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("sub/host-id");
    let a = HostId::load_or_create(&p).unwrap();
    assert_eq!(HostId::load_or_create(&p).unwrap(), a);
    assert!(a.as_str().len() > 9, "{a}");
    fs::write(&p, "bad id\n").unwrap();
    assert!(matches!(
        HostId::load_or_create(&p),
        Err(LeaseError::Corrupt { .. })
    ));
}

#[test]
fn timings_are_checked() {
    let mut c = LeaseConfig {
        dir: "/x".into(),
        host: HostId::new("a").unwrap(),
        lease: DEFAULT_LEASE,
        heartbeat: DEFAULT_HEARTBEAT,
    };
    c.check().unwrap();
    c.lease = Duration::from_secs(9);
    assert!(c.check().unwrap_err().contains("twice"));
    c.heartbeat = Duration::ZERO;
    assert!(c.check().is_err());
}

#[test]
fn the_heartbeat_thread_beats_and_stops() {
    let t = tempfile::tempdir().unwrap();
    let a = lease(t.path(), "a");
    let hb = t.path().join("hosts/a");
    age(&hb, Duration::from_secs(3600));
    let h = a.start_heartbeat();
    std::thread::sleep(Duration::from_millis(300));
    let t1 = fs::metadata(&hb).unwrap().modified().unwrap();
    assert!(t1 > SystemTime::now() - Duration::from_secs(5), "beat at start");
    h.stop();
    age(&hb, Duration::from_secs(3600));
    std::thread::sleep(Duration::from_millis(1200));
    let t2 = fs::metadata(&hb).unwrap().modified().unwrap();
    assert!(t2 < SystemTime::now() - Duration::from_secs(3000), "stopped");
}

#[test]
fn a_taker_that_died_does_not_block_the_next() {
    let t = tempfile::tempdir().unwrap();
    let (dead, b) = (lease(t.path(), "dead"), lease(t.path(), "b"));
    std::mem::forget(dead.claim("k", "n").unwrap());
    let claim = t.path().join("claims/k/n");
    age(&claim, Duration::from_secs(60));
    let text = fs::read_to_string(&claim).unwrap();
    let token = serde_json::from_str::<serde_json::Value>(&text).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    // Another taker linked the takeover lock of that claim and is still working: the claim is its.
    let lock = t.path().join(format!(
        "claims/k/.takeover-{:016x}",
        claim::fnv1a(&[b"n", b"\0", token.as_bytes()])
    ));
    fs::write(&lock, r#"{"host":"taker","token":"taker-1"}"#).unwrap();
    match b.claim("k", "n") {
        Err(LeaseError::HeldBy { host, .. }) => assert_eq!(host, "taker"),
        other => panic!("{other:?}"),
    }
    // That taker died: its lock expires too, and the next taker gets the claim.
    age(&lock, Duration::from_secs(60));
    let c = b.claim("k", "n").unwrap();
    assert_eq!(b.claim_state("k", "n").unwrap().unwrap().host.as_str(), "b");
    let left: Vec<_> = fs::read_dir(t.path().join("claims/k"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["n"], "the locks are removed");
    drop(c);
}
