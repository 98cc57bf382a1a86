//! Docker plugin protocol for lamina: wire types, router, and the plugin socket served by the
//! blocking HTTP/1.1 server of [`lamina_http`].
//!
//! Modules: [`wire`] (JSON shapes), [`graphdriver`] and [`volumedriver`] (the driver traits),
//! [`router`] (endpoint dispatch, id validation, the per-call [`Observer`] hook), [`server`] (the
//! router as the server's handler).
//!
//! Requests are served concurrently and nothing in this crate holds a lock around a driver
//! call: dockerd streams `GraphDriver.Diff` on one connection into `GraphDriver.ApplyDiff` on
//! another, and a global lock would deadlock that. JSON bodies are capped at 1 MiB (refused
//! without reading the rest); the server's own limits and timeouts are in [`ServerConfig`].
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
pub mod router;
pub mod server;
pub mod volumedriver;
pub mod wire;

pub use error::{ErrorKind, PluginError};
pub use graphdriver::{CreateRequest, DiffStream, FileChange, GraphDriver, IdMapEntry, InitRequest};
pub use lamina_http::{bind_socket, bind_socket_with_mode, ServerConfig, ShutdownHandle};
pub use router::{validate_id, Observer, Router, OBSERVED_CALLS};
pub use server::{handle_connection, serve, serve_with_config};
pub use volumedriver::{Scope, VolumeDriver, VolumeInfo};
