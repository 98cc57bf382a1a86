//! What a [`Handler`] answers: a status, a content type, extra headers and a body that is either
//! complete or streamed.

use std::io::Write;

use crate::message::{response_head, Body, RequestHead, ResponseFraming};

/// Serves the requests of one server: [`crate::serve`] reads a request head, hands it and the
/// body to [`Handler::handle`], and writes the answer.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. The body is read (or not) from `body`; what is left of it is
    /// drained (a little) or the connection is closed.
    fn handle<'h>(&'h self, head: &RequestHead, body: &mut Body<'_>) -> Response<'h>;

    /// The answer to a request the server refuses by itself: a malformed, oversized or too slow
    /// request head (`status` 400, 408, 431), or a transfer coding it does not implement (501).
    fn refuse(&self, refusal: &Refusal) -> Response<'static>;
}

/// Why the server refused a request before it reached the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 408, 431 or 501.
    pub status: u16,
    /// What was wrong, for the answer's body.
    pub message: String,
}

impl Refusal {
    /// Whether the refused request used a feature the server does not implement (else it was a
    /// bad or slow request).
    pub fn unsupported(&self) -> bool {
        self.status == 501
    }
}

/// A streamed response body.
pub trait StreamBody {
    /// Writes the whole body to `out`. On error the response is cut (never ended cleanly), so the
    /// client sees a truncated stream.
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<(), StreamError>;
}

/// Why a streamed body stopped early (logged by the server).
pub type StreamError = Box<dyn std::error::Error + Send + Sync>;

/// A response body.
pub enum ResponseBody<'h> {
    /// Sent with `Content-Length`.
    Full(Vec<u8>),
    /// Sent chunked to HTTP/1.1 clients, else delimited by closing the connection.
    Stream(Box<dyn StreamBody + 'h>),
}

/// One response.
pub struct Response<'h> {
    /// The status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<&'static str>,
    /// More headers (e.g. `Allow: POST`).
    pub headers: Vec<(&'static str, &'static str)>,
    /// The body.
    pub body: ResponseBody<'h>,
    /// Close the connection after this response, without reading the rest of the request body
    /// (a stream body is then delimited by the close).
    pub close: bool,
    /// Answer as HTTP/1.0 (status line `HTTP/1.0`, one request per connection).
    pub http10: bool,
}

impl<'h> Response<'h> {
    /// A complete response.
    pub fn full(status: u16, content_type: Option<&'static str>, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: ResponseBody::Full(body),
            close: false,
            http10: false,
        }
    }

    /// A `200` response with a streamed body.
    pub fn stream(content_type: &'static str, body: Box<dyn StreamBody + 'h>) -> Self {
        Response {
            status: 200,
            content_type: Some(content_type),
            headers: Vec::new(),
            body: ResponseBody::Stream(body),
            close: false,
            http10: false,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Closes the connection after this response.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// Answers as HTTP/1.0 and closes the connection.
    pub fn http10(mut self) -> Self {
        self.http10 = true;
        self.close = true;
        self
    }

    /// Takes the body out, for the server to write after the head (an empty one is left).
    pub(crate) fn take_body(&mut self) -> ResponseBody<'h> {
        std::mem::replace(&mut self.body, ResponseBody::Full(Vec::new()))
    }

    /// The head of this response under `status` (its own, or that of the refusal it answers), its body
    /// framed by `framing`, with `Connection: close` if `close`.
    pub(crate) fn head(&self, status: u16, framing: ResponseFraming, close: bool) -> Vec<u8> {
        response_head(
            self.http10,
            status,
            self.content_type,
            framing,
            &self.headers,
            close,
        )
    }
}
