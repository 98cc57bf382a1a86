//! bad-inputs.md (b) B1–B4, B13 and (c) C1–C8, C13, over a real unix socket.

mod common;

use std::time::{Duration, Instant};

use common::{dockerd_request, Client, TestServer};
use lamina_testkit::BAD_IDS;
use serde_json::json;

/// Endpoints whose JSON body names a layer, with a valid rest of the body.
const ID_ENDPOINTS: &[&str] = &[
    "/GraphDriver.Create",
    "/GraphDriver.CreateReadWrite",
    "/GraphDriver.Remove",
    "/GraphDriver.Get",
    "/GraphDriver.Put",
    "/GraphDriver.GetMetadata",
    "/GraphDriver.Diff",
    "/GraphDriver.Changes",
    "/GraphDriver.DiffSize",
];

#[track_caller]
fn assert_driver_not_called(srv: &TestServer) {
    assert!(
        srv.fake.calls().is_empty(),
        "driver was called: {:?}",
        srv.fake.calls()
    );
}

/// Posts `body` to each of `paths`; panics unless each answers `status` with an `Err` starting with `prefix`.
fn expect_refused(c: &mut Client, paths: &[&str], body: &str, status: u16, prefix: &str) {
    for path in paths {
        let r = c.call(path, body);
        assert_eq!(r.status, status, "{path}");
        assert!(r.err().starts_with(prefix), "{path}: {}", r.err());
    }
}

#[test]
fn b1_b2_bad_ids_are_invalid_argument_and_never_reach_the_driver() {
    let (srv, mut c) = TestServer::connected();
    for id in BAD_IDS {
        let id_json = serde_json::to_string(id).unwrap();
        for path in ID_ENDPOINTS {
            let r = c.call(path, &format!(r#"{{"ID":{id_json}}}"#));
            assert_eq!(r.status, 500, "{path} {id:?}");
            assert!(
                r.err().starts_with("invalid argument: invalid id \""),
                "{path} {id:?}: {}",
                r.err()
            );
            assert!(
                !r.err().contains('\n') && !r.err().contains('\0'),
                "unescaped: {:?}",
                r.err()
            );
        }
        // As a parent.
        for path in [
            "/GraphDriver.Create",
            "/GraphDriver.CreateReadWrite",
            "/GraphDriver.Diff",
        ] {
            let r = c.call(path, &format!(r#"{{"ID":"ok","Parent":{id_json}}}"#));
            assert!(
                r.err().starts_with("invalid argument: invalid id"),
                "{path} parent {id:?}: {}",
                r.err()
            );
        }
        // In the ApplyDiff query string, percent-encoded.
        let enc: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
        let r = c.apply_diff(&format!("id={enc}&parent="), b"");
        assert!(
            r.err().starts_with("invalid argument: invalid id"),
            "apply {id:?}: {}",
            r.err()
        );
        let r = c.apply_diff(&format!("id=ok&parent={enc}"), b"");
        assert!(
            r.err().starts_with("invalid argument: invalid id"),
            "apply parent {id:?}: {}",
            r.err()
        );
        // Exists answers false instead.
        let r = c.call("/GraphDriver.Exists", &format!(r#"{{"ID":{id_json}}}"#));
        assert_eq!(r.json(), json!({"Exists": false}));
    }
    assert_driver_not_called(&srv);
}

#[test]
fn b3_empty_or_missing_id_on_every_call() {
    let (srv, mut c) = TestServer::connected();
    for path in ID_ENDPOINTS {
        for body in [
            "",
            "{}",
            "null",
            r#"{"ID":""}"#,
            r#"{"ID":null}"#,
            r#"{"Parent":"x"}"#,
        ] {
            let r = c.call(path, body);
            assert_eq!(r.status, 500, "{path} {body}");
            assert_eq!(r.err(), "invalid argument: missing ID", "{path} {body}");
        }
    }
    for q in ["", "parent=x", "id=", "id=&parent=", "ID=abc"] {
        let r = c.apply_diff(q, b"");
        assert_eq!(r.err(), "invalid argument: missing ID", "{q}");
    }
    let r = c.call("/GraphDriver.Init", "{}");
    assert_eq!(r.err(), "invalid argument: missing Home");
    let r = c.call("/GraphDriver.Exists", "{}");
    assert_eq!(r.json(), json!({"Exists": false}));
    assert_driver_not_called(&srv);
}

#[test]
fn b4_long_ids() {
    let (_srv, mut c) = TestServer::connected();
    // 128 bytes is fine, 129 and 300 are not.
    let ok = "a".repeat(128);
    let r = c.call("/GraphDriver.Create", &format!(r#"{{"ID":"{ok}"}}"#));
    assert_eq!(r.status, 200, "{:?}", r.json());
    for n in [129, 300] {
        let r = c.call("/GraphDriver.Get", &format!(r#"{{"ID":"{}"}}"#, "a".repeat(n)));
        let e = r.err();
        assert!(e.starts_with("invalid argument: invalid id"), "{e}");
        assert!(e.contains(&format!("({n} bytes, at most 128)")), "{e}");
        assert!(e.len() < 200, "{e}");
    }
    // 300-byte id in the ApplyDiff query.
    let r = c.apply_diff(&format!("id={}", "b".repeat(300)), b"");
    assert!(r.err().starts_with("invalid argument: invalid id"));
}

#[test]
fn b4_ten_megabyte_id_is_answered_quickly_without_buffering() {
    let srv = TestServer::start();
    let body = format!(r#"{{"ID":"{}"}}"#, "a".repeat(10_000_000));
    let mut c = srv.connect();
    let started = Instant::now();
    c.send(&dockerd_request("/GraphDriver.Get", "")[..0]).unwrap();
    let head = format!(
        "POST /GraphDriver.Get HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.send(head.as_bytes()).unwrap();
    let mut w = Client::new(c.stream().try_clone().unwrap());
    let writer = std::thread::spawn(move || {
        let _ = w.send(body.as_bytes());
    });
    let r = c.read_response().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status, 500);
    assert_eq!(r.err(), "invalid argument: request body too large");
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(c.is_closed());
    writer.join().unwrap();
    // In a chunked body the cap applies as the bytes arrive.
    let mut c = srv.connect();
    c.send(b"POST /GraphDriver.Get HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let mut w = Client::new(c.stream().try_clone().unwrap());
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..160 {
            if w.send_chunk(&chunk).is_err() {
                return;
            }
        }
    });
    let r = c.read_response().unwrap();
    assert_eq!(r.err(), "invalid argument: request body too large");
    assert!(c.is_closed());
    writer.join().unwrap();
    assert!(srv.fake.calls().is_empty());
}

#[test]
fn b13_unknown_ids() {
    let (_srv, mut c) = TestServer::connected();
    expect_refused(
        &mut c,
        &[
            "/GraphDriver.Get",
            "/GraphDriver.Diff",
            "/GraphDriver.Changes",
            "/GraphDriver.DiffSize",
            "/GraphDriver.GetMetadata",
        ],
        r#"{"ID":"unknown"}"#,
        500,
        "not found: ",
    );
    let r = c.call("/GraphDriver.Exists", r#"{"ID":"unknown"}"#);
    assert_eq!((r.status, r.json()), (200, json!({"Exists": false})));
    let r = c.call("/GraphDriver.Exists", r#"{"ID":"../x"}"#);
    assert_eq!((r.status, r.json()), (200, json!({"Exists": false})));
}

#[test]
fn c1_malformed_json() {
    let (srv, mut c) = TestServer::connected();
    let mut cases: Vec<Vec<u8>> = vec![
        br#"{"ID":"#.to_vec(),
        br#"{"ID":"a"} garbage"#.to_vec(),
        br#"{"ID":"a"}{"ID":"b"}"#.to_vec(),
        b"\xEF\xBB\xBF{\"ID\":\"a\"}".to_vec(),
        b"{\"ID\":\"a\xff\"}".to_vec(),
        br#"{"ID":"a",}"#.to_vec(),
        br#"{'ID':'a'}"#.to_vec(),
        br#"{"ID":"a","ID":"b","Home":"/h","Home":"/h"}"#.to_vec(),
        b"nul".to_vec(),
    ];
    cases.push(b"\x00".to_vec());
    for body in cases {
        for path in [
            "/GraphDriver.Get",
            "/GraphDriver.Status",
            "/GraphDriver.Exists",
            "/GraphDriver.Init",
        ] {
            let mut raw = format!(
                "POST {path} HTTP/1.1\r\nHost: \r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            raw.extend_from_slice(&body);
            c.send(&raw).unwrap();
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 500);
            assert!(
                r.err().starts_with("invalid argument: malformed request body: "),
                "{path} {:?}: {}",
                String::from_utf8_lossy(&body),
                r.err()
            );
        }
    }
    assert!(srv.fake.calls().is_empty());
}

#[test]
fn c2_c3_missing_and_wrong_types() {
    let (srv, mut c) = TestServer::connected();
    let r = c.call("/GraphDriver.Create", r#"{"Parent":"x"}"#);
    assert_eq!(r.err(), "invalid argument: missing ID");
    for (path, body) in [
        ("/GraphDriver.Get", r#"{"ID":5}"#),
        ("/GraphDriver.Get", r#"{"ID":["a"]}"#),
        ("/GraphDriver.Get", r#"{"ID":{"a":1}}"#),
        ("/GraphDriver.Get", r#"{"ID":"a","MountLabel":1}"#),
        ("/GraphDriver.Create", r#"{"ID":"a","StorageOpt":7}"#),
        ("/GraphDriver.Create", r#"{"ID":"a","StorageOpt":{"size":1}}"#),
        ("/GraphDriver.Create", r#"{"ID":"a","StorageOpt":["x"]}"#),
        ("/GraphDriver.Create", r#"{"ID":"a","Parent":true}"#),
        ("/GraphDriver.Init", r#"{"Home":"/x","Opts":"x"}"#),
        ("/GraphDriver.Init", r#"{"Home":"/x","Opts":[1]}"#),
        (
            "/GraphDriver.Init",
            r#"{"Home":"/x","UIDMaps":[{"container_id":-1,"host_id":0,"size":1}]}"#,
        ),
        (
            "/GraphDriver.Init",
            r#"{"Home":"/x","UIDMaps":[{"container_id":1e400,"host_id":0,"size":1}]}"#,
        ),
        ("/GraphDriver.Init", r#"{"Home":"/x","GIDMaps":{}}"#),
        ("/GraphDriver.Init", r#"{"Home":7}"#),
        ("/GraphDriver.Get", r#"["ID","a"]"#),
        ("/GraphDriver.Get", r#""a""#),
        ("/GraphDriver.Status", "5"),
    ] {
        let r = c.call(path, body);
        assert_eq!(r.status, 500, "{path} {body}");
        assert!(
            r.err().starts_with("invalid argument: "),
            "{path} {body}: {}",
            r.err()
        );
    }
    assert!(srv.fake.calls().is_empty(), "{:?}", srv.fake.calls());
}

#[test]
fn c4_empty_bodies() {
    let (_srv, mut c) = TestServer::connected();
    for body in ["", "{}", "null"] {
        for path in [
            "/Plugin.Activate",
            "/GraphDriver.Capabilities",
            "/GraphDriver.Status",
            "/GraphDriver.Cleanup",
        ] {
            assert_eq!(c.call(path, body).status, 200, "{path} {body:?}");
        }
        for path in ["/GraphDriver.Get", "/GraphDriver.Remove", "/GraphDriver.Init"] {
            let r = c.call(path, body);
            assert!(
                r.err().starts_with("invalid argument: missing"),
                "{path} {body:?}"
            );
        }
    }
}

#[test]
fn c5_huge_content_length_with_little_data_is_refused_at_once() {
    let (_srv, mut c) = TestServer::connected();
    let started = Instant::now();
    c.send(b"POST /GraphDriver.Get HTTP/1.1\r\nHost: \r\nContent-Length: 10000000000\r\n\r\n{\"ID\":\"a\"}")
        .unwrap();
    let r = c.read_response().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(r.err(), "invalid argument: request body too large");
    assert!(c.is_closed());
}

#[test]
fn c6_deep_nesting() {
    let (_srv, mut c) = TestServer::connected();
    for body in [
        "[".repeat(100_000),
        format!(r#"{{"ID":"a","X":{}}}"#, "[".repeat(100_000)),
        format!(r#"{{"ID":"a","X":{}{}}}"#, "[".repeat(200), "]".repeat(200)),
    ] {
        let r = c.call("/GraphDriver.Get", &body);
        assert!(
            r.err().starts_with("invalid argument: malformed request body"),
            "{}",
            r.err()
        );
    }
    // Moderate nesting in an unknown field is fine.
    let ok = format!(r#"{{"ID":"a","X":{}{}}}"#, "[".repeat(50), "]".repeat(50));
    let r = c.call("/GraphDriver.Get", &ok);
    assert_eq!(r.err(), "not found: layer a");
}

#[test]
fn c7_unknown_endpoint_wrong_method_dotdot() {
    let (srv, mut c) = TestServer::connected();
    expect_refused(
        &mut c,
        &[
            "/GraphDriver.Frobnicate",
            "/GraphDriver.",
            "/graphdriver.get",
            "/GraphDriver.Get/../GraphDriver.Remove",
            "/../GraphDriver.Get",
            "/GraphDriver.Get/",
            "/VolumeDriver.Create",
            "/",
            "*",
        ],
        r#"{"ID":"a"}"#,
        404,
        "not found: unknown endpoint \"",
    );
    for method in ["GET", "PUT", "DELETE", "OPTIONS"] {
        let raw = format!("{method} /GraphDriver.Get HTTP/1.1\r\nHost: \r\n\r\n");
        c.send(raw.as_bytes()).unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("Allow"), Some("POST"));
        assert!(r.err().starts_with("unsupported: method"), "{}", r.err());
    }
    // HEAD gets the head only.
    c.send(b"HEAD /GraphDriver.Get HTTP/1.1\r\n\r\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut c.reader, &mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 405"));
    assert!(srv.fake.calls().is_empty());
    // Still serving.
    let mut c = srv.connect();
    assert_eq!(c.call("/GraphDriver.Status", "{}").status, 200);
}

#[test]
fn c8_unknown_fields_are_ignored() {
    let (_srv, mut c) = TestServer::connected_with(&["a"]);
    let r = c.call(
        "/GraphDriver.Get",
        r#"{"ID":"a","NewField":{"x":[1,2,{"y":null}]},"Other":7}"#,
    );
    assert_eq!(r.json(), json!({"Dir": "/fake/mnt/a"}));
    let r = c.call(
        "/GraphDriver.Init",
        r#"{"Home":"/h","Opts":null,"UIDMaps":null,"GIDMaps":null,"Future":true}"#,
    );
    assert_eq!(r.json(), json!({}));
    // `null` for optional fields is "absent".
    let r = c.call(
        "/GraphDriver.Create",
        r#"{"ID":"b","Parent":null,"MountLabel":null,"StorageOpt":null}"#,
    );
    assert_eq!(r.json(), json!({}));
}

#[test]
fn c13_apply_diff_query() {
    let (srv, mut c) = TestServer::connected_with(&["a"]);
    for (q, want) in [
        ("id=..%2F..%2Fetc", "invalid argument: invalid id \"../../etc\""),
        (
            "id=..%2f..%2fetc&parent=",
            "invalid argument: invalid id \"../../etc\"",
        ),
        (
            "id=a&id=a",
            "invalid argument: query parameter \"id\" given twice",
        ),
        (
            "id=a&parent=&parent=",
            "invalid argument: query parameter \"parent\" given twice",
        ),
        ("parent=a", "invalid argument: missing ID"),
        (
            "id=a%zz",
            "invalid argument: malformed query string: bad percent escape",
        ),
        ("id=a%ff", "invalid argument: malformed query string: not UTF-8"),
        ("id=a+b", "invalid argument: invalid id \"a b\""),
    ] {
        let r = c.apply_diff(q, b"tar");
        assert_eq!(r.err(), want, "{q}");
    }
    let r = c.apply_diff(&format!("id=a&parent={}", "p".repeat(10 * 1024)), b"tar");
    assert!(
        r.err().starts_with("invalid argument: invalid id \"ppp"),
        "{}",
        r.err()
    );
    assert!(srv.fake.calls().is_empty(), "{:?}", srv.fake.calls());
    // Unknown parameters are ignored; percent-encoded valid ids are decoded.
    let r = c.apply_diff("foo=bar&id=%61&parent=", b"tar");
    assert_eq!(r.json(), json!({"Size": 3}));
    assert_eq!(srv.fake.calls(), vec!["apply a ".to_owned()]);
}

#[test]
fn head_too_large_is_refused() {
    let (_srv, mut c) = TestServer::connected();
    let raw = format!(
        "POST /GraphDriver.ApplyDiff?id={} HTTP/1.1\r\n\r\n",
        "a".repeat(10_000_000)
    );
    let mut w = Client::new(c.stream().try_clone().unwrap());
    let writer = std::thread::spawn(move || {
        let _ = w.send(raw.as_bytes());
    });
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(r.err(), "invalid argument: request head too large");
    assert!(c.is_closed());
    writer.join().unwrap();
}

#[test]
fn malformed_http_gets_400_and_close() {
    let srv = TestServer::start();
    for raw in [
        &b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GARBAGE\x00\x01\r\n\r\n",
    ] {
        let mut c = srv.connect();
        c.send(raw).unwrap();
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 400);
        assert!(
            r.err().starts_with("invalid argument: malformed HTTP request"),
            "{}",
            r.err()
        );
        assert!(c.is_closed());
    }
    let mut c = srv.connect();
    c.send(b"POST /GraphDriver.ApplyDiff?id=a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
        .unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 501);
    // Malformed chunked body to ApplyDiff: the driver sees a read error, the connection closes.
    srv.fake.add_layer("a");
    let mut c = srv.connect();
    c.apply_diff_head("id=a").unwrap();
    c.send(b"5\r\nabc\r\nzz\r\n").unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 500);
    assert!(r.err().contains("malformed chunked encoding"), "{}", r.err());
    assert!(c.is_closed());
}

/// Sends `request` whole before reading anything (as a simple client does), then reads the answer.
fn send_whole_then_read(srv: &TestServer, request: &[u8]) -> common::Response {
    let mut c = srv.connect();
    c.stream()
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    c.send(request)
        .expect("the server reads what the client still sends after refusing it");
    let r = c.read_response().expect("an answer, not a closed connection");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(c.is_closed());
    r
}

#[test]
fn oversize_requests_written_whole_before_reading_get_an_answer() {
    let srv = TestServer::start();
    let huge = "a".repeat(10_000_000);
    // A 10 MB id in the request line.
    let r = send_whole_then_read(
        &srv,
        format!(
            "POST /GraphDriver.ApplyDiff?id={huge} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 431);
    assert_eq!(r.err(), "invalid argument: request head too large");
    // 10 MB of headers.
    let r = send_whole_then_read(
        &srv,
        format!("POST /GraphDriver.Status HTTP/1.1\r\nX-Padding: {huge}\r\n\r\n").as_bytes(),
    );
    assert_eq!(r.status, 431);
    assert_eq!(r.err(), "invalid argument: request head too large");
    // A 10 MB id in a JSON body, with Content-Length or chunked.
    let body = format!(r#"{{"ID":"{huge}"}}"#);
    let r = send_whole_then_read(&srv, &dockerd_request("/GraphDriver.Get", &body));
    assert_eq!(r.status, 500);
    assert_eq!(r.err(), "invalid argument: request body too large");
    let mut chunked = b"POST /GraphDriver.Get HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in body.as_bytes().chunks(1 << 20) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = send_whole_then_read(&srv, &chunked);
    assert_eq!(r.err(), "invalid argument: request body too large");
    // A 10 MB body to an unknown endpoint, and a malformed head followed by megabytes.
    let r = send_whole_then_read(&srv, &dockerd_request("/GraphDriver.Nope", &body));
    assert_eq!(r.status, 404);
    assert!(r.err().starts_with("not found: unknown endpoint"), "{}", r.err());
    let r = send_whole_then_read(&srv, format!("GARBAGE\x01\r\n\r\n{huge}").as_bytes());
    assert_eq!(r.status, 400);
    assert!(
        r.err().starts_with("invalid argument: malformed HTTP request"),
        "{}",
        r.err()
    );
    assert!(srv.fake.calls().is_empty(), "{:?}", srv.fake.calls());
}
