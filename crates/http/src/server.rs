//! The blocking server: accept loop, one thread per connection, keep-alive, timeouts,
//! connection cap, refusals, graceful shutdown, and socket binding.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::message::{
    self, Body, BodySource, ChunkedWriter, Conn, Deadline, Framing, HeadError, HeadLimits, NoTimeouts,
    RequestHead, ResponseFraming, Transport,
};
use crate::response::{Handler, Refusal, ResponseBody};

/// Limits and timeouts of the server. The defaults suit the clients of a local daemon (dockerd,
/// the `lamina` CLI, a Prometheus scraper).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name of the server in logs and thread names (`plugin`, `admin`, `metrics`).
    pub name: &'static str,
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
    /// How long a small request body (JSON) may take to arrive.
    pub body_timeout: Duration,
    /// How long a streamed request body (ApplyDiff) may go without a single byte.
    pub stream_timeout: Duration,
    /// How long one write of a response may block (a client that does not read).
    pub write_timeout: Duration,
    /// Unread request body bytes discarded to keep a connection alive; beyond that it is closed.
    pub drain_limit: u64,
    /// Small request bodies (`Content-Length` up to this) count as waiting for the client: a
    /// connection blocked on one may be closed at the connection cap.
    pub small_body: u64,
    /// After a refusal, bytes the client may still send (and that are read and discarded) before
    /// the connection is closed, so that the client gets to read the answer.
    pub linger_limit: u64,
    /// How long that may take.
    pub linger_timeout: Duration,
    /// How long [`serve`] waits for in-flight requests after shutdown was requested.
    pub grace_period: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: "http",
            max_connections: 256,
            max_head: message::DEFAULT_MAX_HEAD,
            max_headers: message::DEFAULT_MAX_HEADERS,
            idle_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(300),
            drain_limit: 64 * 1024,
            small_body: 1024 * 1024,
            linger_limit: 64 * 1024 * 1024,
            linger_timeout: Duration::from_secs(2),
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

struct ShutdownInner {
    flag: Arc<AtomicBool>,
    /// Shuts the listening socket of a running [`serve`] down: on Linux that makes a blocked
    /// `accept(2)` return at once.
    waker: Mutex<Option<Closer>>,
}

impl std::fmt::Debug for ShutdownInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownInner").field("flag", &self.flag).finish()
    }
}

/// Shuts a socket down in both directions.
pub type Closer = Box<dyn Fn() + Send>;

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
        if let Some(close) = lock(&self.inner.waker).as_ref() {
            close();
        }
    }

    fn set_waker(&self, w: Option<Closer>) {
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
    close: Closer,
    /// `Some` while waiting for a request head.
    idle_since: Option<Instant>,
    /// `Some` while blocked waiting for bytes of a `Content-Length` request body: a client trickling
    /// its body must not hold a slot that a valid request needs.
    body_wait_since: Option<Instant>,
    /// Closed from outside: the connection must not start another request.
    evicted: bool,
}

impl Registry {
    fn register(&self, close: Closer) -> u64 {
        let mut st = lock(&self.state);
        st.next_id += 1;
        let id = st.next_id;
        st.conns.insert(
            id,
            Slot {
                close,
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
        (slot.close)();
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

/// A listening socket [`serve`] accepts connections from: a unix or a TCP socket.
pub trait Listener: Send + 'static {
    /// Its connections.
    type Stream: Connection;
    /// Waits for the next connection.
    fn accept_stream(&self) -> io::Result<Self::Stream>;
    /// Makes `accept` block.
    fn set_blocking(&self) -> io::Result<()>;
    /// Something that shuts this socket down, which makes a blocked `accept` return.
    fn closer(&self) -> io::Result<Closer>;
}

/// An accepted connection.
pub trait Connection: Transport + Send + Sized + 'static {
    /// A second handle on the same socket.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts the socket down in both directions.
    fn shutdown_both(&self);
    /// Sets the timeout of each write.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// The [`Listener`] and [`Connection`] impls of a std socket pair (unix or TCP), which have the same methods.
macro_rules! socket_impls {
    ($listener:ty, $stream:ident) => {
        impl Listener for $listener {
            type Stream = $stream;
            fn accept_stream(&self) -> io::Result<$stream> {
                self.accept().map(|(s, _)| s)
            }
            fn set_blocking(&self) -> io::Result<()> {
                self.set_nonblocking(false)
            }
            fn closer(&self) -> io::Result<Closer> {
                let s = $stream::from(OwnedFd::from(self.try_clone()?));
                Ok(Box::new(move || {
                    let _ = s.shutdown(Shutdown::Both);
                }))
            }
        }

        impl Connection for $stream {
            fn try_clone(&self) -> io::Result<Self> {
                $stream::try_clone(self)
            }
            fn shutdown_both(&self) {
                let _ = self.shutdown(Shutdown::Both);
            }
            fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                $stream::set_write_timeout(self, timeout)
            }
        }
    };
}

socket_impls!(UnixListener, UnixStream);
socket_impls!(TcpListener, TcpStream);

/// Serves every request of one connection given as an in-memory (or any) byte stream, with the
/// default configuration and without timeouts, until the input ends or the connection must be
/// closed. Used by fuzz targets and tests; [`serve`] uses the same code path.
pub fn handle_connection<S: Read + Write, H: Handler + ?Sized>(stream: S, handler: &H) {
    let ids = AtomicU64::new(0);
    serve_connection(
        NoTimeouts(stream),
        handler,
        &ServerConfig::default(),
        &NoHooks,
        &ids,
    );
}

/// Answers a request the server refused by itself, then closes (after reading what the client
/// still sends, if `linger`).
fn refuse<T: Transport, H: Handler + ?Sized>(
    conn: &mut Conn<T>,
    handler: &H,
    cfg: &ServerConfig,
    hooks: &dyn ConnHooks,
    refusal: Refusal,
    linger: bool,
) {
    let mut resp = handler.refuse(&refusal);
    let body = match resp.take_body() {
        ResponseBody::Full(b) => b,
        ResponseBody::Stream(_) => Vec::new(),
    };
    let mut out = resp.head(refusal.status, ResponseFraming::Length(body.len()), true);
    out.extend_from_slice(&body);
    if conn.write_all(&out).and_then(|_| conn.flush()).is_err() {
        return;
    }
    if linger {
        hooks.body_wait(true);
        conn.linger(cfg.linger_limit, Instant::now() + cfg.linger_timeout);
    }
}

/// Reads the next request head, answering (and closing) if it is refused.
fn next_head<T: Transport, H: Handler + ?Sized>(
    conn: &mut Conn<T>,
    handler: &H,
    cfg: &ServerConfig,
    hooks: &dyn ConnHooks,
) -> Option<RequestHead> {
    let limits = HeadLimits {
        max_headers: cfg.max_headers,
        idle_timeout: cfg.idle_timeout,
        head_timeout: cfg.head_timeout,
    };
    let (status, message, linger) = match conn.read_head(&limits) {
        Ok(h) => return Some(h),
        Err(HeadError::Closed) => return None,
        Err(HeadError::TimedOut) => {
            tracing::debug!(server = cfg.name, "request head timed out, closing connection");
            (408, "request head timed out".to_owned(), false)
        }
        Err(HeadError::Malformed(m)) => {
            tracing::warn!(server = cfg.name, error = %m, "malformed HTTP request, closing connection");
            (400, format!("malformed HTTP request: {m}"), true)
        }
        Err(HeadError::TooLarge(m)) => {
            tracing::warn!(
                server = cfg.name,
                error = m,
                "request head refused, closing connection"
            );
            (431, m.to_owned(), true)
        }
        Err(HeadError::UnsupportedTransferEncoding) => {
            tracing::warn!(
                server = cfg.name,
                "unsupported transfer encoding, closing connection"
            );
            (501, "transfer encoding other than chunked".to_owned(), true)
        }
    };
    refuse(conn, handler, cfg, hooks, Refusal { status, message }, linger);
    None
}

fn serve_connection<T: Transport, H: Handler + ?Sized>(
    io: T,
    handler: &H,
    cfg: &ServerConfig,
    hooks: &dyn ConnHooks,
    ids: &AtomicU64,
) {
    let mut conn = Conn::new(io, cfg.max_head);
    loop {
        if !hooks.begin_idle() {
            return;
        }
        let Some(head) = next_head(&mut conn, handler, cfg, hooks) else {
            return;
        };
        if !hooks.begin_busy() {
            return;
        }
        // Every log line of this request (a streamed body included) carries its id.
        let span = tracing::info_span!("request", rid = ids.fetch_add(1, Ordering::Relaxed) + 1);
        let _span = span.enter();
        if !serve_request(&mut conn, &head, handler, cfg, hooks) {
            return;
        }
    }
}

/// Serves one request whose head was read. Returns whether the connection may serve another.
fn serve_request<T: Transport, H: Handler + ?Sized>(
    conn: &mut Conn<T>,
    head: &RequestHead,
    handler: &H,
    cfg: &ServerConfig,
    hooks: &dyn ConnHooks,
) -> bool {
    let has_body = head.framing != Framing::Length(0);
    if head.expect_continue
        && head.version >= 1
        && has_body
        && conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
    {
        return false;
    }
    let head_only = head.method == "HEAD";
    let body_deadline = Deadline::At(Instant::now() + cfg.body_timeout);
    // Small bodies (JSON): a connection blocked on them may be evicted at the connection cap.
    // Chunked or larger bodies (tar uploads) never are.
    let mut watched;
    let src: &mut dyn BodySource = match head.framing {
        Framing::Length(n) if n > 0 && n <= cfg.small_body => {
            watched = WatchedSource {
                conn: &mut *conn,
                hooks,
            };
            &mut watched
        }
        _ => &mut *conn,
    };
    let mut body = Body::new(src, head.framing, body_deadline, cfg.stream_timeout);
    let mut resp = handler.handle(head, &mut body);
    // Keep the connection only if the request body is fully consumed (drain a little if needed).
    let body_done = !resp.close && (body.is_complete() || (!body.is_broken() && body.drain(cfg.drain_limit)));
    // A body left unread (refused, or too large to drain) may still be arriving.
    let linger = !body.is_complete() && !body.is_broken();
    let keep = head.keep_alive && body_done && !resp.http10 && !hooks.stopping();
    let kept = match resp.take_body() {
        ResponseBody::Full(bytes) => {
            let mut out = resp.head(resp.status, ResponseFraming::Length(bytes.len()), !keep);
            if !head_only {
                out.extend_from_slice(&bytes);
            }
            conn.write_all(&out).and_then(|_| conn.flush()).is_ok() && keep
        }
        ResponseBody::Stream(stream) => {
            let chunked = head.version >= 1 && !resp.close && !resp.http10;
            let keep = keep && chunked;
            let framing = if chunked {
                ResponseFraming::Chunked
            } else {
                ResponseFraming::Close
            };
            let out = resp.head(resp.status, framing, !keep);
            if conn.write_all(&out).is_err() {
                return false;
            }
            let mut w = ChunkedWriter::new(&mut *conn, chunked);
            match stream.write_to(&mut w) {
                Ok(()) => match w.finish() {
                    Ok(()) => keep,
                    Err(e) => {
                        tracing::warn!(server = cfg.name, error = %e, "writing the end of a response stream failed");
                        return false;
                    }
                },
                Err(e) => {
                    // Never end the body cleanly: a cut stream must look cut to the client.
                    tracing::warn!(server = cfg.name, error = %e, "response stream failed, aborting the connection");
                    return false;
                }
            }
        }
    };
    if !kept && linger {
        hooks.body_wait(true);
        conn.linger(cfg.linger_limit, Instant::now() + cfg.linger_timeout);
    }
    kept
}

/// [`serve_with_config`] with [`ServerConfig::default`].
pub fn serve<L: Listener, H: Handler>(
    listener: L,
    handler: Arc<H>,
    shutdown: &ShutdownHandle,
) -> io::Result<()> {
    serve_with_config(listener, handler, shutdown, ServerConfig::default())
}

/// Runs the accept loop until `shutdown` is requested, then stops accepting, closes idle
/// connections, waits up to [`ServerConfig::grace_period`] for in-flight requests, closes
/// whatever is left, and returns. A socket file is left in place.
pub fn serve_with_config<L: Listener, H: Handler>(
    listener: L,
    handler: Arc<H>,
    shutdown: &ShutdownHandle,
    cfg: ServerConfig,
) -> io::Result<()> {
    listener.set_blocking()?;
    shutdown.set_waker(Some(listener.closer()?));
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
            .name(format!("{}-shutdown", cfg.name))
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
        server = cfg.name,
        max_connections = cfg.max_connections,
        "accepting connections"
    );
    let result = accept_loop(&listener, &handler, &cfg, &reg, &flag);
    done.store(true, Ordering::SeqCst);
    shutdown.set_waker(None);
    drop(listener);
    let _ = watcher.join();

    // Graceful stop: idle connections go now, busy ones get the grace period.
    reg.close_idle();
    let left = reg.wait_empty(Instant::now() + cfg.grace_period);
    if left > 0 {
        tracing::warn!(
            server = cfg.name,
            connections = left,
            "grace period over, closing connections with requests in flight"
        );
        reg.close_all();
        reg.wait_empty(Instant::now() + Duration::from_secs(2));
    }
    tracing::info!(server = cfg.name, "stopped");
    result
}

fn accept_loop<L: Listener, H: Handler>(
    listener: &L,
    handler: &Arc<H>,
    cfg: &Arc<ServerConfig>,
    reg: &Arc<Registry>,
    flag: &Arc<AtomicBool>,
) -> io::Result<()> {
    let ids = Arc::new(AtomicU64::new(0));
    loop {
        if flag.load(Ordering::SeqCst) {
            return Ok(());
        }
        let stream = match listener.accept_stream() {
            Ok(s) => s,
            Err(_) if flag.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::WouldBlock => {
                    continue
                }
                io::ErrorKind::InvalidInput => return Err(e),
                _ => {
                    // EMFILE/ENFILE/ENOMEM: back off instead of spinning.
                    tracing::warn!(server = cfg.name, error = %e, "accept failed");
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
                tracing::warn!(server = cfg.name, error = %e, "cannot track connection, dropping it");
                continue;
            }
        };
        let id = reg.register(Box::new(move || clone.shutdown_both()));
        let (handler, cfg2, reg2, flag2, ids) = (
            Arc::clone(handler),
            Arc::clone(cfg),
            Arc::clone(reg),
            Arc::clone(flag),
            Arc::clone(&ids),
        );
        let spawned = thread::Builder::new()
            .name(format!("{}-conn-{id}", cfg.name))
            .spawn(move || {
                let _ = stream.set_write_timeout(Some(cfg2.write_timeout));
                let hooks = RegistryHooks {
                    reg: &reg2,
                    id,
                    flag: &flag2,
                };
                serve_connection(stream, &*handler, &cfg2, &hooks, &ids);
                reg2.remove(id);
            });
        if let Err(e) = spawned {
            tracing::warn!(server = cfg.name, error = %e, "cannot spawn connection thread, dropping connection");
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
