//! Reliability tier, part 4 (issue 8): kill points. The daemon is SIGKILLed at every fault point
//! (`lamina_sys::fault`, compiled into test builds) of ApplyDiff, Create, Remove, Get/Put, the snapshotter's
//! Commit and the volume Create, and at random times during those operations; after each kill it is started
//! again without faults and the store is checked: the database opens, no layer is left `Applying`, every
//! applied layer holds exactly the content that was sent (and `lamina verify --all` finds no mismatch), no
//! directory under `layers/`, `staging/` or `trash/` belongs to no layer, `lamina gc --dry-run` finds nothing,
//! the kernel's mount table under the data root agrees with the store's mount counts, no temporary volume
//! record is left, and the interrupted operation, retried, succeeds.
//!
//! Size: one kill per (operation, point) pair per round; `LAMINA_RELIABILITY_KILL_ROUNDS` rounds (CI 1, full
//! 25) plus `LAMINA_RELIABILITY_RANDOM_KILLS` random-time kills (CI 20, full 250).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use lamina_testkit::faults::*;
use lamina_testkit::reliability::{self, Rng};
use lamina_testkit::*;
use serde_json::json;

const BASE: &str = "killbase";
const SNAP_BASE: &str = "snapbase";

/// Operations and the fault points each passes through.
const OPS: &[(&str, &[&str])] = &[
    (
        "create",
        &["store.create.mkdir", "store.create.commit", "store.create.done"],
    ),
    (
        "apply",
        &[
            "store.apply.begin.commit",
            "store.apply.stage",
            "store.apply.syncfs",
            "store.apply.rename",
            "store.apply.syncfs2",
            "store.apply.finish.commit",
            "store.apply.done",
            "store.seal.fsync",
            "store.seal.rename",
            "store.seal.dirsync",
            "store.seal.commit",
        ],
    ),
    (
        "remove",
        &["store.remove.commit", "store.remove.rename", "store.remove.done"],
    ),
    (
        "remove_mounted",
        &[
            "store.remove.unmount",
            "store.remove.commit",
            "store.remove.rename",
        ],
    ),
    ("get", &["store.get.mount", "store.get.mounted"]),
    ("put", &["store.put.unmount"]),
    (
        "commit",
        &[
            "store.commit.syncfs",
            "store.commit.commit",
            "store.commit.done",
            "store.seal.fsync",
            "store.seal.rename",
            "store.seal.dirsync",
            "store.seal.commit",
        ],
    ),
    (
        "volume_create",
        &[
            "volume.create.mkdir",
            "volume.create.write",
            "volume.create.rename",
            "volume.create.commit",
        ],
    ),
];

/// What the test expects to find in the store.
#[derive(Default)]
struct Model {
    /// Graph-driver layer id → content sent (when an apply was attempted).
    content: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Snapshot key or committed name → the file written into it.
    snapshots: BTreeMap<String, Vec<u8>>,
}

/// Everything that must hold after a restart; returns the violations.
fn check(d: &Daemon, model: &Model) -> Vec<String> {
    let mut bad = Vec::new();
    let root = d.root().to_path_buf();
    let layers = d.cli(&["layers", "ls"]);
    let layers = layers.as_array().cloned().unwrap_or_default();
    let mut numbers = BTreeSet::new();
    let mut want_mounts = BTreeSet::new();
    for l in &layers {
        let n = l["number"].as_u64().unwrap();
        numbers.insert(format!("{n:x}"));
        let rec = &l["record"];
        let name = rec["name"].as_str().unwrap_or_default();
        let state = rec["state"].as_str().unwrap_or_default();
        if state == "Applying" {
            bad.push(format!("layer {name} left Applying after recovery"));
        }
        let mounts = l["mounts"].as_u64().unwrap_or(0);
        let mounted = l["mounted"].as_bool().unwrap_or(false);
        if (mounts > 0) != mounted {
            bad.push(format!(
                "layer {name}: mount count {mounts} but kernel mounted={mounted}"
            ));
        }
        if mounted {
            want_mounts.insert(root.join("layers").join(format!("{n:x}")).join("merged"));
        }
        let diff = root.join("layers").join(format!("{n:x}")).join("diff");
        if let Some(expect) = model.content.get(name) {
            let got = files_in(&diff);
            match state {
                "Applied" if &got != expect => bad.push(format!(
                    "layer {name}: applied content differs ({} files, want {})",
                    got.len(),
                    expect.len()
                )),
                "Empty" if !got.is_empty() => {
                    bad.push(format!("layer {name}: empty layer holds {} files", got.len()))
                }
                _ => {}
            }
        }
        if let Some(expect) = model.snapshots.get(name) {
            let got = fs::read(diff.join("data")).unwrap_or_default();
            if &got != expect {
                bad.push(format!("snapshot {name}: content differs"));
            }
        }
    }
    let on_disk = names_in(&root.join("layers"));
    if on_disk != numbers {
        bad.push(format!(
            "layer directories {on_disk:?} != recorded layers {numbers:?}"
        ));
    }
    if !names_in(&root.join("staging")).is_empty() {
        bad.push(format!(
            "staging not empty: {:?}",
            names_in(&root.join("staging"))
        ));
    }
    // Removed layers leave trash/ in the background.
    if poll(Duration::from_secs(20), || {
        names_in(&root.join("trash")).is_empty().then_some(())
    })
    .is_none()
    {
        bad.push(format!("trash not emptied: {:?}", names_in(&root.join("trash"))));
    }
    let kernel: BTreeSet<PathBuf> = mounts_under(&root.join("layers")).into_iter().collect();
    if kernel != want_mounts {
        bad.push(format!(
            "kernel mounts {kernel:?} != counted mounts {want_mounts:?}"
        ));
    }
    let gc = d.cli(&["gc", "--dry-run"]);
    if gc["items"].as_array().is_some_and(|a| !a.is_empty()) {
        bad.push(format!("gc --dry-run finds garbage: {}", gc["items"]));
    }
    let verify = d.cli(&["verify", "--all"]);
    let text = verify.to_string();
    if text.contains("\"mismatch\"") {
        bad.push(format!("verify --all: {}", truncate(&text, 2000)));
    }
    let meta = root.join("volumes/local/.lamina");
    for n in names_in(&meta) {
        if n.starts_with(".tmp-") {
            bad.push(format!("temporary volume record left: {n}"));
        }
    }
    bad
}

/// One planned operation.
struct Case {
    op: &'static str,
    id: String,
    tar: Vec<u8>,
    files: BTreeMap<String, Vec<u8>>,
    data: Vec<u8>,
}

/// Brings the store into the state `case.op` starts from (clean daemon).
fn prepare(d: &Daemon, case: &Case, model: &mut Model) {
    let id = &case.id;
    let create = || gcall(d, "Create", json!({"ID": id, "Parent": BASE, "MountLabel": ""})).unwrap();
    match case.op {
        "create" | "volume_create" => {}
        "apply" => create(),
        "remove" | "get" => {
            create();
            apply(d, id, BASE, &case.tar).unwrap();
        }
        "remove_mounted" | "put" => {
            create();
            apply(d, id, BASE, &case.tar).unwrap();
            gcall(d, "Get", json!({"ID": id, "MountLabel": ""})).unwrap();
        }
        "commit" => {
            let s = Snap::connect(&d.snap_socket);
            s.prepare(id, SNAP_BASE).unwrap();
            fs::write(layer_dir(d, id).join("diff/data"), &case.data).unwrap();
            model.snapshots.insert(id.clone(), case.data.clone());
            model.snapshots.insert(format!("{id}-c"), case.data.clone());
        }
        other => unreachable!("{other}"),
    }
    if matches!(case.op, "apply" | "remove" | "get" | "remove_mounted" | "put") {
        model.content.insert(id.clone(), case.files.clone());
    }
}

/// The operation itself (on the daemon that may die in it). Errors are expected when it dies.
fn run_op(d: &Daemon, case: &Case) -> Result<(), String> {
    let id = &case.id;
    match case.op {
        "create" => gcall(d, "Create", json!({"ID": id, "Parent": BASE, "MountLabel": ""})),
        "apply" => apply(d, id, BASE, &case.tar),
        "remove" | "remove_mounted" => gcall(d, "Remove", json!({"ID": id})),
        "get" => gcall(d, "Get", json!({"ID": id, "MountLabel": ""})),
        "put" => gcall(d, "Put", json!({"ID": id})),
        "commit" => Snap::connect(&d.snap_socket).commit(&format!("{id}-c"), id),
        "volume_create" => vcall(d, "Create", json!({"Name": id, "Opts": {}})).map(|_| ()),
        other => unreachable!("{other}"),
    }
}

/// Retries the interrupted operation on the clean daemon (it must succeed), then removes what it made.
fn finish_op(d: &Daemon, case: &Case, model: &mut Model) -> Result<(), String> {
    let id = &case.id;
    match case.op {
        "create" => {
            if layer_state(d, id).is_none() {
                gcall(d, "Create", json!({"ID": id, "Parent": BASE, "MountLabel": ""}))?;
            }
            gcall(d, "Remove", json!({"ID": id}))?;
        }
        "apply" => {
            match layer_state(d, id).as_deref() {
                Some("Empty") => apply(d, id, BASE, &case.tar)?,
                Some("Applied") => {}
                other => return Err(format!("layer {id} in state {other:?} after the restart")),
            }
            let got = files_in(&layer_dir(d, id).join("diff"));
            if got != case.files {
                return Err(format!("layer {id}: content differs after the retry"));
            }
            gcall(d, "Remove", json!({"ID": id}))?;
        }
        "remove" | "remove_mounted" => {
            gcall(d, "Remove", json!({"ID": id}))?;
            if layer_state(d, id).is_some() {
                return Err(format!("layer {id} still there after Remove"));
            }
        }
        "get" => {
            gcall(d, "Get", json!({"ID": id, "MountLabel": ""}))?;
            gcall(d, "Put", json!({"ID": id}))?;
            gcall(d, "Remove", json!({"ID": id}))?;
        }
        "put" => {
            gcall(d, "Put", json!({"ID": id}))?;
            gcall(d, "Remove", json!({"ID": id}))?;
        }
        "commit" => {
            let s = Snap::connect(&d.snap_socket);
            let name = format!("{id}-c");
            match (layer_state(d, id).is_some(), layer_state(d, &name).is_some()) {
                (true, false) => s.commit(&name, id)?,
                (false, true) => {}
                other => return Err(format!("snapshot {id}: active/committed = {other:?}")),
            }
            let got = fs::read(layer_dir(d, &name).join("diff/data")).unwrap_or_default();
            if got != case.data {
                return Err(format!("committed {name}: content differs"));
            }
            s.remove(&name)?;
        }
        "volume_create" => {
            vcall(d, "Create", json!({"Name": id, "Opts": {}}))?;
            let v = vcall(d, "Get", json!({"Name": id}))?;
            if v["Volume"]["Name"] != json!(id) {
                return Err(format!("volume {id}: Get answered {v}"));
            }
            vcall(d, "Remove", json!({"Name": id}))?;
        }
        other => unreachable!("{other}"),
    }
    model.content.remove(id);
    model.snapshots.remove(id);
    model.snapshots.remove(&format!("{id}-c"));
    Ok(())
}

#[test]
fn kill_points_and_random_kills() {
    if !require_root("kill_points_and_random_kills") {
        return;
    }
    let _serial = serial();
    let rounds = reliability::count("LAMINA_RELIABILITY_KILL_ROUNDS", 1, 25);
    let randoms = reliability::count("LAMINA_RELIABILITY_RANDOM_KILLS", 20, 250);
    let mut rng = Rng::new(reliability::base_seed() ^ 0x6b11);
    let t0 = Instant::now();

    let mut d = Daemon::new(&unique_name("faults-kill"));
    let hits = d.base.dir().join("hits.log");
    let quiet = d.base.dir().join("hits-clean.log");
    assert!(d.start(None, &quiet));
    if !lamina_sys::fault::ENABLED {
        // `cargo build --workspace --all-targets` builds the lamina binary with the faults feature.
        eprintln!("note: the test crate itself is built without the faults feature");
    }
    // The bases: a graph-driver layer and a committed snapshot.
    gcall(&d, "Create", json!({"ID": BASE, "Parent": "", "MountLabel": ""})).unwrap();
    let (base_tar, base_files) = make_tar(&mut rng, false);
    match d.client().apply_diff(BASE, "", &mut &base_tar[..]) {
        Ok(r) => ok(&r, "ApplyDiff base").unwrap(),
        Err(e) => panic!("ApplyDiff base: {e}"),
    }
    {
        let s = Snap::connect(&d.snap_socket);
        s.prepare("snapbase-active", "").unwrap();
        s.commit(SNAP_BASE, "snapbase-active").unwrap();
    }
    let mut model = Model::default();
    model.content.insert(BASE.into(), base_files);
    let first = check(&d, &model);
    assert!(first.is_empty(), "before any kill: {first:#?}");

    // The plan: every (operation, point) pair per round, then random-time kills.
    let mut plan: Vec<(&'static str, Option<&'static str>)> = Vec::new();
    for _ in 0..rounds {
        for (op, points) in OPS {
            for p in *points {
                plan.push((op, Some(p)));
            }
        }
    }
    let random_ops = [
        "apply",
        "apply",
        "create",
        "remove",
        "commit",
        "get",
        "volume_create",
    ];
    for _ in 0..randoms {
        plan.push((*rng.pick(&random_ops), None));
    }

    let mut kills = 0u64;
    let mut not_reached: BTreeMap<String, u64> = BTreeMap::new();
    let mut coverage: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut inconsistencies: Vec<String> = Vec::new();
    for (i, (op, point)) in plan.iter().enumerate() {
        let big = point.is_none() && *op == "apply";
        let (tar, files) = make_tar(&mut rng, big);
        let data_len = rng.range(1, 50_000) as usize;
        let case = Case {
            op,
            id: format!("k{i}-{op}"),
            tar,
            files,
            data: rng.bytes(data_len),
        };
        prepare(&d, &case, &mut model);
        d.stop();

        let _ = fs::remove_file(&hits);
        let armed = point.map(|p| format!("{p}=kill"));
        let killed = if d.start(armed.as_deref(), &hits) {
            match point {
                Some(_) => {
                    let _ = run_op(&d, &case);
                    // Background steps (manifests) may come after the answer.
                    if d.exited_within(Duration::from_secs(5)) {
                        d.gone();
                        true
                    } else {
                        d.kill9();
                        false
                    }
                }
                None => {
                    let pid = d.pid();
                    let delay = Duration::from_micros(rng.range(0, 60_000));
                    let killer = thread::spawn(move || {
                        thread::sleep(delay);
                        signal(pid, "KILL");
                    });
                    let _ = run_op(&d, &case);
                    killer.join().unwrap();
                    d.kill9();
                    true
                }
            }
        } else {
            // Killed while starting (a point hit by the start-up recovery).
            d.gone();
            true
        };
        if killed {
            kills += 1;
            let label = point.unwrap_or("(random time)").to_string();
            *coverage.entry((op.to_string(), label)).or_default() += 1;
        } else {
            *not_reached
                .entry(format!("{op} @ {}", point.unwrap_or("-")))
                .or_default() += 1;
        }

        assert!(
            d.start(None, &quiet),
            "clean start after {op} @ {point:?} failed; log:\n{}",
            d.base.log_tail()
        );
        for v in check(&d, &model) {
            inconsistencies.push(format!("after {op} @ {point:?}: {v}"));
        }
        if let Err(e) = finish_op(&d, &case, &mut model) {
            inconsistencies.push(format!("after {op} @ {point:?}: retry failed: {e}"));
        }
        for v in check(&d, &model) {
            inconsistencies.push(format!("after {op} @ {point:?} and its retry: {v}"));
        }
        if !inconsistencies.is_empty() {
            eprintln!("log tail:\n{}", d.base.log_tail());
            break;
        }
    }
    let panics = reliability::panics_in_log(&d.base.log);

    eprintln!("kill points: operation × point → kills");
    for ((op, p), n) in &coverage {
        eprintln!("  {op:<15} {p:<28} {n}");
    }
    let pairs = coverage.keys().filter(|(_, p)| !p.starts_with('(')).count();
    let total_pairs: usize = OPS.iter().map(|(_, p)| p.len()).sum();
    eprintln!(
        "kills: {kills}, inconsistencies: {}, coverage {pairs}/{total_pairs} (operation, point) pairs, \
         not reached: {not_reached:?}, panics: {}, time {:.1} s",
        inconsistencies.len(),
        panics.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(inconsistencies.is_empty(), "{inconsistencies:#?}");
    assert!(not_reached.is_empty(), "points never hit: {not_reached:?}");
    assert_eq!(pairs, total_pairs);
    assert!(kills >= 50 || rounds < 1, "only {kills} kills");
}
