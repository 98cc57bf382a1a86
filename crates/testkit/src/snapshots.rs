//! A blocking client of the containerd snapshots API on a snapshotter socket.

use std::collections::HashMap;
use std::path::Path;

use lamina_snapshotter::proto::containerd::services::snapshots::v1 as pb;
use lamina_snapshotter::proto::containerd::types::Mount;
use lamina_snapshotter::tonic::{transport::Channel, Response, Status};
use pb::snapshots_client::SnapshotsClient;

/// The snapshotter name lamina serves by default.
pub const SN: &str = "lamina";

/// Labels as the API carries them.
pub fn labels_map(labels: &[(&str, &str)]) -> HashMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The snapshots API, each call blocking on its own runtime; calls go to the snapshotter [`SN`] unless named.
pub struct SnapshotApi {
    pub rt: tokio::runtime::Runtime,
    pub client: SnapshotsClient<Channel>,
}

impl SnapshotApi {
    /// Connects to the snapshotter socket; panics when it cannot.
    pub fn connect(socket: &Path) -> SnapshotApi {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = rt
            .block_on(lamina_snapshotter::client::connect(socket))
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        SnapshotApi { rt, client }
    }

    /// Runs one call on a clone of the client; the response's message.
    pub fn call<R>(
        &self,
        f: impl AsyncFnOnce(&mut SnapshotsClient<Channel>) -> Result<Response<R>, Status>,
    ) -> Result<R, Status> {
        let mut c = self.client.clone();
        self.rt.block_on(f(&mut c)).map(Response::into_inner)
    }

    /// Prepare on the snapshotter `sn`, with labels; the mounts.
    pub fn prepare_in(
        &self,
        sn: &str,
        key: &str,
        parent: &str,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Mount>, Status> {
        let req = pb::PrepareSnapshotRequest {
            snapshotter: sn.into(),
            key: key.into(),
            parent: parent.into(),
            labels: labels_map(labels),
        };
        self.call(async |c| c.prepare(req).await).map(|r| r.mounts)
    }

    /// Prepare without labels; the mounts.
    pub fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.prepare_in(SN, key, parent, &[])
    }

    /// View without labels; the mounts.
    pub fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        let req = pb::ViewSnapshotRequest {
            snapshotter: SN.into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        self.call(async |c| c.view(req).await).map(|r| r.mounts)
    }

    /// The mounts of `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status> {
        let req = pb::MountsRequest {
            snapshotter: SN.into(),
            key: key.into(),
        };
        self.call(async |c| c.mounts(req).await).map(|r| r.mounts)
    }

    /// Commit with labels and the parent field set.
    pub fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
        parent: &str,
    ) -> Result<(), Status> {
        let req = pb::CommitSnapshotRequest {
            snapshotter: SN.into(),
            name: name.into(),
            key: key.into(),
            labels,
            parent: parent.into(),
        };
        self.call(async |c| c.commit(req).await).map(|_| ())
    }

    /// Commit without labels.
    pub fn commit(&self, name: &str, key: &str) -> Result<(), Status> {
        self.commit_with(name, key, HashMap::new(), "")
    }

    pub fn remove(&self, key: &str) -> Result<(), Status> {
        let req = pb::RemoveSnapshotRequest {
            snapshotter: SN.into(),
            key: key.into(),
        };
        self.call(async |c| c.remove(req).await).map(|_| ())
    }

    /// Stat; the info.
    pub fn stat(&self, key: &str) -> Result<pb::Info, Status> {
        let req = pb::StatSnapshotRequest {
            snapshotter: SN.into(),
            key: key.into(),
        };
        self.call(async |c| c.stat(req).await)
            .map(|r| r.info.expect("info"))
    }
}
