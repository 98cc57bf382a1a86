//! Maps `POST /<Subsystem>.<Method>` to driver calls: decodes and validates the request,
//! calls the driver, encodes the reply, and reports each counted call to the [`Observer`].

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lamina_http::{parse_query, read_capped, Body, RequestHead, Response, StreamBody, StreamError};

use crate::error::{ErrorKind, PluginError};
use crate::graphdriver::{CreateRequest, DiffStream, GraphDriver, InitRequest};
use crate::volumedriver::{self as vol, VolumeDriver, VolumeInfo, VolumeRequest};
use crate::wire::{self, GraphDriverRequest, InitWireRequest};

/// Longest accepted layer id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Default cap on a JSON request body.
pub const DEFAULT_JSON_BODY_LIMIT: usize = 1024 * 1024;
/// Content type of JSON replies.
pub const JSON_CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// Content type of streamed tar replies.
pub const TAR_CONTENT_TYPE: &str = "application/x-tar";

/// Told of every counted call once it is over: the endpoint (`GraphDriver.Get`), whether it
/// succeeded, and how long it took (a Diff: until the last byte of its stream was written).
pub type Observer = Arc<dyn Fn(&'static str, bool, Duration) + Send + Sync>;

/// The endpoints reported to an [`Observer`]. Cheap calls that cannot fail (`Exists`, `Status`,
/// `Capabilities`, `Plugin.Activate`) are not.
pub const OBSERVED_CALLS: &[&str] = &[
    "GraphDriver.Init",
    "GraphDriver.Create",
    "GraphDriver.CreateReadWrite",
    "GraphDriver.Remove",
    "GraphDriver.Get",
    "GraphDriver.Put",
    "GraphDriver.GetMetadata",
    "GraphDriver.Cleanup",
    "GraphDriver.Diff",
    "GraphDriver.Changes",
    "GraphDriver.ApplyDiff",
    "GraphDriver.DiffSize",
    "VolumeDriver.Create",
    "VolumeDriver.Remove",
    "VolumeDriver.Mount",
    "VolumeDriver.Unmount",
    "VolumeDriver.Path",
    "VolumeDriver.Get",
    "VolumeDriver.List",
];

/// Quotes `s` for messages and logs: escaped (control characters, quotes, non-ASCII as
/// `\u{..}`) and truncated to `max_chars` characters.
pub fn quote(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars * 2) + 2);
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            out.push_str("\"...");
            return out;
        }
        let _ = write!(out, "{}", c.escape_default());
    }
    out.push('"');
    out
}

/// Checks a layer id before it reaches a driver: non-empty, at most [`MAX_ID_LEN`] bytes,
/// only `[A-Za-z0-9_.-]`, first character alphanumeric. This rules out `.`, `..`, `-rf`, `/`,
/// NUL, whitespace and any non-ASCII.
pub fn validate_id(id: &str) -> Result<(), PluginError> {
    let b = id.as_bytes();
    if b.len() > MAX_ID_LEN {
        return Err(PluginError::invalid(format!(
            "invalid id {} ({} bytes, at most {MAX_ID_LEN})",
            quote(id, 64),
            b.len()
        )));
    }
    let ok = !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PluginError::invalid(format!("invalid id {}", quote(id, 64))))
    }
}

/// A required id: absent or empty is `missing ID`.
fn required_id(id: Option<String>) -> Result<String, PluginError> {
    match id {
        None => Err(PluginError::invalid("missing ID")),
        Some(s) if s.is_empty() => Err(PluginError::invalid("missing ID")),
        Some(s) => {
            validate_id(&s)?;
            Ok(s)
        }
    }
}

/// An optional parent: absent or empty is "none", anything else must be a valid id.
fn optional_parent(parent: Option<String>) -> Result<String, PluginError> {
    match parent {
        None => Ok(String::new()),
        Some(s) if s.is_empty() => Ok(s),
        Some(s) => {
            validate_id(&s)?;
            Ok(s)
        }
    }
}

/// The GraphDriver methods, by path suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GraphMethod {
    Init,
    Create,
    CreateReadWrite,
    Remove,
    Get,
    Put,
    Exists,
    Status,
    GetMetadata,
    Cleanup,
    Diff,
    Changes,
    ApplyDiff,
    DiffSize,
    Capabilities,
}

impl GraphMethod {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "Init" => Self::Init,
            "Create" => Self::Create,
            "CreateReadWrite" => Self::CreateReadWrite,
            "Remove" => Self::Remove,
            "Get" => Self::Get,
            "Put" => Self::Put,
            "Exists" => Self::Exists,
            "Status" => Self::Status,
            "GetMetadata" => Self::GetMetadata,
            "Cleanup" => Self::Cleanup,
            "Diff" => Self::Diff,
            "Changes" => Self::Changes,
            "ApplyDiff" => Self::ApplyDiff,
            "DiffSize" => Self::DiffSize,
            "Capabilities" => Self::Capabilities,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Init => "GraphDriver.Init",
            Self::Create => "GraphDriver.Create",
            Self::CreateReadWrite => "GraphDriver.CreateReadWrite",
            Self::Remove => "GraphDriver.Remove",
            Self::Get => "GraphDriver.Get",
            Self::Put => "GraphDriver.Put",
            Self::Exists => "GraphDriver.Exists",
            Self::Status => "GraphDriver.Status",
            Self::GetMetadata => "GraphDriver.GetMetadata",
            Self::Cleanup => "GraphDriver.Cleanup",
            Self::Diff => "GraphDriver.Diff",
            Self::Changes => "GraphDriver.Changes",
            Self::ApplyDiff => "GraphDriver.ApplyDiff",
            Self::DiffSize => "GraphDriver.DiffSize",
            Self::Capabilities => "GraphDriver.Capabilities",
        }
    }
}

/// The VolumeDriver methods, by path suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumeMethod {
    Create,
    Remove,
    Mount,
    Path,
    Unmount,
    Get,
    List,
    Capabilities,
}

impl VolumeMethod {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "Create" => Self::Create,
            "Remove" => Self::Remove,
            "Mount" => Self::Mount,
            "Path" => Self::Path,
            "Unmount" => Self::Unmount,
            "Get" => Self::Get,
            "List" => Self::List,
            "Capabilities" => Self::Capabilities,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Create => "VolumeDriver.Create",
            Self::Remove => "VolumeDriver.Remove",
            Self::Mount => "VolumeDriver.Mount",
            Self::Path => "VolumeDriver.Path",
            Self::Unmount => "VolumeDriver.Unmount",
            Self::Get => "VolumeDriver.Get",
            Self::List => "VolumeDriver.List",
            Self::Capabilities => "VolumeDriver.Capabilities",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Activate,
    Graph(GraphMethod),
    Volume(VolumeMethod),
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Activate => "Plugin.Activate",
            Endpoint::Graph(m) => m.name(),
            Endpoint::Volume(m) => m.name(),
        }
    }

    /// Whether calls of this endpoint are reported to the observer.
    fn observed(self) -> bool {
        OBSERVED_CALLS.contains(&self.name())
    }
}

/// What a handler answers.
enum Payload<'r> {
    /// A complete JSON body.
    Json(Vec<u8>),
    /// A tar stream, sent chunked.
    Tar(Box<dyn DiffStream + 'r>),
}

fn json_response(status: u16, body: Vec<u8>) -> Response<'static> {
    Response::full(status, Some(JSON_CONTENT_TYPE), body)
}

/// A Diff stream as a response body.
struct TarBody<'r>(Box<dyn DiffStream + 'r>);

impl StreamBody for TarBody<'_> {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), StreamError> {
        self.0.write_to(out).map_err(|e| Box::new(e) as StreamError)
    }
}

/// A Diff stream reported to the observer once it was written (or dropped unwritten: a failure).
struct ObservedDiff<'r> {
    inner: Option<Box<dyn DiffStream + 'r>>,
    observer: &'r Observer,
    name: &'static str,
    started: Instant,
}

impl DiffStream for ObservedDiff<'_> {
    fn write_to(mut self: Box<Self>, out: &mut dyn Write) -> Result<(), PluginError> {
        let inner = self.inner.take().expect("a Diff stream is written once");
        let r = inner.write_to(out);
        (self.observer)(self.name, r.is_ok(), self.started.elapsed());
        r
    }
}

impl Drop for ObservedDiff<'_> {
    fn drop(&mut self) {
        if self.inner.is_some() {
            (self.observer)(self.name, false, self.started.elapsed());
        }
    }
}

/// Per-request state shared by the handlers.
struct Call<'b, 'c> {
    body: &'b mut Body<'c>,
    json_limit: usize,
    close: bool,
    /// The request's id or volume name, once read.
    id: Option<String>,
}

impl Call<'_, '_> {
    /// Reads the whole body (capped) and decodes it.
    fn json<T: serde::de::DeserializeOwned + Default>(&mut self) -> Result<T, PluginError> {
        if self
            .body
            .remaining_length()
            .is_some_and(|n| n > self.json_limit as u64)
        {
            // Refuse without reading: the connection is closed after the reply.
            self.close = true;
            return Err(PluginError::invalid("request body too large"));
        }
        match read_capped(self.body, self.json_limit) {
            Ok(bytes) => wire::decode_request(&bytes),
            Err(None) => {
                self.close = true;
                Err(PluginError::invalid("request body too large"))
            }
            Err(Some(e)) => {
                self.close = true;
                Err(PluginError::invalid(format!("malformed request body: {e}")))
            }
        }
    }

    /// Keeps the request's id (or volume name) for its log lines; quoted only when one is written.
    fn note_id(&mut self, id: &str) {
        self.id = Some(id.to_owned());
    }

    /// The noted id as log lines show it: quoted, empty when none was read.
    fn id(&self) -> Quoted<'_> {
        Quoted(self.id.as_deref())
    }
}

/// A string shown as [`quote`] gives it (at most 80 characters), escaped only when formatted, that is when a
/// log line is written; nothing for `None`.
struct Quoted<'a>(Option<&'a str>);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(s) => f.write_str(&quote(s, 80)),
            None => Ok(()),
        }
    }
}

/// Routes plugin requests to the drivers it was built with.
///
/// ```no_run
/// # use std::sync::Arc;
/// # fn f(driver: Arc<dyn lamina_docker::GraphDriver>) {
/// let router = lamina_docker::Router::new().with_graph_driver(driver);
/// # }
/// ```
pub struct Router {
    graph: Option<Arc<dyn GraphDriver>>,
    volume: Option<Arc<dyn VolumeDriver>>,
    json_limit: usize,
    observer: Option<Observer>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("implements", &self.implements())
            .field("json_limit", &self.json_limit)
            .finish()
    }
}

impl Router {
    /// A router that implements nothing yet (only `/Plugin.Activate`).
    pub fn new() -> Self {
        Router {
            graph: None,
            volume: None,
            json_limit: DEFAULT_JSON_BODY_LIMIT,
            observer: None,
        }
    }

    /// Reports every call of [`OBSERVED_CALLS`] to `observer` (metrics).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Serves `/GraphDriver.*` with `driver`.
    pub fn with_graph_driver(mut self, driver: Arc<dyn GraphDriver>) -> Self {
        self.graph = Some(driver);
        self
    }

    /// Serves `/VolumeDriver.*` with `driver`.
    pub fn with_volume_driver(mut self, driver: Arc<dyn VolumeDriver>) -> Self {
        self.volume = Some(driver);
        self
    }

    /// Changes the cap on JSON request bodies (default 1 MiB).
    pub fn with_json_body_limit(mut self, limit: usize) -> Self {
        self.json_limit = limit;
        self
    }

    /// The subsystems listed by `/Plugin.Activate`.
    pub fn implements(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.graph.is_some() {
            v.push("GraphDriver");
        }
        if self.volume.is_some() {
            v.push("VolumeDriver");
        }
        v
    }

    fn lookup(&self, path: &str) -> Option<Endpoint> {
        if path == "/Plugin.Activate" {
            return Some(Endpoint::Activate);
        }
        if let Some(m) = path.strip_prefix("/GraphDriver.") {
            if self.graph.is_some() {
                return GraphMethod::from_name(m).map(Endpoint::Graph);
            }
        }
        if let Some(m) = path.strip_prefix("/VolumeDriver.") {
            if self.volume.is_some() {
                return VolumeMethod::from_name(m).map(Endpoint::Volume);
            }
        }
        None
    }

    /// Handles one request whose head was read; the body is read (or not) from `body`.
    pub fn handle<'r>(&'r self, head: &RequestHead, body: &mut Body<'_>) -> Response<'r> {
        let path = head.path();
        let Some(ep) = self.lookup(path) else {
            let err = PluginError::not_found(format!("unknown endpoint {}", quote(path, 100)));
            tracing::warn!(http_method = %quote(&head.method, 16), path = %quote(path, 100), "unknown endpoint");
            return json_response(404, wire::encode_error(&err));
        };
        if head.method != "POST" {
            let err = PluginError::new(
                ErrorKind::Unsupported,
                format!(
                    "method {} not allowed on {}, use POST",
                    quote(&head.method, 16),
                    ep.name()
                ),
            );
            tracing::warn!(method = ep.name(), http_method = %quote(&head.method, 16), "method not allowed");
            return json_response(405, wire::encode_error(&err)).header("Allow", "POST");
        }
        let observer = self.observer.as_ref().filter(|_| ep.observed());
        let started = observer.map(|_| Instant::now());
        let mut call = Call {
            body,
            json_limit: self.json_limit,
            close: false,
            id: None,
        };
        let result = match ep {
            Endpoint::Activate => self.activate(&mut call),
            Endpoint::Graph(m) => self.graph_call(m, head, &mut call),
            Endpoint::Volume(m) => self.volume_call(m, &mut call),
        };
        let observe = |ok: bool| {
            if let (Some(o), Some(t0)) = (observer, started) {
                o(ep.name(), ok, t0.elapsed());
            }
        };
        let mut resp = match result {
            Ok(Payload::Json(bytes)) => {
                observe(true);
                json_response(200, bytes)
            }
            Ok(Payload::Tar(stream)) => {
                let stream = match (observer, started) {
                    (Some(observer), Some(started)) => Box::new(ObservedDiff {
                        inner: Some(stream),
                        observer,
                        name: ep.name(),
                        started,
                    }),
                    _ => stream,
                };
                Response::stream(TAR_CONTENT_TYPE, Box::new(TarBody(stream)))
            }
            Err(e) => {
                observe(false);
                tracing::warn!(method = ep.name(), id = %call.id(), error = %e, "request failed");
                json_response(500, wire::encode_error(&e))
            }
        };
        resp.close = call.close;
        resp
    }

    fn activate(&self, call: &mut Call<'_, '_>) -> Result<Payload<'static>, PluginError> {
        tracing::debug!(method = "Plugin.Activate", "call");
        // dockerd sends an empty body; whatever is sent is read (capped) and ignored.
        let _ = read_capped(call.body, call.json_limit).map_err(|_| call.close = true);
        Ok(Payload::Json(wire::encode(&wire::ActivateResponse {
            implements: self.implements(),
        })))
    }

    /// Reads a GraphDriver request body, notes its id on the call and logs the call (with the parent for the
    /// methods that take one).
    fn graph_request(
        call: &mut Call<'_, '_>,
        m: GraphMethod,
        with_parent: bool,
    ) -> Result<GraphDriverRequest, PluginError> {
        let r: GraphDriverRequest = call.json()?;
        if let Some(id) = &r.id {
            call.note_id(id);
        }
        if with_parent {
            tracing::debug!(method = m.name(), id = %call.id(), parent = %quote(r.parent.as_deref().unwrap_or(""), 80), "call");
        } else {
            tracing::debug!(method = m.name(), id = %call.id(), "call");
        }
        Ok(r)
    }

    fn graph_call<'r>(
        &'r self,
        m: GraphMethod,
        head: &RequestHead,
        call: &mut Call<'_, '_>,
    ) -> Result<Payload<'r>, PluginError> {
        let Some(g) = self.graph.as_deref() else {
            return Err(PluginError::not_found(format!(
                "unknown endpoint {}",
                quote(m.name(), 64)
            )));
        };
        match m {
            GraphMethod::Init => {
                let r: InitWireRequest = call.json()?;
                tracing::debug!(method = m.name(), home = %quote(r.home.as_deref().unwrap_or(""), 200), "call");
                let home = r
                    .home
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| PluginError::invalid("missing Home"))?;
                g.init(InitRequest {
                    home,
                    options: r.opts.unwrap_or_default(),
                    uid_maps: r.uid_maps.unwrap_or_default(),
                    gid_maps: r.gid_maps.unwrap_or_default(),
                })?;
                json(&wire::EmptyResponse {})
            }
            GraphMethod::Create | GraphMethod::CreateReadWrite => {
                let r = Self::graph_request(call, m, true)?;
                let id = required_id(r.id)?;
                let parent = optional_parent(r.parent)?;
                if parent == id {
                    return Err(PluginError::invalid(format!(
                        "parent of {} is itself",
                        quote(&id, 80)
                    )));
                }
                let req = CreateRequest {
                    id,
                    parent: (!parent.is_empty()).then_some(parent),
                    mount_label: r.mount_label.unwrap_or_default(),
                    storage_opt: r.storage_opt.unwrap_or_default(),
                };
                g.create(req, m == GraphMethod::CreateReadWrite)?;
                json(&wire::EmptyResponse {})
            }
            GraphMethod::Remove | GraphMethod::Put | GraphMethod::Get | GraphMethod::GetMetadata => {
                let r = Self::graph_request(call, m, false)?;
                let id = required_id(r.id)?;
                match m {
                    GraphMethod::Remove => {
                        g.remove(&id)?;
                        json(&wire::EmptyResponse {})
                    }
                    GraphMethod::Put => {
                        g.put(&id)?;
                        json(&wire::EmptyResponse {})
                    }
                    GraphMethod::Get => {
                        let dir = g.get(&id, r.mount_label.as_deref().unwrap_or(""))?;
                        let dir = dir.to_str().ok_or_else(|| {
                            PluginError::new(
                                ErrorKind::Io,
                                format!("mount path of {} is not UTF-8", quote(&id, 80)),
                            )
                        })?;
                        json(&wire::DirResponse { dir })
                    }
                    _ => {
                        let metadata = g.get_metadata(&id)?;
                        json(&wire::MetadataResponse { metadata })
                    }
                }
            }
            GraphMethod::Exists => {
                let r = Self::graph_request(call, m, false)?;
                let exists = match required_id(r.id) {
                    Ok(id) => g.exists(&id),
                    Err(_) => false,
                };
                json(&wire::ExistsResponse { exists })
            }
            GraphMethod::Status => {
                let _: GraphDriverRequest = call.json()?;
                tracing::debug!(method = m.name(), "call");
                json(&wire::StatusResponse { status: g.status() })
            }
            GraphMethod::Cleanup => {
                let _: GraphDriverRequest = call.json()?;
                tracing::debug!(method = m.name(), "call");
                g.cleanup()?;
                json(&wire::EmptyResponse {})
            }
            GraphMethod::Capabilities => {
                let _: GraphDriverRequest = call.json()?;
                tracing::debug!(method = m.name(), "call");
                json(&wire::CapabilitiesResponse {
                    capabilities: wire::Capabilities {
                        reproduces_exact_diffs: g.reproduces_exact_diffs(),
                    },
                })
            }
            GraphMethod::Diff | GraphMethod::Changes | GraphMethod::DiffSize => {
                let r = Self::graph_request(call, m, true)?;
                let id = required_id(r.id)?;
                let parent = optional_parent(r.parent)?;
                match m {
                    GraphMethod::Diff => Ok(Payload::Tar(g.diff(&id, &parent)?)),
                    GraphMethod::Changes => {
                        let changes = g.changes(&id, &parent)?;
                        let changes = changes
                            .iter()
                            .map(|c| wire::ChangeWire {
                                path: &c.path,
                                kind: c.kind,
                            })
                            .collect();
                        json(&wire::ChangesResponse { changes })
                    }
                    _ => json(&wire::SizeResponse {
                        size: g.diff_size(&id, &parent)?,
                    }),
                }
            }
            GraphMethod::ApplyDiff => {
                let mut id = None;
                let mut parent = None;
                let query = parse_query(head.query().unwrap_or(""))
                    .map_err(|e| PluginError::invalid(e.to_string()))?;
                for (k, v) in query {
                    let slot = match k.as_str() {
                        "id" => &mut id,
                        "parent" => &mut parent,
                        _ => continue,
                    };
                    if slot.is_some() {
                        return Err(PluginError::invalid(format!("query parameter {k:?} given twice")));
                    }
                    *slot = Some(v);
                }
                if let Some(id) = &id {
                    call.note_id(id);
                }
                tracing::debug!(method = m.name(), id = %call.id(), parent = %quote(parent.as_deref().unwrap_or(""), 80), "call");
                let id = required_id(id)?;
                let parent = optional_parent(parent)?;
                call.body.set_streaming();
                let size = g.apply_diff(&id, &parent, call.body)?;
                json(&wire::SizeResponse { size })
            }
        }
    }
}

impl Router {
    fn volume_call(&self, m: VolumeMethod, call: &mut Call<'_, '_>) -> Result<Payload<'static>, PluginError> {
        let Some(v) = self.volume.as_deref() else {
            return Err(PluginError::not_found(format!(
                "unknown endpoint {}",
                quote(m.name(), 64)
            )));
        };
        let r: VolumeRequest = call.json()?;
        if let Some(name) = &r.name {
            call.note_id(name);
        }
        tracing::debug!(method = m.name(), name = %call.id(), mount_id = %quote(r.id.as_deref().unwrap_or(""), 80), "call");
        match m {
            VolumeMethod::List => {
                let vols = v.list()?;
                json(&vol::ListResponse {
                    volumes: vols.iter().map(|i| volume_wire(i, false)).collect(),
                })
            }
            VolumeMethod::Capabilities => json(&vol::VolumeCapabilitiesResponse {
                capabilities: vol::VolumeCapabilities {
                    scope: v.scope().as_str(),
                },
            }),
            _ => {
                let name = r.name.ok_or_else(|| PluginError::invalid("missing Name"))?;
                match m {
                    VolumeMethod::Create => {
                        v.create(&name, &r.opts.unwrap_or_default())?;
                        json(&wire::EmptyResponse {})
                    }
                    VolumeMethod::Remove => {
                        v.remove(&name)?;
                        json(&wire::EmptyResponse {})
                    }
                    VolumeMethod::Mount | VolumeMethod::Unmount => {
                        let id = required_id(r.id)?;
                        if m == VolumeMethod::Unmount {
                            v.unmount(&name, &id)?;
                            return json(&wire::EmptyResponse {});
                        }
                        let mp = v.mount(&name, &id)?;
                        json(&vol::MountpointResponse {
                            mountpoint: path_str(&name, &mp)?,
                        })
                    }
                    VolumeMethod::Path => {
                        let mp = v.path(&name)?;
                        let s = match &mp {
                            Some(p) => path_str(&name, p)?,
                            None => "",
                        };
                        json(&vol::MountpointResponse { mountpoint: s })
                    }
                    _ => {
                        let info = v.get(&name)?;
                        json(&vol::GetResponse {
                            volume: volume_wire(&info, true),
                        })
                    }
                }
            }
        }
    }
}

fn path_str<'p>(name: &str, p: &'p std::path::Path) -> Result<&'p str, PluginError> {
    p.to_str().ok_or_else(|| {
        PluginError::new(
            ErrorKind::Io,
            format!("mountpoint of volume {} is not UTF-8", quote(name, 80)),
        )
    })
}

fn volume_wire(i: &VolumeInfo, with_status: bool) -> vol::VolumeWire<'_> {
    vol::VolumeWire {
        name: &i.name,
        mountpoint: i.mountpoint.as_deref().and_then(|p| p.to_str()).unwrap_or(""),
        created_at: i.created_at.as_deref(),
        status: (with_status && !i.status.is_empty()).then_some(&i.status),
    }
}

/// A JSON success payload.
fn json<T: serde::Serialize>(value: &T) -> Result<Payload<'static>, PluginError> {
    Ok(Payload::Json(wire::encode(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "0", "abc-init", "A.b_c-d", &"f".repeat(128)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        let long = "f".repeat(129);
        let more = ["", "_x", "ünï", "a b", &long];
        for bad in lamina_testkit::BAD_IDS.iter().chain(&more) {
            let e = validate_id(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(
                e.to_string().starts_with("invalid argument: invalid id \""),
                "{e}"
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\n\0", 10), r#""a\"b\n\u{0}""#);
        assert_eq!(quote("abcdef", 3), r#""abc"..."#);
        assert_eq!(quote("\u{202e}x", 10), r#""\u{202e}x""#);
        let e = validate_id(&"x".repeat(10_000_000)).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }
}
