//! The tonic service: checks requests, runs the backend on the blocking pool, maps errors once, and
//! reports each call to the [`Observer`].

use std::future::Future;
use std::os::unix::net::UnixListener;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::error::{Code, SnapshotError};
use crate::filter::Filter;
use crate::model::{
    check_key, check_labels, without_empty, Info, Kind, LabelChange, Labels, Mount, Snapshotter,
};
use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::types as pbt;

/// Call ids of the snapshotter socket, for the `request{rid=N op=...}` log span.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(0);

/// Infos per `List` response message.
pub const LIST_BATCH: usize = 100;

/// Told of every call that reached the backend once it is over: the RPC (`Prepare`), whether it
/// succeeded, and how long it took.
pub type Observer = Arc<dyn Fn(&'static str, bool, Duration) + Send + Sync>;

/// The RPCs reported to an [`Observer`].
pub const OBSERVED_CALLS: &[&str] = &[
    "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage", "Cleanup",
];

/// The gRPC service over a [`Snapshotter`].
pub struct SnapshotsService {
    backend: Arc<dyn Snapshotter>,
    observer: Option<Observer>,
}

impl SnapshotsService {
    /// Serves `backend`.
    pub fn new(backend: Arc<dyn Snapshotter>) -> Self {
        SnapshotsService {
            backend,
            observer: None,
        }
    }

    /// Reports every call to `observer` (metrics).
    pub fn with_observer(mut self, observer: Option<Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Runs one call of RPC `rpc` (logged as `op`) on the blocking pool.
    async fn run<T, F>(&self, rpc: &'static str, op: &'static str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Snapshotter) -> crate::Result<T> + Send + 'static,
    {
        let started = self.observer.as_ref().map(|_| Instant::now());
        let out = self.run_blocking(op, f).await;
        if let (Some(observer), Some(t0)) = (&self.observer, started) {
            observer(rpc, out.is_ok(), t0.elapsed());
        }
        out
    }

    async fn run_blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Snapshotter) -> crate::Result<T> + Send + 'static,
    {
        let backend = self.backend.clone();
        let span = request_span(op);
        let inner = span.clone();
        let out = tokio::task::spawn_blocking(move || inner.in_scope(|| f(backend.as_ref())))
            .await
            .map_err(|e| Status::internal(format!("{op}: worker failed: {e}")))?;
        out.map_err(|e| {
            span.in_scope(|| debug!(op, code = ?e.code, error = %e.message, "request failed"));
            Status::from(e)
        })
    }
}

/// The span of one call: every log line of the call carries its id.
fn request_span(op: &'static str) -> tracing::Span {
    tracing::info_span!(
        "request",
        rid = REQUEST_IDS.fetch_add(1, Ordering::Relaxed) + 1,
        op
    )
}

fn labels_in(labels: std::collections::HashMap<String, String>) -> crate::Result<Labels> {
    let labels: Labels = labels.into_iter().collect();
    check_labels(&labels)?;
    Ok(without_empty(&labels))
}

fn parent_in(parent: &str) -> crate::Result<()> {
    if parent.is_empty() {
        Ok(())
    } else {
        check_key("parent", parent)
    }
}

fn mounts_out(mounts: Vec<Mount>) -> Vec<pbt::Mount> {
    mounts
        .into_iter()
        .map(|m| pbt::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn time_out(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn info_out(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: match info.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(time_out(info.created)),
        updated_at: Some(time_out(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        check_key("key", &r.key)?;
        parent_in(&r.parent)?;
        let labels = labels_in(r.labels)?;
        let mounts = self
            .run("Prepare", "prepare", move |b| {
                b.prepare(&r.snapshotter, &r.key, &r.parent, labels)
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        check_key("key", &r.key)?;
        parent_in(&r.parent)?;
        let labels = labels_in(r.labels)?;
        let mounts = self
            .run("View", "view", move |b| {
                b.view(&r.snapshotter, &r.key, &r.parent, labels)
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn mounts(&self, req: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        check_key("key", &r.key)?;
        // Answered here when the backend has it in memory: no hop to the blocking pool and back.
        let started = Instant::now();
        let mounts = match self.backend.mounts_now(&r.snapshotter, &r.key) {
            Some(out) => {
                if let Some(observer) = &self.observer {
                    observer("Mounts", out.is_ok(), started.elapsed());
                }
                out.map_err(|e| {
                    request_span("mounts").in_scope(
                        || debug!(op = "mounts", code = ?e.code, error = %e.message, "request failed"),
                    );
                    Status::from(e)
                })?
            }
            None => {
                self.run("Mounts", "mounts", move |b| b.mounts(&r.snapshotter, &r.key))
                    .await?
            }
        };
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn commit(&self, req: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        check_key("name", &r.name)?;
        check_key("key", &r.key)?;
        if !r.parent.is_empty() {
            return Err(SnapshotError::new(
                Code::Unimplemented,
                "commit onto a new parent (rebase) is not supported; do not declare the rebase capability",
            )
            .into());
        }
        let labels = labels_in(r.labels)?;
        self.run("Commit", "commit", move |b| {
            b.commit(&r.snapshotter, &r.name, &r.key, labels)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        check_key("key", &r.key)?;
        self.run("Remove", "remove", move |b| b.remove(&r.snapshotter, &r.key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        check_key("key", &r.key)?;
        let info = self
            .run("Stat", "stat", move |b| b.stat(&r.snapshotter, &r.key))
            .await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_out(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| SnapshotError::invalid("update needs the snapshot's info"))?;
        check_key("name", &info.name)?;
        let labels: Labels = info.labels.into_iter().collect();
        check_labels(&labels)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let change = LabelChange::from_request(&labels, &paths)?;
        let name = info.name;
        let info = self
            .run("Update", "update", move |b| {
                b.update(&r.snapshotter, &name, &change)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_out(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let filter = Filter::parse_all(&r.filters)?;
        let infos = self.run("List", "list", move |b| b.list(&r.snapshotter)).await?;
        let mut batches = Vec::new();
        let mut batch = Vec::new();
        for info in infos.into_iter().filter(|i| filter.matches(i)) {
            batch.push(info_out(info));
            if batch.len() == LIST_BATCH {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: std::mem::take(&mut batch),
                }));
            }
        }
        if !batch.is_empty() {
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, req: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        check_key("key", &r.key)?;
        let u = self
            .run("Usage", "usage", move |b| b.usage(&r.snapshotter, &r.key))
            .await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run("Cleanup", "cleanup", move |b| b.cleanup(&r.snapshotter))
            .await?;
        Ok(Response::new(()))
    }
}

/// Serves `backend` on an already bound unix socket until `shutdown` completes, reporting calls to
/// `observer`. Must run inside a tokio runtime with I/O and time enabled.
pub async fn serve(
    listener: UnixListener,
    backend: Arc<dyn Snapshotter>,
    observer: Option<Observer>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let svc =
        pb::snapshots_server::SnapshotsServer::new(SnapshotsService::new(backend).with_observer(observer));
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(svc, incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}
