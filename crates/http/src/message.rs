//! HTTP/1.1 messages: request heads (via `httparse`), bodies framed by `Content-Length` or
//! `Transfer-Encoding: chunked` exposed as [`Read`], response heads, chunked response bodies, and
//! query-string decoding.
//!
//! Everything here is blocking and works on any byte stream; timeouts are applied through the
//! [`Transport`] trait, which is a no-op for in-memory streams.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Size of the connection's read buffer; also the cap on a request head.
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
/// Maximum number of header lines in a request head.
pub const DEFAULT_MAX_HEADERS: usize = 64;
/// Cap on one chunk-size line (size plus extensions) and on one trailer line.
const MAX_CHUNK_LINE: usize = 4096;
/// Cap on the total size of a chunked body's trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// Reads smaller than this go through the connection buffer instead of straight into the caller's.
const DIRECT_READ_MIN: usize = 4096;
/// Size of the chunks written for streamed responses.
const OUT_CHUNK: usize = 64 * 1024;

/// When a blocking read must give up.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Deadline {
    /// Each read may wait this long for at least one byte.
    PerRead(Duration),
    /// The whole operation must finish by then.
    At(Instant),
}

/// A byte stream whose read timeout can be changed between reads.
pub trait Transport: Read + Write {
    /// Sets the timeout of subsequent reads; `None` blocks forever.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Ends the sending direction (the peer reads end of stream) while reading goes on.
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl Transport for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Any stream, with timeouts ignored (in-memory streams, fuzzing).
pub(crate) struct NoTimeouts<S>(pub S);

impl<S: Read> Read for NoTimeouts<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for NoTimeouts<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<S: Read + Write> Transport for NoTimeouts<S> {
    fn set_read_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "read timed out")
}

/// Limits applied while reading a request head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadLimits {
    pub max_headers: usize,
    pub idle_timeout: Duration,
    pub head_timeout: Duration,
}

/// Why no request head could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The peer closed, went idle for too long, or an I/O error occurred: close quietly.
    Closed,
    /// The head did not arrive completely in time.
    TimedOut,
    /// Not HTTP/1.x (answer 400 and close).
    Malformed(String),
    /// Over the head size or header count cap (answer 431 and close).
    TooLarge(&'static str),
    /// A transfer coding other than `chunked` (answer 501 and close).
    UnsupportedTransferEncoding,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: n` (also `0` when neither header is present).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request line and the headers this server cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The request target as sent (`/GraphDriver.ApplyDiff?id=x&parent=`).
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Body framing.
    pub framing: Framing,
    /// Whether the client allows the connection to stay open after this request.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The target without its query string.
    pub fn path(&self) -> &str {
        match self.target.split_once('?') {
            Some((p, _)) => p,
            None => &self.target,
        }
    }

    /// The raw query string (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

/// Parses a head that httparse found complete.
fn build_head(req: &httparse::Request<'_, '_>) -> Result<RequestHead, HeadError> {
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default().to_owned();
    let version = req.version.unwrap_or(1);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut te_seen = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(|s| s.trim_matches([' ', '\t']))
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| HeadError::Malformed("invalid Content-Length".into()))?;
            if content_length.is_some_and(|old| old != v) {
                return Err(HeadError::Malformed("conflicting Content-Length headers".into()));
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te_seen = true;
            let v = std::str::from_utf8(h.value)
                .map_err(|_| HeadError::Malformed("invalid Transfer-Encoding".into()))?;
            for token in v.split(',').map(|t| t.trim_matches([' ', '\t'])) {
                if token.is_empty() {
                    continue;
                }
                if token.eq_ignore_ascii_case("chunked") && !chunked {
                    chunked = true;
                } else {
                    return Err(HeadError::UnsupportedTransferEncoding);
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value);
            for token in v.split(',').map(|t| t.trim_matches([' ', '\t'])) {
                if token.eq_ignore_ascii_case("close") {
                    conn_close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    conn_keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect")
            && h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue")
        {
            expect_continue = true;
        }
    }
    if te_seen && !chunked {
        return Err(HeadError::UnsupportedTransferEncoding);
    }
    if chunked && content_length.is_some() {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding".into(),
        ));
    }
    let framing = if chunked {
        Framing::Chunked
    } else {
        Framing::Length(content_length.unwrap_or(0))
    };
    let keep_alive = if version >= 1 {
        !conn_close
    } else {
        conn_keep_alive && !conn_close
    };
    Ok(RequestHead {
        method,
        target,
        version,
        framing,
        keep_alive,
        expect_continue,
    })
}

/// A connection: the transport plus a read buffer that holds at most one request head
/// (and whatever pipelined bytes follow it).
pub(crate) struct Conn<T> {
    io: T,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The read timeout currently set on the transport (`None` = unknown).
    current_timeout: Option<Option<Duration>>,
}

impl<T: Transport> Conn<T> {
    pub(crate) fn new(io: T, max_head: usize) -> Self {
        Conn {
            io,
            buf: vec![0u8; max_head.max(256)].into_boxed_slice(),
            start: 0,
            end: 0,
            current_timeout: None,
        }
    }

    fn apply_deadline(&mut self, dl: Deadline) -> io::Result<()> {
        let t = match dl {
            Deadline::PerRead(d) => Some(d.max(Duration::from_millis(1))),
            Deadline::At(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out());
                }
                Some(left)
            }
        };
        if self.current_timeout != Some(t) {
            self.io.set_read_timeout(t)?;
            self.current_timeout = Some(t);
        }
        Ok(())
    }

    fn read_into_buf(&mut self, dl: Deadline) -> io::Result<usize> {
        self.apply_deadline(dl)?;
        loop {
            match self.io.read(&mut self.buf[self.end..]) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(timed_out()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads more bytes into the buffer. Returns 0 at end of stream.
    pub(crate) fn fill(&mut self, dl: Deadline) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "read buffer full"));
        }
        let n = self.read_into_buf(dl)?;
        self.end += n;
        Ok(n)
    }

    /// Reads straight into `out`; only valid when nothing is buffered.
    pub(crate) fn read_direct(&mut self, out: &mut [u8], dl: Deadline) -> io::Result<usize> {
        debug_assert_eq!(self.start, self.end);
        self.apply_deadline(dl)?;
        loop {
            match self.io.read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(timed_out()),
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// Reads the next request head. `Ok(None)`: the peer closed or stayed idle; close quietly.
    pub(crate) fn read_head(&mut self, limits: &HeadLimits) -> Result<RequestHead, HeadError> {
        if self.buffered().is_empty() {
            match self.fill(Deadline::PerRead(limits.idle_timeout)) {
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(_) => {}
            }
        }
        let deadline = Instant::now() + limits.head_timeout;
        loop {
            {
                let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&self.buf[self.start..self.end]) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = build_head(&req);
                        self.start += n;
                        return head;
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(HeadError::TooLarge("too many headers"))
                    }
                    Err(e) => return Err(HeadError::Malformed(e.to_string())),
                }
            }
            if self.buffered().len() >= self.buf.len() {
                return Err(HeadError::TooLarge("request head too large"));
            }
            match self.fill(Deadline::At(deadline)) {
                Ok(0) => return Err(HeadError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(HeadError::TimedOut),
                Err(_) => return Err(HeadError::Closed),
            }
        }
    }
}

impl<T: Transport> Conn<T> {
    /// After a refusal: ends the sending direction, then reads and discards what the client still
    /// sends (at most `limit` bytes, until `until`), so that a client that writes its whole request
    /// before reading gets to read the answer instead of a broken pipe.
    pub(crate) fn linger(&mut self, limit: u64, until: Instant) {
        if self.io.shutdown_write().is_err() {
            return;
        }
        self.start = 0;
        self.end = 0;
        let mut seen = 0u64;
        while seen < limit {
            match self.read_into_buf(Deadline::At(until)) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen += n as u64,
            }
        }
    }
}

impl<T: Transport> Write for Conn<T> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.io.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.io.flush()
    }
}

/// What a [`Body`] reads from: a connection's buffer and transport, type-erased.
pub(crate) trait BodySource {
    fn buffered(&self) -> &[u8];
    fn consume(&mut self, n: usize);
    fn fill(&mut self, dl: Deadline) -> io::Result<usize>;
    fn read_direct(&mut self, out: &mut [u8], dl: Deadline) -> io::Result<usize>;
}

impl<T: Transport> BodySource for Conn<T> {
    fn buffered(&self) -> &[u8] {
        Conn::buffered(self)
    }
    fn consume(&mut self, n: usize) {
        Conn::consume(self, n)
    }
    fn fill(&mut self, dl: Deadline) -> io::Result<usize> {
        Conn::fill(self, dl)
    }
    fn read_direct(&mut self, out: &mut [u8], dl: Deadline) -> io::Result<usize> {
        Conn::read_direct(self, out, dl)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// Reading trailer lines; bytes seen so far.
    Trailers(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Length(u64),
    Chunked(ChunkState),
    Done,
    /// A framing or I/O error happened: the connection cannot be reused.
    Broken,
}

/// A request body as a [`Read`]: `Content-Length` or chunked, decoded incrementally with
/// constant memory. Reads before it is switched to streaming mode share one deadline (meant
/// for small JSON bodies); in streaming mode each read may wait up to the stream timeout.
pub struct Body<'a> {
    src: &'a mut dyn BodySource,
    state: BodyState,
    deadline: Deadline,
    stream_timeout: Duration,
}

fn invalid_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Parses a chunk-size line (without its CRLF): hex size, optional whitespace, optional extensions.
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(invalid_data("malformed chunked encoding: bad chunk size"));
    }
    if digits > 16 {
        return Err(invalid_data("malformed chunked encoding: chunk size too large"));
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = (size << 4) | d;
    }
    let rest = &line[digits..];
    let rest = &rest[rest.iter().take_while(|b| **b == b' ' || **b == b'\t').count()..];
    if !rest.is_empty() && (rest[0] != b';' || !is_field_text(rest)) {
        return Err(invalid_data("malformed chunked encoding: bad chunk extension"));
    }
    Ok(size)
}

/// Visible characters, spaces and tabs only (no CR, LF, NUL or other controls).
fn is_field_text(s: &[u8]) -> bool {
    s.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

impl<'a> Body<'a> {
    pub(crate) fn new(
        src: &'a mut dyn BodySource,
        framing: Framing,
        first_deadline: Deadline,
        stream_timeout: Duration,
    ) -> Self {
        let state = match framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkState::Size),
        };
        Body {
            src,
            state,
            deadline: first_deadline,
            stream_timeout,
        }
    }

    /// Switches to streaming mode: from now on each read may wait up to the stream timeout
    /// for a byte, with no limit on the total time.
    pub fn set_streaming(&mut self) {
        self.deadline = Deadline::PerRead(self.stream_timeout);
    }

    /// Bytes left of a `Content-Length` body (`None` for chunked bodies).
    pub fn remaining_length(&self) -> Option<u64> {
        match self.state {
            BodyState::Length(n) => Some(n),
            BodyState::Done => Some(0),
            _ => None,
        }
    }

    /// Whether the body was read to its end.
    pub fn is_complete(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Whether a framing or I/O error made the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.state == BodyState::Broken
    }

    /// Reads and discards what is left of the body, up to `limit` bytes. Returns whether the
    /// body is now complete (if not, the connection must be closed).
    pub(crate) fn drain(&mut self, limit: u64) -> bool {
        if let BodyState::Length(n) = self.state {
            if n > limit {
                return false;
            }
        }
        let mut scratch = [0u8; 8192];
        let mut total = 0u64;
        loop {
            match self.state {
                BodyState::Done => return true,
                BodyState::Broken => return false,
                _ => {}
            }
            if total > limit {
                return false;
            }
            match self.read(&mut scratch) {
                Ok(0) => return self.state == BodyState::Done,
                Ok(n) => total += n as u64,
                Err(_) => return false,
            }
        }
    }

    /// Returns the index of the `\n` ending the next line, or `None` if more input is needed.
    fn find_line(&mut self, max: usize) -> io::Result<usize> {
        loop {
            let buf = self.src.buffered();
            if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                if i + 1 > max {
                    return Err(invalid_data("malformed chunked encoding: line too long"));
                }
                return Ok(i);
            }
            if buf.len() >= max {
                return Err(invalid_data("malformed chunked encoding: line too long"));
            }
            if self.src.fill(self.deadline)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "request body truncated",
                ));
            }
        }
    }

    /// Returns the next line's content without CRLF (as a range of the buffer) and its total length.
    fn next_line(&mut self, max: usize) -> io::Result<(usize, usize)> {
        let nl = self.find_line(max)?;
        let buf = self.src.buffered();
        if nl == 0 || buf[nl - 1] != b'\r' {
            return Err(invalid_data("malformed chunked encoding: line not ended by CRLF"));
        }
        Ok((nl - 1, nl + 1))
    }

    fn read_inner(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Broken => {
                    return Err(io::Error::other("request body unusable after an earlier error"));
                }
                BodyState::Length(left) => {
                    if out.is_empty() {
                        return Ok(0);
                    }
                    let want = left.min(out.len() as u64) as usize;
                    let n = self.read_data(&mut out[..want])?;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        BodyState::Done
                    } else {
                        BodyState::Length(left)
                    };
                    return Ok(n);
                }
                BodyState::Chunked(ChunkState::Size) => {
                    let (content, total) = self.next_line(MAX_CHUNK_LINE)?;
                    let size = parse_chunk_size(&self.src.buffered()[..content])?;
                    self.src.consume(total);
                    self.state = BodyState::Chunked(if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    });
                }
                BodyState::Chunked(ChunkState::Data(left)) => {
                    if out.is_empty() {
                        return Ok(0);
                    }
                    let want = left.min(out.len() as u64) as usize;
                    let n = self.read_data(&mut out[..want])?;
                    let left = left - n as u64;
                    self.state = BodyState::Chunked(if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    });
                    return Ok(n);
                }
                BodyState::Chunked(ChunkState::DataEnd) => {
                    while self.src.buffered().len() < 2 {
                        if self.src.fill(self.deadline)? == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "request body truncated",
                            ));
                        }
                    }
                    if &self.src.buffered()[..2] != b"\r\n" {
                        return Err(invalid_data(
                            "malformed chunked encoding: missing CRLF after chunk data",
                        ));
                    }
                    self.src.consume(2);
                    self.state = BodyState::Chunked(ChunkState::Size);
                }
                BodyState::Chunked(ChunkState::Trailers(seen)) => {
                    let (content, total) = self.next_line(MAX_CHUNK_LINE)?;
                    if content == 0 {
                        self.src.consume(total);
                        self.state = BodyState::Done;
                        return Ok(0);
                    }
                    let line = &self.src.buffered()[..content];
                    if !is_field_text(line) || !line.contains(&b':') {
                        return Err(invalid_data("malformed chunked encoding: bad trailer"));
                    }
                    let seen = seen + total;
                    if seen > MAX_TRAILERS {
                        return Err(invalid_data("malformed chunked encoding: trailers too large"));
                    }
                    self.src.consume(total);
                    self.state = BodyState::Chunked(ChunkState::Trailers(seen));
                }
            }
        }
    }

    /// Reads body bytes (at most `out.len()`, at least one) from the buffer or the transport.
    fn read_data(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.src.buffered().is_empty() {
            if out.len() >= DIRECT_READ_MIN {
                let n = self.src.read_direct(out, self.deadline)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "request body truncated",
                    ));
                }
                return Ok(n);
            }
            if self.src.fill(self.deadline)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "request body truncated",
                ));
            }
        }
        let buf = self.src.buffered();
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.src.consume(n);
        Ok(n)
    }
}

impl Read for Body<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self.read_inner(out) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.state = BodyState::Broken;
                Err(e)
            }
        }
    }
}

/// Reads a whole body into memory, refusing more than `cap` bytes.
/// `Err(None)`: over the cap. `Err(Some(e))`: I/O or framing error.
pub fn read_capped(body: &mut Body<'_>, cap: usize) -> Result<Vec<u8>, Option<io::Error>> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = body.read(&mut chunk).map_err(Some)?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > cap {
            return Err(None);
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// The reason phrase of the status codes this server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// `Content-Length: n`.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes.
    Close,
}

/// Serialises a response head: status line, `Content-Type` (if any), framing, `extra` headers,
/// `Connection: close` if `close`.
pub(crate) fn response_head(
    http10: bool,
    status: u16,
    content_type: Option<&str>,
    framing: ResponseFraming,
    extra: &[(&str, &str)],
    close: bool,
) -> Vec<u8> {
    let version = if http10 { "1.0" } else { "1.1" };
    let mut head = String::with_capacity(160);
    let _ = write!(head, "HTTP/{version} {status} {}\r\n", reason(status));
    if let Some(t) = content_type {
        let _ = write!(head, "Content-Type: {t}\r\n");
    }
    match framing {
        ResponseFraming::Length(n) => {
            let _ = write!(head, "Content-Length: {n}\r\n");
        }
        ResponseFraming::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        ResponseFraming::Close => {}
    }
    for (k, v) in extra {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Writes a response body in chunks (or raw, for HTTP/1.0). [`ChunkedWriter::finish`] writes
/// the terminating zero-length chunk; dropping the writer without it leaves the body unterminated.
pub(crate) struct ChunkedWriter<'a, W: Write + ?Sized> {
    out: &'a mut W,
    buf: Vec<u8>,
    chunked: bool,
}

impl<'a, W: Write + ?Sized> ChunkedWriter<'a, W> {
    pub(crate) fn new(out: &'a mut W, chunked: bool) -> Self {
        ChunkedWriter {
            out,
            buf: Vec::with_capacity(OUT_CHUNK),
            chunked,
        }
    }

    fn emit(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let mut frame = Vec::with_capacity(data.len() + 24);
            let _ = write!(frame, "{:x}\r\n", data.len());
            frame.extend_from_slice(data);
            frame.extend_from_slice(b"\r\n");
            self.out.write_all(&frame)
        } else {
            self.out.write_all(data)
        }
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.emit(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    /// Flushes buffered data and ends the body cleanly.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        self.flush_buf()?;
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}

impl<W: Write + ?Sized> Write for ChunkedWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > OUT_CHUNK {
            self.flush_buf()?;
        }
        if data.len() >= OUT_CHUNK {
            self.emit(data)?;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()?;
        self.out.flush()
    }
}

/// A query string that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed query string: {0}")]
pub struct QueryError(&'static str);

/// Decodes `%XX` escapes and `+` (as a space), like Go's `url.ParseQuery`.
pub fn percent_decode(s: &str) -> Result<String, QueryError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err(QueryError("bad percent escape")),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError("not UTF-8"))
}

/// Splits a query string into decoded `(key, value)` pairs, in order, duplicates kept.
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, QueryError> {
    let mut out = Vec::new();
    for part in q.split('&') {
        if part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// In-memory transport; `step` > 0 hands out input at most `step` bytes per read.
    struct Mem {
        input: Cursor<Vec<u8>>,
        step: usize,
        out: Vec<u8>,
    }

    impl Read for Mem {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = if self.step > 0 {
                buf.len().min(self.step)
            } else {
                buf.len()
            };
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Mem {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn conn(input: &[u8], step: usize) -> Conn<NoTimeouts<Mem>> {
        Conn::new(
            NoTimeouts(Mem {
                input: Cursor::new(input.to_vec()),
                step,
                out: Vec::new(),
            }),
            16 * 1024,
        )
    }

    // Deadlines far above anything these in-memory reads take, also on a loaded machine: these tests are about
    // parsing, and a 1 s deadline once turned a descheduled thread into a "too slow" answer.
    const LIMITS: HeadLimits = HeadLimits {
        max_headers: 8,
        idle_timeout: Duration::from_secs(30),
        head_timeout: Duration::from_secs(30),
    };

    fn body_of(c: &mut Conn<NoTimeouts<Mem>>, framing: Framing) -> io::Result<Vec<u8>> {
        let mut b = Body::new(
            c,
            framing,
            Deadline::PerRead(Duration::from_secs(30)),
            Duration::from_secs(30),
        );
        let mut out = Vec::new();
        b.read_to_end(&mut out)?;
        assert!(b.is_complete());
        Ok(out)
    }

    /// A body on `c` with a one-second deadline for its first read and none for the rest.
    fn quick_body(c: &mut Conn<NoTimeouts<Mem>>, framing: Framing) -> Body<'_> {
        Body::new(
            c,
            framing,
            Deadline::PerRead(Duration::from_secs(1)),
            Duration::ZERO,
        )
    }

    fn chunked(input: &[u8]) -> io::Result<Vec<u8>> {
        // Every input is also decoded one byte per read, to exercise incremental parsing.
        let slow = body_of(&mut conn(input, 1), Framing::Chunked);
        let fast = body_of(&mut conn(input, 0), Framing::Chunked);
        match (&slow, &fast) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => panic!("slow {slow:?} vs fast {fast:?}"),
        }
        fast
    }

    #[test]
    fn chunked_decoding() {
        // (wire form, decoded body)
        let cases = [
            ("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "hello world"),
            ("0\r\n\r\n", ""),
            // Upper/lower hex and leading zeros.
            ("000A\r\n0123456789\r\n0\r\n\r\n", "0123456789"),
            ("a\r\n0123456789\r\n0\r\n\r\n", "0123456789"),
            // Extensions (with and without values, whitespace before `;`).
            ("3;name=value;flag\r\nabc\r\n0;last\r\n\r\n", "abc"),
            ("3 ;x=\"q\"\r\nabc\r\n0\r\n\r\n", "abc"),
            // Trailers are read and ignored.
            ("3\r\nabc\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\n", "abc"),
        ];
        for (wire, body) in cases {
            assert_eq!(chunked(wire.as_bytes()).unwrap(), body.as_bytes(), "{wire:?}");
        }
    }

    #[test]
    fn chunked_malformed() {
        for bad in [
            &b"\r\nabc\r\n0\r\n\r\n"[..],         // empty size
            b"x\r\nabc\r\n0\r\n\r\n",             // not hex
            b"-3\r\nabc\r\n0\r\n\r\n",            // sign
            b"+3\r\nabc\r\n0\r\n\r\n",            // sign
            b"0x3\r\nabc\r\n0\r\n\r\n",           // 0x prefix
            b"10000000000000000\r\n",             // 17 hex digits
            b"3\nabc\r\n0\r\n\r\n",               // bare LF
            b"3\r\nabcX\r\n0\r\n\r\n",            // data longer than size
            b"3\r\nab",                           // truncated data
            b"3\r\nabc",                          // truncated before CRLF
            b"3\r\nabc\r\n",                      // no last chunk
            b"3\r\nabc\r\n0\r\n",                 // no end of trailers
            b"3;\x00\r\nabc\r\n0\r\n\r\n",        // control char in extension
            b"3 x\r\nabc\r\n0\r\n\r\n",           // junk after size
            b"3\r\nabc\r\n0\r\nno colon\r\n\r\n", // bad trailer
            b"",                                  // nothing at all
        ] {
            assert!(chunked(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // Max-size digits parse; a huge chunk then fails as truncated, not by overflow.
        assert!(chunked(b"ffffffffffffffff\r\nabc").is_err());
        // A chunk-size line longer than the cap.
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', 5000));
        long.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert!(chunked(&long).is_err());
        // Trailers beyond the cap.
        let mut t = b"0\r\n".to_vec();
        for _ in 0..1000 {
            t.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        t.extend_from_slice(b"\r\n");
        assert!(chunked(&t).is_err());
    }

    #[test]
    fn broken_body_stays_broken() {
        let mut c = conn(b"zz\r\n", 0);
        let mut b = quick_body(&mut c, Framing::Chunked);
        let mut buf = [0u8; 16];
        assert!(b.read(&mut buf).is_err());
        assert!(b.is_broken());
        assert!(b.read(&mut buf).is_err());
        assert!(!b.drain(1000));
    }

    #[test]
    fn content_length_bodies() {
        let mut c = conn(b"hello world", 0);
        assert_eq!(body_of(&mut c, Framing::Length(5)).unwrap(), b"hello");
        assert_eq!(c.buffered(), b" world");
        let mut c = conn(b"abc", 1);
        assert!(body_of(&mut c, Framing::Length(4)).is_err());
        let mut c = conn(b"", 0);
        assert_eq!(body_of(&mut c, Framing::Length(0)).unwrap(), b"");
    }

    #[test]
    fn body_cap() {
        let mut c = conn(&[b'x'; 100], 0);
        let mut b = quick_body(&mut c, Framing::Length(100));
        assert!(matches!(read_capped(&mut b, 99), Err(None)));
        let mut c = conn(&[b'x'; 100], 7);
        let mut b = quick_body(&mut c, Framing::Length(100));
        assert_eq!(read_capped(&mut b, 100).unwrap().len(), 100);
        let mut c = conn(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", 0);
        let mut b = quick_body(&mut c, Framing::Chunked);
        assert!(matches!(read_capped(&mut b, 5), Err(None)));
    }

    #[test]
    fn drain() {
        let mut c = conn(b"0123456789NEXT", 0);
        let mut b = quick_body(&mut c, Framing::Length(10));
        assert!(b.drain(64));
        assert_eq!(c.buffered(), b"NEXT");
        let mut c = conn(b"0123456789", 0);
        let mut b = quick_body(&mut c, Framing::Length(10));
        assert!(!b.drain(5));
        let mut c = conn(b"a\r\n0123456789\r\n0\r\n\r\n", 0);
        let mut b = quick_body(&mut c, Framing::Chunked);
        assert!(!b.drain(4));
    }

    #[test]
    fn heads() {
        let raw = b"POST /GraphDriver.Get HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 9\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n{\"ID\":1}\n";
        for step in [0, 1] {
            let mut c = conn(raw, step);
            let h = c.read_head(&LIMITS).unwrap();
            assert_eq!(h.method, "POST");
            assert_eq!(h.path(), "/GraphDriver.Get");
            assert_eq!(h.query(), None);
            assert_eq!(h.framing, Framing::Length(9));
            assert!(h.keep_alive);
            assert_eq!(body_of(&mut c, h.framing).unwrap(), b"{\"ID\":1}\n");
        }
        let mut c = conn(b"POST /GraphDriver.ApplyDiff?id=a&parent= HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", 0);
        let h = c.read_head(&LIMITS).unwrap();
        assert_eq!(h.path(), "/GraphDriver.ApplyDiff");
        assert_eq!(h.query(), Some("id=a&parent="));
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.keep_alive);
        // HTTP/1.0: close unless keep-alive asked for.
        let h = conn(b"POST /x HTTP/1.0\r\n\r\n", 0).read_head(&LIMITS).unwrap();
        assert!(!h.keep_alive);
        assert_eq!(h.framing, Framing::Length(0));
        let h = conn(b"POST /x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 0)
            .read_head(&LIMITS)
            .unwrap();
        assert!(h.keep_alive);
        let h = conn(
            b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            0,
        )
        .read_head(&LIMITS)
        .unwrap();
        assert!(h.expect_continue);
        // Repeated identical Content-Length is fine.
        let h = conn(
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n",
            0,
        )
        .read_head(&LIMITS)
        .unwrap();
        assert_eq!(h.framing, Framing::Length(3));
    }

    #[test]
    fn bad_heads() {
        let malformed = |raw: &[u8]| matches!(conn(raw, 0).read_head(&LIMITS), Err(HeadError::Malformed(_)));
        assert!(malformed(
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"
        ));
        assert!(malformed(b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"));
        assert!(malformed(b"POST /x HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n"));
        assert!(malformed(
            b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"
        ));
        assert!(malformed(
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(malformed(b"POST /x HTTP/2.0\r\n\r\n"));
        assert!(malformed(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"));
        assert!(malformed(b"POST /x HTTP/1.1\r\nBad Header: x\r\n\r\n"));
        let unsupported = |raw: &[u8]| {
            matches!(
                conn(raw, 0).read_head(&LIMITS),
                Err(HeadError::UnsupportedTransferEncoding)
            )
        };
        assert!(unsupported(
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        ));
        assert!(unsupported(
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
        ));
        assert!(unsupported(
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"
        ));
        // Too many headers.
        let mut raw = b"POST /x HTTP/1.1\r\n".to_vec();
        for i in 0..9 {
            raw.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        assert!(matches!(
            conn(&raw, 0).read_head(&LIMITS),
            Err(HeadError::TooLarge(_))
        ));
        // Head over 16 KiB, complete or not.
        let mut raw = b"POST /x?id=".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 20_000));
        assert!(matches!(
            conn(&raw, 0).read_head(&LIMITS),
            Err(HeadError::TooLarge(_))
        ));
        raw.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        assert!(matches!(
            conn(&raw, 3).read_head(&LIMITS),
            Err(HeadError::TooLarge(_))
        ));
        // End of input: nothing, or half a head.
        assert!(matches!(conn(b"", 0).read_head(&LIMITS), Err(HeadError::Closed)));
        assert!(matches!(
            conn(b"POST /x HTT", 0).read_head(&LIMITS),
            Err(HeadError::Closed)
        ));
    }

    #[test]
    fn pipelined_requests() {
        let raw = b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nPOST /c HTTP/1.1\r\n\r\n";
        for step in [0, 1, 5] {
            let mut c = conn(raw, step);
            let mut seen = Vec::new();
            while let Ok(h) = c.read_head(&LIMITS) {
                let body = body_of(&mut c, h.framing).unwrap();
                seen.push((h.target.clone(), body));
            }
            assert_eq!(
                seen,
                vec![
                    ("/a".into(), b"{}".to_vec()),
                    ("/b".into(), b"{}".to_vec()),
                    ("/c".into(), vec![])
                ]
            );
        }
    }

    #[test]
    fn head_leading_empty_lines_are_skipped() {
        let h = conn(b"\r\nPOST /x HTTP/1.1\r\n\r\n", 0)
            .read_head(&LIMITS)
            .unwrap();
        assert_eq!(h.target, "/x");
    }

    #[test]
    fn query_parsing() {
        assert_eq!(
            parse_query("id=abc&parent=").unwrap(),
            vec![("id".into(), "abc".into()), ("parent".into(), String::new())]
        );
        assert_eq!(
            parse_query("id=..%2F..%2Fetc").unwrap(),
            vec![("id".into(), "../../etc".into())]
        );
        assert_eq!(
            parse_query("id=a+b&&x").unwrap(),
            vec![("id".into(), "a b".into()), ("x".into(), String::new())]
        );
        assert_eq!(parse_query("id=%00").unwrap(), vec![("id".into(), "\0".into())]);
        assert_eq!(parse_query("").unwrap(), vec![]);
        assert_eq!(parse_query("id=a&id=b").unwrap().len(), 2);
        for bad in ["id=%", "id=%2", "id=%zz", "id=%ff", "%G0=1"] {
            assert!(parse_query(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunked_writer() {
        let mut out = Vec::new();
        let mut w = ChunkedWriter::new(&mut out, true);
        w.write_all(b"hello").unwrap();
        w.write_all(&[b'x'; OUT_CHUNK + 1]).unwrap();
        w.finish().unwrap();
        let mut c = conn(&out, 0);
        let body = body_of(&mut c, Framing::Chunked).unwrap();
        assert_eq!(body.len(), 5 + OUT_CHUNK + 1);
        assert!(out.ends_with(b"\r\n0\r\n\r\n"));
        // Without finish: no terminating chunk.
        let mut out = Vec::new();
        let mut w = ChunkedWriter::new(&mut out, true);
        w.write_all(b"abc").unwrap();
        w.flush().unwrap();
        drop(w);
        assert_eq!(out, b"3\r\nabc\r\n");
    }

    #[test]
    fn responses() {
        let r = response_head(
            false,
            500,
            Some("application/json"),
            ResponseFraming::Length(11),
            &[("Allow", "POST")],
            true,
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 11\r\nAllow: POST\r\nConnection: close\r\n\r\n"
        );
        let r = response_head(true, 404, None, ResponseFraming::Close, &[], true);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.0 404 Not Found\r\nConnection: close\r\n\r\n"
        );
    }
}
