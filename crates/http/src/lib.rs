//! The one HTTP server of lamina: the Docker plugin socket, the admin socket and `/metrics`.
//!
//! Modules: [`message`] (request heads, `Content-Length`/chunked bodies as `Read`, response
//! heads, query strings), [`response`] (the [`Handler`] trait and what it answers), [`server`]
//! (accept loop, connection threads, refusals, shutdown, socket binding).
//!
//! # Design: no async runtime
//!
//! What these sockets serve is synchronous (the layer store, the tar code), and they see a
//! handful of connections. So the server is a plain blocking HTTP/1.1 server built on `std`: an
//! accept loop over a unix or TCP listener, one thread per connection (bounded by
//! [`ServerConfig::max_connections`]), keep-alive, and `httparse` for the request head. Request
//! bodies are a [`Read`](std::io::Read) the handler consumes as they arrive (an ApplyDiff streams
//! straight into the tar code); response bodies are either complete or written by the handler
//! into the connection as they are produced.
//!
//! Defences against slow or hostile clients (all in [`ServerConfig`]): a 16 KiB / 64-header cap on
//! request heads; 60 s idle timeout between requests; 30 s to complete a head once it started and
//! to receive a small body; streamed bodies only time out after 5 min without a byte; writes time
//! out after 5 min without progress; at the connection cap the longest-idle connection (including
//! ones trickling a head or a small body) is closed to make room. Every refusal is an answer
//! ([`Handler::refuse`] words it); when the client may still be sending (an oversized head or body)
//! the server reads and discards up to 64 MiB for up to 2 s after answering, so that a client that
//! writes its whole request before reading sees the answer rather than a broken pipe.
//!
//! ```no_run
//! use std::sync::Arc;
//! use lamina_http::{bind_socket, serve, Body, Handler, Refusal, RequestHead, Response, ShutdownHandle};
//!
//! struct Hello;
//!
//! impl Handler for Hello {
//!     fn handle<'h>(&'h self, _head: &RequestHead, _body: &mut Body<'_>) -> Response<'h> {
//!         Response::full(200, Some("text/plain"), b"hello\n".to_vec())
//!     }
//!     fn refuse(&self, r: &Refusal) -> Response<'static> {
//!         Response::full(r.status, Some("text/plain"), r.message.clone().into_bytes())
//!     }
//! }
//!
//! fn run() -> std::io::Result<()> {
//!     let listener = bind_socket("/run/hello.sock")?;
//!     serve(listener, Arc::new(Hello), &ShutdownHandle::new())
//! }
//! ```
#![forbid(unsafe_code)]

pub mod message;
pub mod response;
pub mod server;

pub use message::{parse_query, percent_decode, read_capped, Body, Framing, QueryError, RequestHead};
pub use response::{Handler, Refusal, Response, ResponseBody, StreamBody, StreamError};
pub use server::{
    bind_socket, bind_socket_with_mode, handle_connection, serve, serve_with_config, Connection, Listener,
    ServerConfig, ShutdownHandle, SOCKET_MODE,
};
