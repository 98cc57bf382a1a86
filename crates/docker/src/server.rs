//! The blocking server: accept loop, one thread per connection, keep-alive, timeouts,
//! connection cap, graceful shutdown, and socket binding.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::PluginError;
use crate::http::{
    self, Body, BodySource, ChunkedWriter, Conn, Deadline, Framing, HeadError, HeadLimits, NoTimeouts,
    Transport,
};
use crate::router::{Payload, Router};
use crate::wire;

/// Limits and timeouts of the server. The defaults suit dockerd.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once. When full, the connection that has waited longest for a
    /// request head, or for the rest of a small (`Content-Length`) request body, is closed to make
    /// room; if every connection is busy, new ones wait.
    pub max_connections: usize,
    /// Cap on a request head (request line + headers), bytes.
    pub max_head: usize,
    /// Cap on the number of header lines.
    pub max_headers: usize,
    /// How long a kept-alive connection may stay silent between requests.
    pub idle_timeout: Duration,
    /// How long a request head may take to arrive once its first byte came.
    pub head_timeout: Duration,
    /// How long a JSON request body may take to arrive.
    pub body_timeout: Duration,
    /// How long a streamed request body (ApplyDiff) may go without a single byte.
    pub stream_timeout: Duration,
    /// How long one write of a response may block (a client that does not read).
    pub write_timeout: Duration,
    /// Unread request body bytes discarded to keep a connection alive; beyond that it is closed.
    pub drain_limit: u64,
    /// How long [`serve`] waits for in-flight requests after shutdown was requested.
    pub grace_period: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_head: http::DEFAULT_MAX_HEAD,
            max_headers: http::DEFAULT_MAX_HEADERS,
            idle_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(300),
            drain_limit: 64 * 1024,
            grace_period: Duration::from_secs(10),
        }
    }
}

/// Asks [`serve`] to stop. Cheap to clone; usable from any thread.
///
/// Either call [`ShutdownHandle::shutdown`], or hand [`ShutdownHandle::flag`] to something that
/// only sets a flag (e.g. `signal_hook::flag::register`): the server notices a set flag within
/// about 50 ms.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    inner: Arc<ShutdownInner>,
}

#[derive(Debug)]
struct ShutdownInner {
    flag: Arc<AtomicBool>,
    /// The listening socket of a running [`serve`], as a stream so that `shutdown(2)` can be
    /// called on it: on Linux that makes a blocked `accept(2)` return at once.
    waker: Mutex<Option<UnixStream>>,
}

impl Default for ShutdownHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownHandle {
    /// A handle with a fresh flag.
    pub fn new() -> Self {
        Self::from_flag(Arc::new(AtomicBool::new(false)))
    }

    /// A handle observing an existing flag (setting it to `true` requests shutdown).
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        ShutdownHandle {
            inner: Arc::new(ShutdownInner {
                flag,
                waker: Mutex::new(None),
            }),
        }
    }

    /// The flag; storing `true` requests shutdown.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.inner.flag)
    }

    /// Requests shutdown and wakes the accept loop now.
    pub fn shutdown(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Same as [`ShutdownHandle::shutdown`].
    pub fn trigger(&self) {
        self.shutdown();
    }

    /// Whether shutdown was requested.
    pub fn is_shutdown(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    fn wake(&self) {
        if let Some(s) = lock(&self.inner.waker).as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn set_waker(&self, w: Option<UnixStream>) {
        *lock(&self.inner.waker) = w;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Live connections: their state, and a clone of each socket so they can be closed from the
/// accept loop (to make room, or at shutdown).
#[derive(Default)]
struct Registry {
    state: Mutex<RegState>,
    changed: Condvar,
}

#[derive(Default)]
struct RegState {
    next_id: u64,
    conns: HashMap<u64, Slot>,
}

struct Slot {
    stream: UnixStream,
    /// `Some` while waiting for a request head.
    idle_since: Option<Instant>,
    /// `Some` while blocked waiting for bytes of a `Content-Length` request body: a client trickling
    /// its body must not hold a slot that a valid request needs.
    body_wait_since: Option<Instant>,
    /// Closed from outside: the connection must not start another request.
    evicted: bool,
}

impl Registry {
    fn register(&self, stream: UnixStream) -> u64 {
        let mut st = lock(&self.state);
        st.next_id += 1;
        let id = st.next_id;
        st.conns.insert(
            id,
            Slot {
                stream,
                idle_since: None,
                body_wait_since: None,
                evicted: false,
            },
        );
        id
    }

    fn remove(&self, id: u64) {
        lock(&self.state).conns.remove(&id);
        self.changed.notify_all();
    }

    fn close_slot(slot: &mut Slot) {
        slot.evicted = true;
        let _ = slot.stream.shutdown(Shutdown::Both);
    }

    /// Waits until there is room for one more connection, closing idle ones if needed.
    /// Returns `false` if shutdown was requested meanwhile.
    fn make_room(&self, max: usize, flag: &AtomicBool) -> bool {
        let mut st = lock(&self.state);
        loop {
            if flag.load(Ordering::SeqCst) {
                return false;
            }
            let live = st.conns.len();
            if live < max {
                return true;
            }
            let closing = st.conns.values().filter(|s| s.evicted).count();
            if live - closing >= max {
                let victim = st
                    .conns
                    .iter_mut()
                    .filter_map(|(id, s)| {
                        let since = s.idle_since.or(s.body_wait_since)?;
                        (!s.evicted).then_some((since, *id, s))
                    })
                    .min_by_key(|(since, _, _)| *since)
                    .map(|(_, id, s)| (id, s));
                if let Some((id, slot)) = victim {
                    tracing::debug!(
                        conn = id,
                        "connection limit reached, closing the connection waiting longest for a request"
                    );
                    Self::close_slot(slot);
                }
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Closes every connection that is waiting for a request head.
    fn close_idle(&self) {
        let mut st = lock(&self.state);
        for slot in st
            .conns
            .values_mut()
            .filter(|s| s.idle_since.is_some() && !s.evicted)
        {
            Self::close_slot(slot);
        }
    }

    fn close_all(&self) {
        let mut st = lock(&self.state);
        for slot in st.conns.values_mut() {
            Self::close_slot(slot);
        }
    }

    /// Waits until no connection is left, or `until`. Returns how many are left.
    fn wait_empty(&self, until: Instant) -> usize {
        let mut st = lock(&self.state);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if st.conns.is_empty() || left.is_zero() {
                return st.conns.len();
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Hooks a connection calls between requests.
trait ConnHooks {
    /// About to wait for the next request head. `false`: stop instead.
    fn begin_idle(&self) -> bool;
    /// A request head arrived. `false`: the connection was closed from outside; drop the request.
    fn begin_busy(&self) -> bool;
    /// Whether the server is shutting down (reply with `Connection: close`).
    fn stopping(&self) -> bool;
    /// Blocked (`true`) or no longer blocked (`false`) waiting for bytes of a small request body.
    fn body_wait(&self, _waiting: bool) {}
}

struct NoHooks;

impl ConnHooks for NoHooks {
    fn begin_idle(&self) -> bool {
        true
    }
    fn begin_busy(&self) -> bool {
        true
    }
    fn stopping(&self) -> bool {
        false
    }
}

struct RegistryHooks<'a> {
    reg: &'a Registry,
    id: u64,
    flag: &'a AtomicBool,
}

impl ConnHooks for RegistryHooks<'_> {
    fn begin_idle(&self) -> bool {
        let mut st = lock(&self.reg.state);
        // Checked under the lock that `close_idle` takes, so a connection cannot slip into the
        // idle state after the shutdown sweep.
        if self.flag.load(Ordering::SeqCst) {
            return false;
        }
        match st.conns.get_mut(&self.id) {
            Some(slot) if !slot.evicted => {
                slot.idle_since = Some(Instant::now());
                true
            }
            _ => false,
        }
    }

    fn begin_busy(&self) -> bool {
        let mut st = lock(&self.reg.state);
        match st.conns.get_mut(&self.id) {
            Some(slot) if !slot.evicted => {
                slot.idle_since = None;
                true
            }
            _ => false,
        }
    }

    fn stopping(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn body_wait(&self, waiting: bool) {
        let mut st = lock(&self.reg.state);
        if let Some(slot) = st.conns.get_mut(&self.id) {
            slot.body_wait_since = waiting.then(Instant::now);
        }
    }
}

/// A body source that reports, through the hooks, when it blocks waiting for the client.
struct WatchedSource<'a, T: Transport> {
    conn: &'a mut Conn<T>,
    hooks: &'a dyn ConnHooks,
}

impl<T: Transport> WatchedSource<'_, T> {
    fn waiting<R>(&mut self, f: impl FnOnce(&mut Conn<T>) -> R) -> R {
        self.hooks.body_wait(true);
        let r = f(self.conn);
        self.hooks.body_wait(false);
        r
    }
}

impl<T: Transport> BodySource for WatchedSource<'_, T> {
    fn buffered(&self) -> &[u8] {
        self.conn.buffered()
    }
    fn consume(&mut self, n: usize) {
        self.conn.consume(n)
    }
    fn fill(&mut self, dl: Deadline) -> io::Result<usize> {
        self.waiting(|c| c.fill(dl))
    }
    fn read_direct(&mut self, out: &mut [u8], dl: Deadline) -> io::Result<usize> {
        self.waiting(|c| c.read_direct(out, dl))
    }
}

/// Serves every request of one connection given as an in-memory (or any) byte stream, with the
/// default configuration and without timeouts, until the input ends or the connection must be
/// closed. Used by the fuzz target and tests; [`serve`] uses the same code path.
pub fn handle_connection<S: Read + Write>(stream: S, router: &Router) {
    serve_connection(NoTimeouts(stream), router, &ServerConfig::default(), &NoHooks);
}

fn write_error<T: Transport>(conn: &mut Conn<T>, status: u16, err: &PluginError) {
    let resp = http::json_response(status, &wire::encode_error(err), true, false, &[]);
    let _ = conn.write_all(&resp);
    let _ = conn.flush();
}

/// Request ids of the plugin socket, for the `request{rid=N}` log span.
static REQUEST_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn serve_connection<T: Transport>(io: T, router: &Router, cfg: &ServerConfig, hooks: &dyn ConnHooks) {
    let limits = HeadLimits {
        max_headers: cfg.max_headers,
        idle_timeout: cfg.idle_timeout,
        head_timeout: cfg.head_timeout,
    };
    let mut conn = Conn::new(io, cfg.max_head);
    loop {
        if !hooks.begin_idle() {
            return;
        }
        let head = match conn.read_head(&limits) {
            Ok(h) => h,
            Err(HeadError::Closed) => return,
            Err(HeadError::TimedOut) => {
                tracing::debug!("request head timed out, closing connection");
                write_error(&mut conn, 408, &PluginError::invalid("request head timed out"));
                return;
            }
            Err(HeadError::Malformed(m)) => {
                tracing::warn!(error = %m, "malformed HTTP request, closing connection");
                write_error(
                    &mut conn,
                    400,
                    &PluginError::invalid(format!("malformed HTTP request: {m}")),
                );
                return;
            }
            Err(HeadError::TooLarge(m)) => {
                tracing::warn!(error = m, "request head refused, closing connection");
                write_error(&mut conn, 431, &PluginError::invalid(m));
                return;
            }
            Err(HeadError::UnsupportedTransferEncoding) => {
                tracing::warn!("unsupported transfer encoding, closing connection");
                write_error(
                    &mut conn,
                    501,
                    &PluginError::new(
                        crate::ErrorKind::Unsupported,
                        "transfer encoding other than chunked",
                    ),
                );
                return;
            }
        };
        if !hooks.begin_busy() {
            return;
        }
        // Every log line of this request (the Diff stream included) carries its id.
        let span = tracing::info_span!("request", rid = REQUEST_IDS.fetch_add(1, Ordering::Relaxed) + 1);
        let _span = span.enter();
        let has_body = head.framing != Framing::Length(0);
        if head.expect_continue
            && head.version >= 1
            && has_body
            && conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        let head_only = head.method == "HEAD";
        let body_deadline = Deadline::At(Instant::now() + cfg.body_timeout);
        // Small bodies (JSON, `Content-Length` up to the JSON limit): a connection blocked on them may be
        // evicted at the connection limit. Chunked or larger bodies (tar uploads) never are.
        let mut watched;
        let src: &mut dyn BodySource = match head.framing {
            Framing::Length(n) if n > 0 && n <= crate::router::DEFAULT_JSON_BODY_LIMIT as u64 => {
                watched = WatchedSource {
                    conn: &mut conn,
                    hooks,
                };
                &mut watched
            }
            _ => &mut conn,
        };
        let mut body = Body::new(src, head.framing, body_deadline, cfg.stream_timeout);
        let reply = router.handle(&head, &mut body);
        // Keep the connection only if the request body is fully consumed (drain a little if needed).
        let body_done =
            !reply.close && (body.is_complete() || (!body.is_broken() && body.drain(cfg.drain_limit)));
        let keep = head.keep_alive && body_done && !hooks.stopping();
        match reply.payload {
            Payload::Json(bytes) => {
                let extra: &[(&str, &str)] = if reply.allow_post {
                    &[("Allow", "POST")]
                } else {
                    &[]
                };
                let resp = http::json_response(reply.status, &bytes, !keep, head_only, extra);
                if conn.write_all(&resp).and_then(|_| conn.flush()).is_err() {
                    return;
                }
            }
            Payload::Tar(stream) => {
                let chunked = head.version >= 1;
                let keep = keep && chunked;
                if conn
                    .write_all(&http::stream_response_head(
                        http::TAR_CONTENT_TYPE,
                        chunked,
                        !keep,
                    ))
                    .is_err()
                {
                    return;
                }
                let mut w = ChunkedWriter::new(&mut conn, chunked);
                match stream.write_to(&mut w) {
                    Ok(()) => {
                        if let Err(e) = w.finish() {
                            tracing::warn!(error = %e, "writing the end of a Diff stream failed");
                            return;
                        }
                    }
                    Err(e) => {
                        // Never end the body cleanly: a cut stream must look cut to dockerd.
                        tracing::warn!(error = %e, "Diff failed mid-stream, aborting the connection");
                        return;
                    }
                }
                if !keep {
                    return;
                }
            }
        }
        if !keep {
            return;
        }
    }
}

/// [`serve_with_config`] with [`ServerConfig::default`].
pub fn serve(listener: UnixListener, router: Arc<Router>, shutdown: &ShutdownHandle) -> io::Result<()> {
    serve_with_config(listener, router, shutdown, ServerConfig::default())
}

/// Runs the accept loop until `shutdown` is requested, then stops accepting, closes idle
/// connections, waits up to [`ServerConfig::grace_period`] for in-flight requests, closes
/// whatever is left, and returns. The socket file is left in place.
pub fn serve_with_config(
    listener: UnixListener,
    router: Arc<Router>,
    shutdown: &ShutdownHandle,
    cfg: ServerConfig,
) -> io::Result<()> {
    listener.set_nonblocking(false)?;
    shutdown.set_waker(Some(UnixStream::from(OwnedFd::from(listener.try_clone()?))));
    let flag = shutdown.flag();
    if flag.load(Ordering::SeqCst) {
        shutdown.set_waker(None);
        return Ok(());
    }
    let cfg = Arc::new(cfg);
    let reg = Arc::new(Registry::default());

    // Notices a flag set by someone else (a signal handler) and wakes the accept loop.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = Arc::clone(&done);
        let handle = shutdown.clone();
        thread::Builder::new()
            .name("lamina-shutdown-watch".into())
            .spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    if handle.is_shutdown() {
                        handle.wake();
                        return;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            })?
    };

    tracing::info!(
        max_connections = cfg.max_connections,
        "plugin server accepting connections"
    );
    let result = accept_loop(&listener, &router, &cfg, &reg, &flag);
    done.store(true, Ordering::SeqCst);
    shutdown.set_waker(None);
    drop(listener);
    let _ = watcher.join();

    // Graceful stop: idle connections go now, busy ones get the grace period.
    reg.close_idle();
    let left = reg.wait_empty(Instant::now() + cfg.grace_period);
    if left > 0 {
        tracing::warn!(
            connections = left,
            "grace period over, closing connections with requests in flight"
        );
        reg.close_all();
        reg.wait_empty(Instant::now() + Duration::from_secs(2));
    }
    tracing::info!("plugin server stopped");
    result
}

fn accept_loop(
    listener: &UnixListener,
    router: &Arc<Router>,
    cfg: &Arc<ServerConfig>,
    reg: &Arc<Registry>,
    flag: &Arc<AtomicBool>,
) -> io::Result<()> {
    loop {
        if flag.load(Ordering::SeqCst) {
            return Ok(());
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if flag.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::WouldBlock => {
                    continue
                }
                io::ErrorKind::InvalidInput => return Err(e),
                _ => {
                    // EMFILE/ENFILE/ENOMEM: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        if flag.load(Ordering::SeqCst) {
            return Ok(());
        }
        if !reg.make_room(cfg.max_connections, flag) {
            return Ok(());
        }
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot track connection, dropping it");
                continue;
            }
        };
        let id = reg.register(clone);
        let (router, cfg, reg2, flag2) = (
            Arc::clone(router),
            Arc::clone(cfg),
            Arc::clone(reg),
            Arc::clone(flag),
        );
        let spawned = thread::Builder::new()
            .name(format!("lamina-conn-{id}"))
            .spawn(move || {
                let _ = stream.set_write_timeout(Some(cfg.write_timeout));
                let hooks = RegistryHooks {
                    reg: &reg2,
                    id,
                    flag: &flag2,
                };
                serve_connection(stream, &router, &cfg, &hooks);
                reg2.remove(id);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn connection thread, dropping connection");
            reg.remove(id);
        }
    }
}

/// Mode of the socket created by [`bind_socket`].
pub const SOCKET_MODE: u32 = 0o660;

/// [`bind_socket_with_mode`] with [`SOCKET_MODE`].
pub fn bind_socket(path: impl AsRef<Path>) -> io::Result<UnixListener> {
    bind_socket_with_mode(path, SOCKET_MODE)
}

/// Creates the parent directory, removes a stale socket file (one nobody answers on), binds,
/// and sets `mode`. If a live server answers on `path`, fails with `AddrInUse`; if `path` is
/// something other than a socket, fails with `AlreadyExists` and leaves it alone.
///
/// The socket is bound in a private (0700) directory next to `path`, given its mode, and then
/// renamed into place, so it is never reachable with looser permissions.
pub fn bind_socket_with_mode(path: impl AsRef<Path>, mode: u32) -> io::Result<UnixListener> {
    let path = path.as_ref();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)?;
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another server is answering on {}", path.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing stale socket");
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let private = parent.join(format!(".{name}.bind-{}", std::process::id()));
    match fs::DirBuilder::new().mode(0o700).create(&private) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_dir_all(&private)?;
            fs::DirBuilder::new().mode(0o700).create(&private)?;
        }
        Err(e) => return Err(e),
    }
    let tmp = private.join("s");
    let staged = UnixListener::bind(&tmp).and_then(|l| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_dir(&private);
    match staged {
        Ok(l) => Ok(l),
        // The staging path may exceed the socket path limit (108 bytes): bind in place.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            let l = UnixListener::bind(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            Ok(l)
        }
        Err(e) => Err(e),
    }
}
