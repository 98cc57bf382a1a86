//! The containerd snapshots API of the real `lamina serve` binary, driven over its gRPC socket with a tonic
//! client: the state machine (active -> committed, views, removal rules), label updates, filters, usage,
//! namespaces kept apart (two snapshotter names, and the Docker graph driver on the same store), restarts,
//! a 130-layer chain mounted the way containerd mounts it, and bad input. containerd's own conformance suite
//! runs in its own tier (tests/conformance, scripts/conformance.sh); the containerd e2e tier is
//! e2e_containerd.rs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lamina_snapshotter::proto::containerd::services::snapshots::v1 as pb;
use lamina_snapshotter::proto::containerd::types::Mount;
use lamina_snapshotter::tonic::{self, Code};
use lamina_testkit::containerd::LaminaSnap;
use lamina_testkit::snapshots::{labels_map, SnapshotApi, SN};
use lamina_testkit::{require_root, umount, PluginClient, TestDir};

/// The testkit client plus the calls only these tests make.
struct Api(SnapshotApi);

impl std::ops::Deref for Api {
    type Target = SnapshotApi;
    fn deref(&self) -> &SnapshotApi {
        &self.0
    }
}

impl Api {
    fn connect(socket: &Path) -> Api {
        Api(SnapshotApi::connect(socket))
    }

    fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: &[(&str, &str)],
        parent: &str,
    ) -> Result<(), tonic::Status> {
        self.0.commit_with(name, key, labels_map(labels), parent)
    }

    fn update(&self, name: &str, labels: &[(&str, &str)], paths: &[&str]) -> Result<pb::Info, tonic::Status> {
        let req = pb::UpdateSnapshotRequest {
            snapshotter: SN.into(),
            info: Some(pb::Info {
                name: name.into(),
                parent: "ignored-parent".into(),
                kind: pb::Kind::View as i32,
                labels: labels_map(labels),
                ..Default::default()
            }),
            update_mask: (!paths.is_empty()).then(|| lamina_snapshotter::prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        };
        self.call(async |c| c.update(req).await)
            .map(|r| r.info.expect("info"))
    }

    fn list_in(&self, sn: &str, filters: &[&str]) -> Result<Vec<pb::Info>, tonic::Status> {
        let req = pb::ListSnapshotsRequest {
            snapshotter: sn.into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut c = self.client.clone();
        self.rt.block_on(async move {
            let mut stream = c.list(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(batch) = stream.message().await? {
                out.extend(batch.info);
            }
            Ok(out)
        })
    }

    fn names(&self, filters: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = self
            .list_in(SN, filters)
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        v.sort();
        v
    }

    fn usage(&self, key: &str) -> Result<(i64, i64), tonic::Status> {
        let req = pb::UsageRequest {
            snapshotter: SN.into(),
            key: key.into(),
        };
        self.call(async |c| c.usage(req).await)
            .map(|r| (r.size, r.inodes))
    }
}

fn ts(t: &Option<lamina_snapshotter::prost_types::Timestamp>) -> (i64, i32) {
    let t = t.as_ref().expect("timestamp");
    (t.seconds, t.nanos)
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code) -> String {
    match r {
        Ok(v) => panic!("expected {code:?}, got success: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            s.message().to_string()
        }
    }
}

fn start(name: &str) -> (TestDir, LaminaSnap, Api) {
    let dir = TestDir::new(&lamina_testkit::unique_name(name));
    let lamina = LaminaSnap::start(&dir.join("l"));
    let api = Api::connect(&lamina.socket);
    (dir, lamina, api)
}

fn option<'a>(m: &'a Mount, prefix: &str) -> Option<&'a str> {
    m.options.iter().find_map(|o| o.strip_prefix(prefix))
}

/// The layer directories, without the spares lamina keeps ready.
fn layer_dirs(lamina: &LaminaSnap) -> Vec<PathBuf> {
    lamina_testkit::layer_dirs_without_spares(&lamina.layers_dir())
}

#[test]
fn state_machine_mounts_and_removal_rules() {
    let (_dir, lamina, api) = start("snap-state");
    // Keys are opaque: slashes, spaces, absolute paths.
    let k1 = "/abs/key with space/1";
    let m = api.prepare(k1, "").unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    assert!(
        m[0].source.starts_with(lamina.layers_dir().to_str().unwrap()),
        "{m:?}"
    );
    assert!(
        !m[0].source.contains("abs"),
        "a key must never become a path: {m:?}"
    );
    assert_eq!(api.mounts(k1).unwrap(), m);
    let st = api.stat(k1).unwrap();
    assert_eq!((st.kind, st.parent.as_str()), (pb::Kind::Active as i32, ""));
    assert_eq!(st.created_at, st.updated_at);

    // One namespace for keys and names.
    expect_code(api.prepare(k1, ""), Code::AlreadyExists);
    expect_code(api.view(k1, ""), Code::AlreadyExists);
    expect_code(api.mounts("nope"), Code::NotFound);
    expect_code(api.stat("nope"), Code::NotFound);

    api.commit_with("c1", k1, &[("a", "1")], "").unwrap();
    expect_code(api.stat(k1), Code::NotFound);
    expect_code(api.commit("c1b", k1), Code::NotFound);
    let c1 = api.stat("c1").unwrap();
    assert_eq!(c1.kind, pb::Kind::Committed as i32);
    assert_eq!(c1.labels, labels_map(&[("a", "1")]));
    expect_code(api.mounts("c1"), Code::FailedPrecondition);

    // An active snapshot on c1: overlay with c1's content as the only lower.
    let m = api.prepare("k2", "c1").unwrap();
    assert_eq!(m[0].r#type, "overlay");
    let lower1 = option(&m[0], "lowerdir=").unwrap().to_string();
    assert!(!lower1.contains(':'), "{lower1}");
    assert!(option(&m[0], "upperdir=").is_some() && option(&m[0], "workdir=").is_some());
    assert_eq!(api.stat("k2").unwrap().parent, "c1");
    // Parents must be committed and exist.
    expect_code(api.prepare("k3", "k2"), Code::InvalidArgument);
    expect_code(api.prepare("k4", "nope"), Code::NotFound);

    // A view of one layer is a read-only bind mount of it.
    let v = api.view("v1", "c1").unwrap();
    assert_eq!(
        (v[0].r#type.as_str(), v[0].source.as_str()),
        ("bind", lower1.as_str())
    );
    assert_eq!(v[0].options, ["ro", "rbind"]);
    expect_code(api.commit("c-from-view", "v1"), Code::FailedPrecondition);
    expect_code(api.commit("c1", "k2"), Code::AlreadyExists);
    expect_code(api.commit("k2", "k2"), Code::AlreadyExists);

    api.commit("c2", "k2").unwrap();
    let v2 = api.view("v2", "c2").unwrap();
    let lowers = option(&v2[0], "lowerdir=").unwrap();
    assert_eq!(lowers.split(':').count(), 2);
    assert!(lowers.ends_with(&lower1), "top-most first: {lowers}");
    assert_eq!(option(&v2[0], "upperdir="), None);

    // Listing and filters.
    assert_eq!(api.names(&[]), ["c1", "c2", "v1", "v2"]);
    assert_eq!(api.names(&["kind==view"]), ["v1", "v2"]);
    assert_eq!(api.names(&["parent==c2", "name==c1"]), ["c1", "v2"]);
    assert_eq!(api.names(&["labels.a==1"]), ["c1"]);
    assert_eq!(api.names(&["parent!=\"\",kind==committed"]), ["c2"]);
    let all = api.list_in(SN, &[]).unwrap();
    let by: HashMap<_, _> = all.iter().map(|i| (i.name.as_str(), i.parent.as_str())).collect();
    assert_eq!(by["c2"], "c1");
    assert_eq!(by["v2"], "c2");

    // Usage of a committed layer is recorded at commit; of a view, its own (empty) directory.
    let (size, inodes) = api.usage("c1").unwrap();
    assert!(size >= 0 && inodes >= 1, "{size} {inodes}");
    expect_code(api.usage("nope"), Code::NotFound);

    // Removal: never a parent with children; leaves first.
    let msg = expect_code(api.remove("c1"), Code::FailedPrecondition);
    assert!(msg.contains("remove"), "{msg}");
    expect_code(api.remove("c2"), Code::FailedPrecondition);
    for k in ["v2", "v1", "c2", "c1"] {
        api.remove(k).unwrap();
    }
    expect_code(api.remove("c1"), Code::NotFound);
    assert!(api.names(&[]).is_empty());
    // The name is free again, for a view and then for a prepare.
    api.view("c1", "").unwrap();
    api.remove("c1").unwrap();
    api.prepare("c1", "").unwrap();
    api.remove("c1").unwrap();
    let gone = lamina_testkit::poll(Duration::from_secs(10), || {
        layer_dirs(&lamina).is_empty().then_some(())
    });
    assert!(gone.is_some(), "layer dirs left: {:?}", layer_dirs(&lamina));
}

#[test]
fn labels_update_with_field_paths() {
    let (_dir, _lamina, api) = start("snap-labels");
    api.prepare_in(SN, "k", "", &[("l1", "v1"), ("l2", "v2"), ("empty", "")])
        .unwrap();
    let st = api.stat("k").unwrap();
    assert_eq!(
        st.labels,
        labels_map(&[("l1", "v1"), ("l2", "v2")]),
        "empty values are no label"
    );
    std::thread::sleep(Duration::from_millis(5));
    // No mask: replace all labels; parent and kind in the request are ignored.
    let u = api.update("k", &[("l3", "v3")], &[]).unwrap();
    assert_eq!(u.labels, labels_map(&[("l3", "v3")]));
    assert_eq!((u.kind, u.parent.as_str()), (pb::Kind::Active as i32, ""));
    assert_eq!(u.created_at, st.created_at);
    assert!(
        ts(&u.updated_at) > ts(&st.updated_at),
        "{:?} {:?}",
        u.updated_at,
        st.updated_at
    );
    // Single keys: set one, delete one (absent from the request), leave the rest.
    api.update("k", &[("l1", "x"), ("l4", "y")], &["labels"]).unwrap();
    let u = api
        .update("k", &[("l1", "new")], &["labels.l1", "labels.l4"])
        .unwrap();
    assert_eq!(u.labels, labels_map(&[("l1", "new")]));
    assert_eq!(api.stat("k").unwrap().labels, u.labels);
    // Only labels are mutable.
    for path in ["parent", "name", "kind", "created_at"] {
        expect_code(api.update("k", &[], &[path]), Code::InvalidArgument);
    }
    expect_code(api.update("nope", &[], &[]), Code::NotFound);
    // Commit replaces the labels with the commit's.
    api.commit_with("c", "k", &[("committed", "yes")], "").unwrap();
    assert_eq!(api.stat("c").unwrap().labels, labels_map(&[("committed", "yes")]));
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let (_dir, lamina, api) = start("snap-bad");
    expect_code(api.prepare("", ""), Code::InvalidArgument);
    expect_code(api.view("", ""), Code::InvalidArgument);
    expect_code(api.prepare(&"k".repeat(5000), ""), Code::InvalidArgument);
    expect_code(api.prepare("k", &"p".repeat(5000)), Code::InvalidArgument);
    expect_code(api.prepare_in(SN, "k", "", &[("", "v")]), Code::InvalidArgument);
    let big = "v".repeat(4096);
    expect_code(
        api.prepare_in(SN, "k", "", &[("key", &big)]),
        Code::InvalidArgument,
    );
    expect_code(api.commit("", "x"), Code::InvalidArgument);
    expect_code(api.commit("x", ""), Code::InvalidArgument);
    expect_code(api.list_in(SN, &["name=x"]), Code::InvalidArgument);
    expect_code(api.list_in(SN, &["labels.\"open"]), Code::InvalidArgument);
    expect_code(api.list_in(SN, &["name~=/(/"]), Code::InvalidArgument);
    // Update without an info.
    let mut c = api.client.clone();
    let r = api.rt.block_on(c.update(pb::UpdateSnapshotRequest {
        snapshotter: SN.into(),
        info: None,
        update_mask: None,
    }));
    expect_code(r, Code::InvalidArgument);
    // Nothing was created by the refused calls.
    assert!(api.names(&[]).is_empty());
    assert!(layer_dirs(&lamina).is_empty(), "{:?}", layer_dirs(&lamina));
    // NUL and control characters are just bytes of an opaque key.
    let odd = "a\0b\n../../etc";
    api.prepare(odd, "").unwrap();
    assert_eq!(api.names(&[]), [odd]);
    // Rebase (containerd 2.2's Commit parent) is not offered.
    api.prepare("p", "").unwrap();
    api.commit("base", "p").unwrap();
    api.prepare("r", "").unwrap();
    expect_code(api.commit_with("rc", "r", &[], "base"), Code::Unimplemented);
    assert_eq!(api.stat("r").unwrap().kind, pb::Kind::Active as i32);
}

#[test]
fn names_and_engines_are_kept_apart() {
    let dir = TestDir::new(&lamina_testkit::unique_name("snap-ns"));
    let mut lamina = LaminaSnap::new(&dir.join("l"));
    // Both front doors on one store.
    let plugin_sock = PathBuf::from(lamina_testkit::PLUGIN_DIR)
        .join(format!("{}.sock", lamina_testkit::unique_name("lamina-ns")));
    lamina.extra_args = vec!["--socket".into(), plugin_sock.to_str().unwrap().into()];
    lamina.spawn();
    lamina.wait_ready();
    let api = Api::connect(&lamina.socket);
    api.prepare_in("a", "same", "", &[]).unwrap();
    api.prepare_in("b", "same", "", &[]).unwrap();
    expect_code(api.prepare_in("a", "same", "", &[]), Code::AlreadyExists);
    assert_eq!(api.list_in("a", &[]).unwrap().len(), 1);
    assert_eq!(api.list_in("b", &[]).unwrap().len(), 1);
    assert!(api.list_in(SN, &[]).unwrap().is_empty());

    // A graph driver layer is invisible to every snapshotter name (containerd's GC would remove it).
    let plugin = PluginClient::new(&plugin_sock);
    let home = dir.join("home");
    plugin
        .call(
            "Init",
            serde_json::json!({"Home": home, "Opts": [], "UIDMaps": [], "GIDMaps": []}),
        )
        .ok("init");
    plugin
        .call(
            "Create",
            serde_json::json!({"ID": "same", "Parent": "", "MountLabel": "", "StorageOpt": {}}),
        )
        .ok("create");
    assert_eq!(api.list_in("a", &[]).unwrap().len(), 1);
    for sn in ["docker", "", SN] {
        assert!(api.list_in(sn, &[]).unwrap().is_empty(), "{sn:?}");
    }
    // Removing through one door never touches the other's object of the same name.
    let mut c = api.client.clone();
    api.rt
        .block_on(c.remove(pb::RemoveSnapshotRequest {
            snapshotter: "a".into(),
            key: "same".into(),
        }))
        .unwrap();
    plugin
        .call("Exists", serde_json::json!({"ID": "same"}))
        .ok("exists");
    assert_eq!(
        plugin.call("Exists", serde_json::json!({"ID": "same"})).json()["Exists"],
        true
    );
    assert_eq!(api.list_in("b", &[]).unwrap().len(), 1);
    plugin
        .call("Remove", serde_json::json!({"ID": "same"}))
        .ok("remove");
    let _ = std::fs::remove_file(&plugin_sock);
}

#[test]
fn snapshots_survive_restarts_and_kills() {
    let (dir, mut lamina, mut api) = start("snap-restart");
    api.prepare("k", "").unwrap();
    api.commit_with("base", "k", &[("containerd.io/snapshot.ref", "sha256:abc")], "")
        .unwrap();
    api.prepare("active", "base").unwrap();
    api.view("view", "base").unwrap();
    let before = api.list_in(SN, &[]).unwrap();
    for sig in ["TERM", "KILL"] {
        drop(api);
        lamina.stop_with(sig);
        lamina.start_again();
        api = Api::connect(&lamina.socket);
        let mut after = api.list_in(SN, &[]).unwrap();
        let mut b = before.clone();
        after.sort_by(|x, y| x.name.cmp(&y.name));
        b.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(after, b, "after SIG{sig}");
        let m = api.mounts("active").unwrap();
        assert_eq!(m[0].r#type, "overlay");
    }
    api.prepare("new", "base").unwrap();
    assert_eq!(
        api.names(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc"#]),
        ["base"]
    );
    drop(dir);
}

/// Mounts `m` at `target` the way containerd does when the options outgrow a page: from the layers
/// directory, with lower directories relative to it.
fn mount_like_containerd(m: &Mount, layers: &Path, target: &Path) {
    let prefix = format!("{}/", layers.display());
    let opts: Vec<String> = m
        .options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k @ ("lowerdir" | "upperdir" | "workdir"), v)) => format!(
                "{k}={}",
                v.split(':')
                    .map(|p| p.strip_prefix(&prefix).unwrap_or(p))
                    .collect::<Vec<_>>()
                    .join(":")
            ),
            _ => o.clone(),
        })
        .collect();
    let st = Command::new("mount")
        .current_dir(layers)
        .args(["-t", &m.r#type, &m.source])
        .arg(target)
        .args(["-o", &opts.join(",")])
        .status()
        .unwrap();
    assert!(st.success(), "mount {m:?} failed");
}

#[test]
fn a_chain_of_130_layers_mounts_with_every_layer_visible() {
    if !require_root("a_chain_of_130_layers_mounts_with_every_layer_visible") {
        return;
    }
    let (dir, lamina, api) = start("snap-130");
    let target = dir.join("mnt");
    std::fs::create_dir(&target).unwrap();
    let layers = lamina.layers_dir();
    let mut parent = String::new();
    for i in 0..130 {
        let key = format!("default/{i}/extract {i}");
        let m = api.prepare(&key, &parent).unwrap();
        mount_like_containerd(&m[0], &layers, &target);
        std::fs::write(target.join(format!("f{i}")), format!("{i}")).unwrap();
        std::fs::write(target.join("top"), format!("{i}")).unwrap();
        if i == 64 {
            std::fs::remove_file(target.join("f10")).unwrap();
        }
        umount(&target);
        let name = format!("layer-{i}");
        api.commit(&name, &key).unwrap();
        parent = name;
    }
    let m = api.view("top-view", &parent).unwrap();
    assert_eq!(option(&m[0], "lowerdir=").unwrap().split(':').count(), 130);
    mount_like_containerd(&m[0], &layers, &target);
    assert_eq!(std::fs::read_to_string(target.join("top")).unwrap(), "129");
    assert_eq!(std::fs::read_to_string(target.join("f0")).unwrap(), "0");
    assert_eq!(std::fs::read_to_string(target.join("f129")).unwrap(), "129");
    assert!(!target.join("f10").exists(), "deleted in layer 64");
    let err = std::fs::write(target.join("new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "a view is read-only (EROFS): {err}");
    umount(&target);
}
