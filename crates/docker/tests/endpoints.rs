//! Every endpoint's happy path and response shape, over a real unix socket, with requests
//! byte-for-byte like dockerd 20.10's.

mod common;

use common::TestServer;
use serde_json::json;

const A: &str = "3f1c2ae5b0d54c9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f";
const B: &str = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";

#[test]
fn activate_with_empty_body() {
    let (_srv, mut c) = TestServer::connected();
    let r = c.call("/Plugin.Activate", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Content-Type"),
        Some("application/vnd.docker.plugins.v1+json")
    );
    assert_eq!(r.json(), json!({"Implements": ["GraphDriver"]}));
}

#[test]
fn all_endpoints_on_one_keep_alive_connection() {
    let (srv, mut c) = TestServer::connected();

    let r = c.call(
        "/GraphDriver.Init",
        r#"{"Home":"/var/lib/docker/lamina","Opts":["size=1G"],"UIDMaps":[{"container_id":0,"host_id":100000,"size":65536}],"GIDMaps":null}"#,
    );
    assert_eq!((r.status, r.json()), (200, json!({})));
    let init = srv.fake.init_req.lock().unwrap().clone().unwrap();
    assert_eq!(init.home, "/var/lib/docker/lamina");
    assert_eq!(init.options, vec!["size=1G".to_owned()]);
    assert_eq!(init.uid_maps.len(), 1);
    assert_eq!(init.uid_maps[0].host_id, 100000);
    assert!(init.gid_maps.is_empty());

    let r = c.call("/GraphDriver.Capabilities", "{}");
    assert_eq!(r.json(), json!({"Capabilities": {"ReproducesExactDiffs": false}}));

    let r = c.call("/GraphDriver.Create", &format!(r#"{{"ID":"{A}"}}"#));
    assert_eq!((r.status, r.json()), (200, json!({})));
    let r = c.call(
        "/GraphDriver.CreateReadWrite",
        &format!(r#"{{"ID":"{B}-init","Parent":"{A}","MountLabel":"system_u:object_r:container_file_t:s0","StorageOpt":{{"size":"10G"}}}}"#),
    );
    assert_eq!((r.status, r.json()), (200, json!({})));
    {
        let reqs = srv.fake.create_reqs.lock().unwrap();
        assert_eq!(reqs[0].0.parent, None);
        assert!(!reqs[0].1);
        assert_eq!(reqs[1].0.id, format!("{B}-init"));
        assert_eq!(reqs[1].0.parent.as_deref(), Some(A));
        assert_eq!(reqs[1].0.mount_label, "system_u:object_r:container_file_t:s0");
        assert_eq!(reqs[1].0.storage_opt.get("size").map(String::as_str), Some("10G"));
        assert!(reqs[1].1);
    }

    let r = c.call("/GraphDriver.Status", "{}");
    assert_eq!(
        r.json(),
        json!({"Status": [["Backing Filesystem", "fake"], ["Layers", "2"]]})
    );

    let r = c.call(
        "/GraphDriver.Get",
        &format!(r#"{{"ID":"{A}","MountLabel":"lbl"}}"#),
    );
    assert_eq!(r.json(), json!({"Dir": format!("/fake/mnt/{A}")}));
    let r = c.call("/GraphDriver.Put", &format!(r#"{{"ID":"{A}"}}"#));
    assert_eq!(r.json(), json!({}));

    let r = c.call("/GraphDriver.Exists", &format!(r#"{{"ID":"{A}"}}"#));
    assert_eq!(r.json(), json!({"Exists": true}));
    let r = c.call("/GraphDriver.GetMetadata", &format!(r#"{{"ID":"{A}"}}"#));
    assert_eq!(r.json(), json!({"Metadata": {"Id": A}}));
    let r = c.call(
        "/GraphDriver.Changes",
        &format!(r#"{{"ID":"{B}-init","Parent":"{A}"}}"#),
    );
    assert_eq!(
        r.json(),
        json!({"Changes": [{"Path": "/etc/motd", "Kind": 2}, {"Path": "/new", "Kind": 1}]})
    );
    let r = c.call(
        "/GraphDriver.DiffSize",
        &format!(r#"{{"ID":"{B}-init","Parent":"{A}"}}"#),
    );
    assert_eq!(r.json(), json!({"Size": 42}));

    let r = c.call("/GraphDriver.Diff", &format!(r#"{{"ID":"{A}"}}"#));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/x-tar"));
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    assert!(r.terminated);
    assert_eq!(r.body.len(), 10240);

    let tar = vec![7u8; 100_000];
    let r = c.call(
        "/GraphDriver.Create",
        &format!(r#"{{"ID":"{B}","Parent":"{A}"}}"#),
    );
    assert_eq!(r.status, 200);
    let r = c.apply_diff(&format!("id={B}&parent={A}"), &tar);
    assert_eq!((r.status, r.json()), (200, json!({"Size": 100_000})));
    assert_eq!(srv.fake.applied.lock().unwrap().get(B).copied(), Some(100_000));
    // Empty layer: empty chunked body.
    let r = c.call("/GraphDriver.Create", r#"{"ID":"empty"}"#);
    assert_eq!(r.status, 200);
    let r = c.apply_diff("id=empty&parent=", b"");
    assert_eq!(r.json(), json!({"Size": 0}));

    let r = c.call("/GraphDriver.Remove", &format!(r#"{{"ID":"{B}"}}"#));
    assert_eq!(r.json(), json!({}));
    let r = c.call("/GraphDriver.Cleanup", "{}");
    assert_eq!(r.json(), json!({}));

    let calls = srv.fake.calls();
    assert_eq!(
        calls.first().map(String::as_str),
        Some("init /var/lib/docker/lamina")
    );
    assert!(calls.contains(&format!("apply {B} {A}")));
    assert!(calls.contains(&format!("remove {B}")));
    assert_eq!(calls.last().map(String::as_str), Some("cleanup"));
}

#[test]
fn errors_are_500_with_err() {
    let (_srv, mut c) = TestServer::connected();
    let r = c.call("/GraphDriver.Get", r#"{"ID":"nope"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(
        r.header("Content-Type"),
        Some("application/vnd.docker.plugins.v1+json")
    );
    assert_eq!(r.err(), "not found: layer nope");
    // The connection stays usable.
    let r = c.call("/GraphDriver.Status", "");
    assert_eq!(r.status, 200);
}

#[test]
fn capabilities_status_cleanup_accept_empty_null_and_object() {
    let (_srv, mut c) = TestServer::connected();
    for body in ["", "{}", "null", " "] {
        for path in [
            "/GraphDriver.Capabilities",
            "/GraphDriver.Status",
            "/GraphDriver.Cleanup",
        ] {
            let r = c.call(path, body);
            assert_eq!(r.status, 200, "{path} {body:?}: {:?}", r.json());
        }
    }
}

#[test]
fn apply_diff_refused_before_reading_small_body_keeps_connection() {
    let (_srv, mut c) = TestServer::connected();
    // Unknown layer: the driver refuses without reading; a small body is drained.
    let r = c.apply_diff("id=unknown&parent=", &[1u8; 1000]);
    assert_eq!(r.status, 500);
    assert_eq!(r.err(), "not found: layer unknown");
    assert_eq!(r.header("Connection"), None);
    assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
}

#[test]
fn apply_diff_refused_before_reading_big_body_closes_connection() {
    let (_srv, mut c) = TestServer::connected();
    c.apply_diff_head("id=unknown&parent=").unwrap();
    // Like Go's client, keep writing the body while reading the response.
    let mut w = common::Client::new(c.stream().try_clone().unwrap());
    let writer = std::thread::spawn(move || {
        for _ in 0..64 {
            if w.send_chunk(&[1u8; 32 * 1024]).is_err() {
                return;
            }
        }
        let _ = w.end_chunks();
    });
    let r = c.read_response().unwrap();
    writer.join().unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(c.is_closed());
}
