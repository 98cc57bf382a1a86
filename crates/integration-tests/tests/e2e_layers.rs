//! End-to-end tests of the operator's commands (issue 9): `lamina status`, `layers`, `gc`, `verify`, against a
//! running lamina under a real dockerd (through the admin socket) and against a stopped one (store opened
//! directly). Needs root, dockerd, containerd, runc and busybox-static; without them the tests say SKIPPED (and
//! fail under CI=true).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use lamina_testkit::*;
use serde_json::Value;

fn docker_ns(root: &Path) -> String {
    let layers = lamina_cli_json(root, &["layers", "ls"]);
    layers
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["record"]["ns"].as_str().unwrap().to_string())
        .find(|ns| ns.starts_with("docker:"))
        .expect("a docker layer")
}

fn sha256sum(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    let s = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", s.split_whitespace().next().unwrap())
}

struct Setup {
    docker: Dockerd,
    lamina: Lamina,
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

fn setup(test: &str) -> Option<Setup> {
    let serial = serial_if(require_docker(test))?;
    let lamina = Lamina::start(&unique_name(test));
    let docker = Dockerd::start(&lamina.name);
    Some(Setup {
        docker,
        lamina,
        _serial: serial,
    })
}

/// The stored digest equals `sha256sum` of the applied tar and dockerd's DiffID; `verify` is clean, then
/// flags a flipped byte with its path and exits 1; counters of a scripted Get/Put sequence survive a restart.
#[test]
fn verify_digest_and_statistics() {
    let Some(mut s) = setup("layersverify") else {
        return;
    };
    let root = s.lamina.data_root.clone();
    busybox_image(&s.docker, "bb:1");
    let tarball = s.docker.dir().join("bb-bb_1.tar");
    let diff_id = s
        .docker
        .ok(&["image", "inspect", "-f", "{{index .RootFS.Layers 0}}", "bb:1"]);
    assert_eq!(sha256sum(&tarball), diff_id, "tar digest vs DiffID");
    let layers = lamina_cli_json(&root, &["layers", "ls"]);
    let image_layer = layers
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["record"]["digest"].as_str() == Some(diff_id.as_str()))
        .unwrap_or_else(|| panic!("no layer with digest {diff_id}: {layers:#}"))
        .clone();
    let number = image_layer["number"].as_u64().unwrap();
    let ns = image_layer["record"]["ns"].as_str().unwrap().to_string();
    let name = image_layer["record"]["name"].as_str().unwrap().to_string();

    // Verification: clean, then a flipped byte, through the daemon.
    let out = lamina_cli_ok(&root, &["verify", "--all"]);
    assert!(out.contains("0 mismatched"), "{out}");
    let victim = root.join(format!("layers/{number:x}/diff/bin/busybox"));
    let mut bytes = fs::read(&victim).unwrap();
    bytes[1000] ^= 1;
    fs::write(&victim, &bytes).unwrap();
    let out = lamina_cli(&root, &["verify", "--all"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("MISMATCH") && text.contains("/bin/busybox"),
        "{text}"
    );
    let by_name = lamina_cli(&root, &["verify", &format!("{ns}/{name}")]);
    assert_eq!(by_name.status.code(), Some(1));
    bytes[1000] ^= 1;
    fs::write(&victim, &bytes).unwrap();
    let out = lamina_cli_ok(&root, &["verify", &format!("{number:x}")]);
    assert!(out.contains("ok "), "{out}");

    // Statistics: a scripted Get/Put sequence on a fresh layer over the image layer.
    let c = s.lamina.client();
    c.call(
        "CreateReadWrite",
        serde_json::json!({"ID": "statlayer", "Parent": name, "MountLabel": ""}),
    )
    .ok("create");
    for _ in 0..3 {
        c.call("Get", serde_json::json!({"ID": "statlayer", "MountLabel": ""}))
            .ok("get");
    }
    for _ in 0..3 {
        c.call("Put", serde_json::json!({"ID": "statlayer"})).ok("put");
    }
    c.call("Get", serde_json::json!({"ID": "statlayer", "MountLabel": ""}))
        .ok("get");
    let inspect =
        |root: &Path| lamina_cli_json(root, &["layers", "inspect", "statlayer", "--namespace", &ns]);
    let v = inspect(&root);
    assert_eq!(v["stats"]["gets"], 4, "{v:#}");
    assert_eq!(v["stats"]["uses"], 2, "{v:#}");
    assert_eq!(v["mounts"], 1, "{v:#}");
    let image_uses = |root: &Path| {
        lamina_cli_json(root, &["layers", "inspect", &format!("{number:x}")])["stats"]["uses"]
            .as_u64()
            .unwrap()
    };
    let before = image_uses(&root);
    assert!(before >= 2, "the image layer was below two bring-ups: {before}");
    c.call("Put", serde_json::json!({"ID": "statlayer"})).ok("put");
    let top = lamina_cli_ok(&root, &["layers", "top", "-n", "3"]);
    assert!(top.contains(&format!("{number:x} ")), "{top}");
    let status = lamina_cli_json(&root, &["status"]);
    assert!(status["counters"]["gets"].as_u64().unwrap() >= 4, "{status:#}");
    assert!(status["counters"]["puts"].as_u64().unwrap() >= 4, "{status:#}");

    // Across a restart (SIGTERM flushes), and read directly while lamina is down.
    let st = s.lamina.stop();
    assert!(st.success());
    let v = inspect(&root);
    assert_eq!(
        (v["stats"]["gets"].as_u64(), v["stats"]["uses"].as_u64()),
        (Some(4), Some(2)),
        "{v:#}"
    );
    assert_eq!(image_uses(&root), before);
    s.lamina.start_again();
    let v = inspect(&root);
    assert_eq!(
        (v["stats"]["gets"].as_u64(), v["stats"]["uses"].as_u64()),
        (Some(4), Some(2)),
        "{v:#}"
    );
    c.call("Remove", serde_json::json!({"ID": "statlayer"}))
        .ok("remove");
    assert_eq!(
        s.docker.ok(&["run", "--rm", "bb:1", "echo", "still fine"]),
        "still fine"
    );
}

/// A tar reader that hands out a header and some content of a big file, then waits until told to stop.
struct StallingTar {
    data: Vec<u8>,
    pos: usize,
    stop: Arc<AtomicBool>,
}

impl Read for StallingTar {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos < self.data.len() {
            let n = buf.len().min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        while !self.stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(20));
        }
        Err(std::io::Error::other("stopped"))
    }
}

fn kinds(report: &Value, root: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let p = PathBuf::from(g["path"].as_str().unwrap());
            (
                g["kind"].as_str().unwrap().to_string(),
                p.strip_prefix(root).unwrap().display().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Garbage of each kind (kill -9 mid-ApplyDiff, a leaked mount, orphan directories): `gc --dry-run` lists
/// exactly those, `gc` removes exactly those while a container keeps running, and docker works afterwards.
#[test]
fn gc_removes_exactly_the_planted_garbage() {
    let Some(mut s) = setup("layersgc") else { return };
    let root = s.lamina.data_root.clone();
    busybox_image(&s.docker, "bb:1");
    s.docker
        .run_detached("r1", "bb:1", "echo alive > /a && sleep 1000");
    let ns = docker_ns(&root);
    let pid: u32 = s
        .docker
        .ok(&["inspect", "-f", "{{.State.Pid}}", "r1"])
        .parse()
        .unwrap();

    // 1. While lamina runs: a directory no record explains (never removed by this store, so an "unknown"
    // directory that only an operator's gc takes), found and removed through the daemon.
    fs::create_dir_all(root.join("layers/fff0/diff")).unwrap();
    fs::write(root.join("layers/fff0/diff/x"), vec![1u8; 5000]).unwrap();
    let dry = lamina_cli_json(&root, &["gc", "--dry-run"]);
    assert_eq!(
        kinds(&dry, &root),
        vec![("unknown_dir".into(), "layers/fff0".into())],
        "{dry:#}"
    );
    let done = lamina_cli_json(&root, &["gc"]);
    assert_eq!(kinds(&done, &root), kinds(&dry, &root));
    assert!(!root.join("layers/fff0").exists());

    // 2. kill -9 in the middle of an ApplyDiff.
    let c = s.lamina.client();
    c.call(
        "Create",
        serde_json::json!({"ID": "halfway", "Parent": "", "MountLabel": ""}),
    )
    .ok("create");
    let mut tar = tar_header(b"big", b'0', 0o644, 64 << 20, b"").to_vec();
    tar.extend(vec![9u8; 4 << 20]);
    let stop = Arc::new(AtomicBool::new(false));
    let reader_stop = stop.clone();
    let socket = s.lamina.socket.clone();
    let upload = thread::spawn(move || {
        let mut r = StallingTar {
            data: tar,
            pos: 0,
            stop: reader_stop,
        };
        let _ = PluginClient::new(&socket).apply_diff("halfway", "", &mut r);
    });
    let staging = root.join("staging");
    poll(Duration::from_secs(20), || {
        fs::read_dir(&staging).ok()?.next().map(|_| ())
    })
    .expect("the apply started");
    thread::sleep(Duration::from_millis(300));
    s.lamina.kill9();
    stop.store(true, Ordering::SeqCst);
    upload.join().unwrap();
    // 3. With lamina down: a leaked mount and another orphan.
    fs::create_dir_all(root.join("layers/fff1/merged")).unwrap();
    let leak_src = s.lamina.dir().join("leak");
    fs::create_dir_all(&leak_src).unwrap();
    run_ok(
        Command::new("mount")
            .arg("--bind")
            .arg(&leak_src)
            .arg(root.join("layers/fff1/merged")),
    );
    fs::create_dir_all(root.join("layers/fff2")).unwrap();

    let dry = lamina_cli_json(&root, &["gc", "--dry-run"]);
    let staged: Vec<String> = fs::read_dir(&staging)
        .unwrap()
        .map(|e| format!("staging/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let mut expected = vec![
        ("interrupted_apply".to_string(), staged[0].clone()),
        ("unknown_dir".to_string(), "layers/fff1".to_string()),
        ("unknown_dir".to_string(), "layers/fff2".to_string()),
        ("stale_mount".to_string(), "layers/fff1/merged".to_string()),
    ];
    // The spare layer directories the killed daemon had made ahead: empty trees that no record names.
    let recorded: Vec<String> = lamina_cli_json(&root, &["layers", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("{:x}", l["number"].as_u64().unwrap()))
        .collect();
    let mut spares = 0;
    for e in fs::read_dir(root.join("layers")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if !recorded.contains(&name) && is_spare_like(&root.join("layers").join(&name)) {
            expected.push(("spare".to_string(), format!("layers/{name}")));
            spares += 1;
        }
    }
    assert!(spares <= MAX_SPARES, "{spares} spares");
    expected.sort();
    assert_eq!(kinds(&dry, &root), expected, "{dry:#}");
    assert!(dry["bytes"].as_u64().unwrap() > 0);
    let text = lamina_cli_ok(&root, &["gc", "--dry-run"]);
    assert!(text.contains("would remove interrupted_apply"), "{text}");

    let done = lamina_cli_json(&root, &["gc"]);
    assert_eq!(kinds(&done, &root), expected, "{done:#}");
    assert!(done["errors"].as_array().unwrap().is_empty(), "{done:#}");
    assert!(!root.join("layers/fff1").exists() && !root.join("layers/fff2").exists());
    assert_eq!(fs::read_dir(&staging).unwrap().count(), 0);
    assert!(mounts_under(&root.join("layers"))
        .iter()
        .all(|m| !m.starts_with(root.join("layers/fff1"))));
    let again = lamina_cli_json(&root, &["gc", "--dry-run"]);
    assert!(again["items"].as_array().unwrap().is_empty(), "{again:#}");
    // The container kept running throughout (dockerd cannot exec while its plugin is down: look directly).
    assert!(pid_alive(pid));
    assert_eq!(
        fs::read_to_string(format!("/proc/{pid}/root/a")).unwrap(),
        "alive\n"
    );

    // lamina again: the rolled-back layer takes a retry, docker works, the container stops cleanly.
    s.lamina.start_again();
    let v = lamina_cli_json(&root, &["layers", "inspect", "halfway", "--namespace", &ns]);
    assert_eq!(v["record"]["state"], "Empty", "{v:#}");
    let small = TarBuilder::new().file("ok", 0o644, b"ok").finish();
    c.apply_diff("halfway", "", &mut &small[..]).unwrap().ok("retry");
    c.call("Remove", serde_json::json!({"ID": "halfway"}))
        .ok("remove");
    assert_eq!(s.docker.ok(&["run", "--rm", "bb:1", "echo", "fine"]), "fine");
    assert_eq!(s.docker.ok(&["exec", "r1", "cat", "/a"]), "alive");
    s.docker.ok(&["stop", "-t", "1", "r1"]);
    s.docker.ok(&["rm", "r1"]);
    // A namespace that is in use cannot be declared removed.
    let out = lamina_cli(&root, &["gc", "--dry-run", "--namespace", &ns]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
}
