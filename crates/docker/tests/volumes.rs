//! The `/VolumeDriver.*` routes over a real unix socket, against an in-memory volume map, with requests
//! shaped like dockerd 20.10's; and `/Plugin.Activate` with one or both drivers.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::{Client, Fake};
use lamina_docker::{serve, ErrorKind, PluginError, Router, Scope, ShutdownHandle, VolumeDriver, VolumeInfo};
use serde_json::json;

const ID1: &str = "3f1c2ae5b0d54c9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f";

/// Options and per-id counts of one fake volume.
type FakeVolume = (BTreeMap<String, String>, BTreeMap<String, u32>);

/// Volumes in memory: name -> (opts, per-id counts); records every call.
#[derive(Default)]
struct FakeVolumes {
    vols: Mutex<BTreeMap<String, FakeVolume>>,
    calls: Mutex<Vec<String>>,
}

impl FakeVolumes {
    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }

    fn mountpoint(name: &str) -> PathBuf {
        PathBuf::from(format!("/mnt/test/{name}"))
    }

    fn info(name: &str, counts: &BTreeMap<String, u32>) -> VolumeInfo {
        VolumeInfo {
            name: name.to_string(),
            mountpoint: (!counts.is_empty()).then(|| Self::mountpoint(name)),
            created_at: Some("2024-01-02T03:04:05Z".into()),
            status: BTreeMap::from([("Mounts".to_string(), counts.len().to_string())]),
        }
    }
}

impl VolumeDriver for FakeVolumes {
    fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<(), PluginError> {
        self.log(format!("create {name} {opts:?}"));
        if opts.contains_key("bad") {
            return Err(PluginError::invalid("unknown option \"bad\""));
        }
        self.vols
            .lock()
            .unwrap()
            .entry(name.into())
            .or_insert_with(|| (opts.clone(), BTreeMap::new()));
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), PluginError> {
        self.log(format!("remove {name}"));
        let mut v = self.vols.lock().unwrap();
        match v.get(name) {
            None => Err(PluginError::not_found(format!("volume {name}"))),
            Some((_, c)) if !c.is_empty() => Err(PluginError::new(ErrorKind::InUse, "mounted")),
            Some(_) => {
                v.remove(name);
                Ok(())
            }
        }
    }

    fn mount(&self, name: &str, id: &str) -> Result<PathBuf, PluginError> {
        self.log(format!("mount {name} {id}"));
        let mut v = self.vols.lock().unwrap();
        let (_, c) = v
            .get_mut(name)
            .ok_or_else(|| PluginError::not_found(format!("volume {name}")))?;
        *c.entry(id.into()).or_default() += 1;
        Ok(Self::mountpoint(name))
    }

    fn unmount(&self, name: &str, id: &str) -> Result<(), PluginError> {
        self.log(format!("unmount {name} {id}"));
        let mut v = self.vols.lock().unwrap();
        if let Some((_, c)) = v.get_mut(name) {
            if let Some(n) = c.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    c.remove(id);
                }
            }
        }
        Ok(())
    }

    fn path(&self, name: &str) -> Result<Option<PathBuf>, PluginError> {
        let v = self.vols.lock().unwrap();
        let (_, c) = v
            .get(name)
            .ok_or_else(|| PluginError::not_found(format!("volume {name}")))?;
        Ok((!c.is_empty()).then(|| Self::mountpoint(name)))
    }

    fn get(&self, name: &str) -> Result<VolumeInfo, PluginError> {
        let v = self.vols.lock().unwrap();
        let (_, c) = v
            .get(name)
            .ok_or_else(|| PluginError::not_found(format!("volume {name}")))?;
        Ok(Self::info(name, c))
    }

    fn list(&self) -> Result<Vec<VolumeInfo>, PluginError> {
        let v = self.vols.lock().unwrap();
        Ok(v.iter().map(|(n, (_, c))| Self::info(n, c)).collect())
    }

    fn scope(&self) -> Scope {
        Scope::Global
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn start(router: Router) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.sock");
        let listener = lamina_docker::bind_socket(&path).unwrap();
        let shutdown = ShutdownHandle::new();
        let sd = shutdown.clone();
        let router = Arc::new(router);
        let thread = std::thread::spawn(move || serve(listener, router, &sd));
        Server {
            _dir: dir,
            path,
            shutdown,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> Client {
        Client::new(UnixStream::connect(&self.path).unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn volume_server() -> (Server, Arc<FakeVolumes>) {
    let fake = Arc::new(FakeVolumes::default());
    (
        Server::start(Router::new().with_volume_driver(fake.clone())),
        fake,
    )
}

#[test]
fn activate_lists_what_is_set() {
    let (srv, _) = volume_server();
    let r = srv.connect().call("/Plugin.Activate", "");
    assert_eq!(r.json(), json!({"Implements": ["VolumeDriver"]}));

    let both = Server::start(
        Router::new()
            .with_graph_driver(Fake::new())
            .with_volume_driver(Arc::new(FakeVolumes::default())),
    );
    let r = both.connect().call("/Plugin.Activate", "");
    assert_eq!(r.json(), json!({"Implements": ["GraphDriver", "VolumeDriver"]}));

    // Graph-only router: VolumeDriver paths are unknown endpoints, and the other way round.
    let graph = Server::start(Router::new().with_graph_driver(Fake::new()));
    let r = graph.connect().call("/VolumeDriver.List", "{}");
    assert_eq!(r.status, 404);
    assert!(r.err().starts_with("not found: unknown endpoint"), "{}", r.err());
    let r = srv.connect().call("/GraphDriver.Status", "{}");
    assert_eq!(r.status, 404);
}

#[test]
fn every_endpoint_like_dockerd() {
    let (srv, fake) = volume_server();
    let mut c = srv.connect();
    let r = c.call("/VolumeDriver.Capabilities", "{}");
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"Capabilities": {"Scope": "global"}}))
    );
    let r = c.call("/VolumeDriver.Get", r#"{"Name":"v1"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(r.err(), "not found: volume v1");
    let r = c.call(
        "/VolumeDriver.Create",
        r#"{"Name":"v1","Opts":{"ReplicationGoal":"2"}}"#,
    );
    assert_eq!((r.status, r.json()), (200, json!({})));
    let r = c.call("/VolumeDriver.Create", r#"{"Name":"v2","Opts":null}"#);
    assert_eq!((r.status, r.json()), (200, json!({})));
    let r = c.call("/VolumeDriver.Get", r#"{"Name":"v1"}"#);
    assert_eq!(
        r.json(),
        json!({"Volume": {"Name": "v1", "Mountpoint": "", "CreatedAt": "2024-01-02T03:04:05Z", "Status": {"Mounts": "0"}}})
    );
    let r = c.call("/VolumeDriver.Path", r#"{"Name":"v1"}"#);
    assert_eq!(r.json(), json!({"Mountpoint": ""}));
    let r = c.call("/VolumeDriver.Mount", &format!(r#"{{"Name":"v1","ID":"{ID1}"}}"#));
    assert_eq!((r.status, r.json()), (200, json!({"Mountpoint": "/mnt/test/v1"})));
    let r = c.call("/VolumeDriver.Path", r#"{"Name":"v1"}"#);
    assert_eq!(r.json(), json!({"Mountpoint": "/mnt/test/v1"}));
    let r = c.call("/VolumeDriver.List", "{}");
    assert_eq!(
        r.json(),
        json!({"Volumes": [
            {"Name": "v1", "Mountpoint": "/mnt/test/v1", "CreatedAt": "2024-01-02T03:04:05Z"},
            {"Name": "v2", "Mountpoint": "", "CreatedAt": "2024-01-02T03:04:05Z"}
        ]})
    );
    let r = c.call("/VolumeDriver.Remove", r#"{"Name":"v1"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(r.err(), "in use: mounted");
    let r = c.call(
        "/VolumeDriver.Unmount",
        &format!(r#"{{"Name":"v1","ID":"{ID1}"}}"#),
    );
    assert_eq!((r.status, r.json()), (200, json!({})));
    let r = c.call("/VolumeDriver.Remove", r#"{"Name":"v1"}"#);
    assert_eq!((r.status, r.json()), (200, json!({})));
    // An empty body for List is `{}`.
    let r = c.call("/VolumeDriver.List", "");
    assert_eq!(r.json()["Volumes"].as_array().unwrap().len(), 1);
    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![
            "create v1 {\"ReplicationGoal\": \"2\"}".to_string(),
            "create v2 {}".into(),
            format!("mount v1 {ID1}"),
            "remove v1".into(),
            format!("unmount v1 {ID1}"),
            "remove v1".into(),
        ]
    );
}

#[test]
fn bad_requests_are_refused_before_the_driver() {
    let (srv, fake) = volume_server();
    let mut c = srv.connect();
    for (path, body, want) in [
        ("/VolumeDriver.Create", "{}", "invalid argument: missing Name"),
        (
            "/VolumeDriver.Get",
            r#"{"Name":null}"#,
            "invalid argument: missing Name",
        ),
        (
            "/VolumeDriver.Mount",
            r#"{"Name":"v1"}"#,
            "invalid argument: missing ID",
        ),
        (
            "/VolumeDriver.Unmount",
            r#"{"Name":"v1","ID":""}"#,
            "invalid argument: missing ID",
        ),
        (
            "/VolumeDriver.Mount",
            r#"{"Name":"v1","ID":"../x"}"#,
            "invalid argument: invalid id \"../x\"",
        ),
        (
            "/VolumeDriver.Create",
            r#"{"Name":"v1","Opts":{"a":5}}"#,
            "invalid argument: malformed request body",
        ),
        (
            "/VolumeDriver.Create",
            r#"{"Name":7}"#,
            "invalid argument: malformed request body",
        ),
        (
            "/VolumeDriver.Create",
            "[]",
            "invalid argument: malformed request body",
        ),
    ] {
        let r = c.call(path, body);
        assert_eq!(r.status, 500, "{path} {body}");
        assert!(r.err().starts_with(want), "{path} {body}: {}", r.err());
    }
    // Errors of the driver travel as {"Err"} too.
    let r = c.call("/VolumeDriver.Create", r#"{"Name":"v1","Opts":{"bad":"x"}}"#);
    assert_eq!(r.err(), "invalid argument: unknown option \"bad\"");
    let r = c.call("/VolumeDriver.Frobnicate", "{}");
    assert_eq!(r.status, 404);
    assert_eq!(
        fake.calls.lock().unwrap().len(),
        1,
        "only the last Create reached the driver"
    );
}
