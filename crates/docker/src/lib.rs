//! Docker plugin protocol for lamina: wire types, router and a small HTTP/1.1 server on a unix socket.
//!
//! Modules: [`http`] (request heads, `Content-Length`/chunked bodies as `Read`, responses),
//! [`wire`] (JSON shapes), [`volumedriver`] (the VolumeDriver trait and its JSON shapes), [`router`]
//! (endpoint dispatch and id validation), [`server`] (accept loop, connection threads, shutdown,
//! socket binding).
//!
//! # Design: no async runtime
//!
//! The layer store and the tar code are synchronous, and a plugin socket sees a handful of
//! connections from one dockerd. So the server is a plain blocking HTTP/1.1 server built on
//! `std`: a [`std::os::unix::net::UnixListener`] accept loop, one thread per connection (bounded
//! by [`ServerConfig::max_connections`]), keep-alive, and `httparse` for the request head. No
//! tokio, hyper or axum.
//!
//! Requests are served concurrently and nothing in this crate holds a lock around a driver
//! call: dockerd streams `GraphDriver.Diff` on one connection into `GraphDriver.ApplyDiff` on
//! another, and a global lock would deadlock that.
//!
//! Defences against slow or hostile clients (all in [`ServerConfig`]): a 16 KiB / 64-header cap on
//! request heads; 60 s idle timeout between requests; 30 s to complete a head once it started and
//! to receive a JSON body; JSON bodies capped at 1 MiB (refused without reading the rest, then the
//! connection is closed); streamed ApplyDiff bodies only time out after 5 min without a byte;
//! writes time out after 5 min without progress; at the connection cap the longest-idle
//! connection (including ones trickling a head) is closed to make room.
//!
//! # Using it
//!
//! ```no_run
//! use std::sync::Arc;
//! use lamina_docker::{bind_socket, serve, GraphDriver, Router, ShutdownHandle};
//!
//! fn run(driver: Arc<dyn GraphDriver>) -> std::io::Result<()> {
//!     let listener = bind_socket("/run/docker/plugins/lamina.sock")?;
//!     let router = Arc::new(Router::new().with_graph_driver(driver));
//!     let shutdown = ShutdownHandle::new();
//!     // e.g. signal_hook::flag::register(SIGTERM, shutdown.flag()), or shutdown.shutdown() from any thread.
//!     serve(listener, router, &shutdown)
//! }
//! ```
#![forbid(unsafe_code)]

pub mod error;
pub mod graphdriver;
pub mod http;
pub mod router;
pub mod server;
pub mod volumedriver;
pub mod wire;

pub use error::{ErrorKind, PluginError};
pub use graphdriver::{CreateRequest, DiffStream, FileChange, GraphDriver, IdMapEntry, InitRequest};
pub use router::{validate_id, Router};
pub use server::{bind_socket, handle_connection, serve, serve_with_config, ServerConfig, ShutdownHandle};
pub use volumedriver::{Scope, VolumeDriver, VolumeInfo};
