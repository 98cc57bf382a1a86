//! The plugin socket on the [`lamina_http`] server: the [`Router`] is its handler, refusals are
//! answered in the plugin protocol's error shape.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use lamina_http::{Body, Handler, Refusal, RequestHead, Response, ServerConfig, ShutdownHandle};

use crate::error::{ErrorKind, PluginError};
use crate::router::{Router, JSON_CONTENT_TYPE};
use crate::wire;

impl Handler for Router {
    fn handle<'h>(&'h self, head: &RequestHead, body: &mut Body<'_>) -> Response<'h> {
        Router::handle(self, head, body)
    }

    fn refuse(&self, refusal: &Refusal) -> Response<'static> {
        let kind = if refusal.unsupported() {
            ErrorKind::Unsupported
        } else {
            ErrorKind::InvalidArgument
        };
        let err = PluginError::new(kind, refusal.message.clone());
        Response::full(refusal.status, Some(JSON_CONTENT_TYPE), wire::encode_error(&err)).closing()
    }
}

/// The server configuration of the plugin socket: [`ServerConfig::default`], named `plugin`.
pub fn plugin_config() -> ServerConfig {
    ServerConfig {
        name: "plugin",
        ..ServerConfig::default()
    }
}

/// Serves the plugin socket with [`plugin_config`] until `shutdown` is requested (see
/// [`lamina_http::serve_with_config`]).
pub fn serve(listener: UnixListener, router: Arc<Router>, shutdown: &ShutdownHandle) -> io::Result<()> {
    lamina_http::serve_with_config(listener, router, shutdown, plugin_config())
}

/// Serves the plugin socket with `cfg` until `shutdown` is requested.
pub fn serve_with_config(
    listener: UnixListener,
    router: Arc<Router>,
    shutdown: &ShutdownHandle,
    cfg: ServerConfig,
) -> io::Result<()> {
    lamina_http::serve_with_config(listener, router, shutdown, cfg)
}

/// Serves every request of one connection given as an in-memory (or any) byte stream, without
/// timeouts. Used by the fuzz target and tests; [`serve`] uses the same code path.
pub fn handle_connection<S: Read + Write>(stream: S, router: &Router) {
    lamina_http::handle_connection(stream, router);
}
