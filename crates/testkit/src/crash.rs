//! Crash scenarios shared by the reliability tiers that stop lamina abruptly (a SIGKILL in `reliability_kill.rs`,
//! a simulated power cut in `reliability_powercut.rs`): the operations and the fault points each passes through,
//! what the store must look like after a restart ([`check`]), and how each interrupted operation is prepared, run,
//! and retried.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::faults::*;
use crate::reliability::Rng;
use crate::{mounts_under, poll, truncate};

pub const BASE: &str = "killbase";
pub const SNAP_BASE: &str = "snapbase";

/// Operations and the fault points each passes through.
pub const OPS: &[(&str, &[&str])] = &[
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
            "store.commit.manifest",
            "store.commit.syncfs",
            "store.commit.commit",
            "store.commit.done",
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

/// The fault points of the operation `op` in [`OPS`], in the order it passes them; panics for an unknown `op`.
pub fn points_of(op: &str) -> &'static [&'static str] {
    OPS.iter()
        .find(|(o, _)| *o == op)
        .map(|(_, p)| *p)
        .unwrap_or_else(|| panic!("no operation {op} in crash::OPS"))
}

/// What the test expects to find in the store.
#[derive(Default)]
pub struct Model {
    /// Graph-driver layer id → content sent (when an apply was attempted).
    pub content: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Snapshot key or committed name → the file written into it.
    pub snapshots: BTreeMap<String, Vec<u8>>,
}

/// Everything that must hold after a restart; returns the violations.
pub fn check(d: &Daemon, model: &Model) -> Vec<String> {
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
    // Besides the recorded layers, `layers/` may hold the spares a running daemon keeps ready.
    let on_disk = names_in(&root.join("layers"));
    let unrecorded: Vec<&String> = on_disk.difference(&numbers).collect();
    let spares_only = unrecorded.len() <= crate::MAX_SPARES
        && unrecorded
            .iter()
            .all(|n| crate::is_spare_like(&root.join("layers").join(n)));
    if !numbers.is_subset(&on_disk) || !spares_only {
        bad.push(format!(
            "layer directories {on_disk:?} != recorded layers {numbers:?} and at most {} spares",
            crate::MAX_SPARES
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
pub struct Case {
    pub op: &'static str,
    pub id: String,
    pub tar: Vec<u8>,
    pub files: BTreeMap<String, Vec<u8>>,
    pub data: Vec<u8>,
}

/// Brings the store into the state `case.op` starts from (clean daemon).
pub fn prepare(d: &Daemon, case: &Case, model: &mut Model) {
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
            // The container's write, made durable as an application that cares does (fsync of the file and of
            // its directory): what a power cut may take is the snapshotter's work, not unsynced data.
            let diff = layer_dir(d, id).join("diff");
            fs::write(diff.join("data"), &case.data).unwrap();
            for p in [diff.join("data"), diff] {
                fs::File::open(p).and_then(|f| f.sync_all()).unwrap();
            }
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
pub fn run_op(d: &Daemon, case: &Case) -> Result<(), String> {
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
pub fn finish_op(d: &Daemon, case: &Case, model: &mut Model) -> Result<(), String> {
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

/// Makes the bases every case builds on (a graph-driver layer with content and a committed snapshot) on a
/// running daemon; gives the model that knows them.
pub fn make_bases(d: &Daemon, rng: &mut Rng) -> Model {
    gcall(d, "Create", json!({"ID": BASE, "Parent": "", "MountLabel": ""})).unwrap();
    let (base_tar, base_files) = make_tar(rng, false);
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
    model
}

/// What a crash tier runs: every (operation, point) pair once per round, then `randoms` operations crashed at a
/// random moment (`None`).
pub fn plan(rounds: u64, randoms: u64, rng: &mut Rng) -> Vec<(&'static str, Option<&'static str>)> {
    let mut plan = Vec::new();
    for _ in 0..rounds {
        for (op, points) in OPS {
            for p in *points {
                plan.push((*op, Some(*p)));
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
    plan
}

/// A case for `op` with fresh random content (`big`: a tar of a few MB instead of a few KB).
pub fn new_case(rng: &mut Rng, i: usize, op: &'static str, big: bool) -> Case {
    let (tar, files) = make_tar(rng, big);
    let data_len = rng.range(1, 50_000) as usize;
    Case {
        op,
        id: format!("k{i}-{op}"),
        tar,
        files,
        data: rng.bytes(data_len),
    }
}

/// After an operation that was acknowledged (its answer arrived before the crash), checks on the restarted
/// daemon that its effect is there: nothing acknowledged may be lost.
pub fn acknowledged(d: &Daemon, case: &Case) -> Result<(), String> {
    let id = &case.id;
    let lost = |what: &str| Err(format!("acknowledged {} of {id} lost: {what}", case.op));
    match case.op {
        "create" | "get" | "put" if layer_state(d, id).is_none() => lost("the layer is gone"),
        "apply" => match layer_state(d, id).as_deref() {
            Some("Applied") if files_in(&layer_dir(d, id).join("diff")) == case.files => Ok(()),
            Some("Applied") => lost("its content differs"),
            other => lost(&format!("the layer is {other:?}")),
        },
        "remove" | "remove_mounted" if layer_state(d, id).is_some() => lost("the layer is still there"),
        "commit" => match layer_state(d, &format!("{id}-c")) {
            Some(_)
                if fs::read(layer_dir(d, &format!("{id}-c")).join("diff/data")).unwrap_or_default()
                    == case.data =>
            {
                Ok(())
            }
            Some(_) => lost("the committed snapshot's content differs"),
            None => lost("no committed snapshot"),
        },
        "volume_create" => match vcall(d, "Get", json!({"Name": id})) {
            Ok(_) => Ok(()),
            Err(e) => lost(&format!("Get answers {e}")),
        },
        _ => Ok(()),
    }
}
