//! Arbitrary bytes as the whole input of one connection: HTTP parsing, chunked decoding,
//! JSON decoding, id validation and routing, against a stateless stub driver.
#![no_main]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use lamina_docker::{
    handle_connection, CreateRequest, DiffStream, ErrorKind, FileChange, GraphDriver, InitRequest,
    PluginError, Router,
};
use libfuzzer_sys::fuzz_target;

/// Input from the fuzzer, output counted and checked.
struct Duplex<'a> {
    input: &'a [u8],
    written: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Keep only the beginning; enough to check the response framing.
        if self.written.len() < 64 {
            self.written.extend_from_slice(&buf[..buf.len().min(64)]);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Stateless stub: outcomes depend on the id only.
struct Stub;

fn check(id: &str) -> Result<(), PluginError> {
    // The router must have validated the id.
    assert!(
        lamina_docker::validate_id(id).is_ok(),
        "unvalidated id reached the driver: {id:?}"
    );
    if id.starts_with('x') {
        return Err(PluginError::not_found(format!("layer {id}")));
    }
    Ok(())
}

struct StubDiff(usize);

impl DiffStream for StubDiff {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), PluginError> {
        out.write_all(&vec![0u8; self.0 % 70_000])
            .map_err(|e| PluginError::new(ErrorKind::Io, e.to_string()))?;
        if self.0 % 3 == 0 {
            return Err(PluginError::new(ErrorKind::Io, "mid-stream failure"));
        }
        Ok(())
    }
}

impl GraphDriver for Stub {
    fn init(&self, req: InitRequest) -> Result<(), PluginError> {
        assert!(!req.home.is_empty());
        Ok(())
    }
    fn create(&self, req: CreateRequest, _rw: bool) -> Result<(), PluginError> {
        if let Some(p) = &req.parent {
            check(p)?;
        }
        check(&req.id)
    }
    fn remove(&self, id: &str) -> Result<(), PluginError> {
        check(id)
    }
    fn get(&self, id: &str, _label: &str) -> Result<PathBuf, PluginError> {
        check(id)?;
        Ok(PathBuf::from(format!("/mnt/{id}")))
    }
    fn put(&self, id: &str) -> Result<(), PluginError> {
        check(id)
    }
    fn exists(&self, id: &str) -> bool {
        check(id).is_ok()
    }
    fn status(&self) -> Vec<[String; 2]> {
        vec![["Layers".into(), "0".into()]]
    }
    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, PluginError> {
        check(id)?;
        Ok(BTreeMap::new())
    }
    fn cleanup(&self) -> Result<(), PluginError> {
        Ok(())
    }
    fn diff(&self, id: &str, parent: &str) -> Result<Box<dyn DiffStream + '_>, PluginError> {
        check(id)?;
        Ok(Box::new(StubDiff(id.len() * 7919 + parent.len())))
    }
    fn changes(&self, id: &str, _parent: &str) -> Result<Vec<FileChange>, PluginError> {
        check(id)?;
        Ok(vec![FileChange {
            path: "/a".into(),
            kind: 1,
        }])
    }
    fn apply_diff(&self, id: &str, parent: &str, body: &mut dyn Read) -> Result<u64, PluginError> {
        check(id)?;
        if !parent.is_empty() {
            check(parent)?;
        }
        io::copy(body, &mut io::sink())
            .map_err(|e| PluginError::new(ErrorKind::InvalidArchive, e.to_string()))
    }
    fn diff_size(&self, id: &str, _parent: &str) -> Result<u64, PluginError> {
        check(id)?;
        Ok(1)
    }
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| Router::new().with_graph_driver(Arc::new(Stub)))
}

fuzz_target!(|data: &[u8]| {
    let mut conn = Duplex {
        input: data,
        written: Vec::new(),
    };
    handle_connection(&mut conn, router());
    if !conn.written.is_empty() {
        assert!(
            conn.written.starts_with(b"HTTP/1.1 "),
            "{:?}",
            String::from_utf8_lossy(&conn.written)
        );
    }
});
