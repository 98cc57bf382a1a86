//! The server over real sockets with a small handler: TCP and unix listeners, HTTP/1.0 answers,
//! close-delimited and chunked streams, refusals, shutdown.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lamina_http::{
    read_capped, Body, Handler, Refusal, RequestHead, Response, ServerConfig, ShutdownHandle, StreamBody,
    StreamError,
};

/// `/lines` streams three lines (close-delimited), `/old` answers as HTTP/1.0, `/echo` sends the
/// body back; anything else is 404.
struct Test;

struct Lines;

impl StreamBody for Lines {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), StreamError> {
        for i in 0..3 {
            writeln!(out, "line {i}")?;
            out.flush()?;
        }
        Ok(())
    }
}

impl Handler for Test {
    fn handle<'h>(&'h self, head: &RequestHead, body: &mut Body<'_>) -> Response<'h> {
        match head.path() {
            "/lines" => Response::stream("text/plain", Box::new(Lines)).closing(),
            "/chunks" => Response::stream("text/plain", Box::new(Lines)),
            "/old" => Response::full(200, Some("text/plain"), b"old\n".to_vec()).http10(),
            "/echo" => match read_capped(body, 1024) {
                Ok(b) => Response::full(200, None, b),
                Err(_) => Response::full(400, None, b"too large\n".to_vec()).closing(),
            },
            _ => Response::full(404, None, Vec::new()),
        }
    }

    fn refuse(&self, r: &Refusal) -> Response<'static> {
        Response::full(
            r.status,
            Some("text/plain"),
            format!("{}\n", r.message).into_bytes(),
        )
    }
}

fn exchange(s: &mut (impl Read + Write), request: &[u8]) -> String {
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn tcp_http10_streams_refusals_and_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = ShutdownHandle::new();
    let sd = shutdown.clone();
    let server = thread::spawn(move || {
        let cfg = ServerConfig {
            name: "test",
            ..ServerConfig::default()
        };
        lamina_http::serve_with_config(listener, Arc::new(Test), &sd, cfg)
    });
    let connect = || {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    assert_eq!(
        exchange(&mut connect(), b"GET /old HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\nold\n"
    );
    assert_eq!(
        exchange(&mut connect(), b"HEAD /old HTTP/1.0\r\n\r\n"),
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        exchange(&mut connect(), b"POST /lines HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nline 0\nline 1\nline 2\n"
    );
    assert_eq!(
        exchange(
            &mut connect(),
            b"POST /chunks HTTP/1.1\r\n\r\nPOST /echo HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        ),
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nline 0\n\r\n7\r\nline 1\n\r\n7\r\nline 2\n\r\n0\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    );
    // Refusals are answered, even to a client that sends megabytes first.
    let mut big = b"GET /".to_vec();
    big.extend(std::iter::repeat_n(b'a', 5_000_000));
    big.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let answer = exchange(&mut connect(), &big);
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\nrequest head too large\n"), "{answer}");
    let mut big = b"POST /echo HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'a', 5_000_000));
    let answer = exchange(&mut connect(), &big);
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    // Shutdown wakes the accept loop at once and closes idle connections.
    let idle = connect();
    let t = Instant::now();
    shutdown.shutdown();
    server.join().unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let mut b = [0u8; 1];
    assert_eq!((&idle).read(&mut b).unwrap_or(0), 0);
}

#[test]
fn unix_socket_with_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s/test.sock");
    let listener = lamina_http::bind_socket_with_mode(&path, 0o600).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let shutdown = ShutdownHandle::new();
    let sd = shutdown.clone();
    let server = thread::spawn(move || lamina_http::serve(listener, Arc::new(Test), &sd));
    let mut s = UnixStream::connect(&path).unwrap();
    assert_eq!(
        exchange(&mut s, b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n"),
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    shutdown.shutdown();
    server.join().unwrap().unwrap();
}
