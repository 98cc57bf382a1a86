//! A client for the service over a unix socket (tests, benchmarks, tools).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;

/// Connects to a snapshots service listening on the unix socket `path`.
pub async fn connect(path: impl Into<PathBuf>) -> Result<SnapshotsClient<Channel>, tonic::transport::Error> {
    Ok(SnapshotsClient::new(channel(path).await?))
}

/// A gRPC channel to the unix socket `path` (for clients of other services on a socket, e.g. containerd's).
pub async fn channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    // The URI is required by the API and unused: the connector below dials the socket.
    Endpoint::from_static("http://lamina.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
}
