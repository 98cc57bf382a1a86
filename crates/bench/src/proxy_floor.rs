//! The proxy floor of the `snapshotter` workload: a snapshotter that keeps its snapshots in memory and does no
//! storage work, served by lamina's own snapshots service (`lamina_snapshotter::serve`, the server lamina runs)
//! on a socket of its own, on one I/O thread as in the daemon. containerd reaches it as a second proxy plugin,
//! so a call through containerd to it costs what every proxied call costs (containerd's metadata, its proxy
//! client, the gRPC hop, the service's dispatch) and nothing of lamina's store.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use lamina_snapshotter::{
    Code, Info, Kind, LabelChange, Labels, Mount, Observer, Result, SnapshotError, Snapshotter, Usage,
};
use tokio::sync::oneshot;

/// The proxy plugin's name in containerd's config (and the report's subject).
pub const FLOOR_NAME: &str = "proxy-floor";

/// One snapshot.
struct Snap {
    id: u64,
    info: Info,
    /// Ids of the committed snapshots below, nearest first (the lower directories of its mount).
    lowers: Arc<Vec<u64>>,
    children: usize,
}

#[derive(Default)]
struct State {
    next: u64,
    /// By (snapshotter, key).
    snaps: HashMap<(String, String), Snap>,
}

/// Snapshots in memory; mounts that name directories no one makes.
#[derive(Default)]
pub struct MemorySnapshotter {
    state: Mutex<State>,
}

fn dir(id: u64) -> String {
    format!("/nonexistent/proxy-floor/{id}")
}

fn conflict(what: impl Into<String>) -> SnapshotError {
    SnapshotError::new(Code::FailedPrecondition, what)
}

impl MemorySnapshotter {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create(&self, sn: &str, key: &str, parent: &str, labels: Labels, kind: Kind) -> Result<Vec<Mount>> {
        let mut st = self.state();
        let k = (sn.to_string(), key.to_string());
        if st.snaps.contains_key(&k) {
            return Err(SnapshotError::new(Code::AlreadyExists, format!("snapshot {key}")));
        }
        let lowers = if parent.is_empty() {
            Arc::new(Vec::new())
        } else {
            let p = st
                .snaps
                .get_mut(&(sn.to_string(), parent.to_string()))
                .ok_or_else(|| SnapshotError::not_found(format!("parent {parent}")))?;
            if p.info.kind != Kind::Committed {
                return Err(conflict(format!("parent {parent} is not committed")));
            }
            p.children += 1;
            let mut l = Vec::with_capacity(p.lowers.len() + 1);
            l.push(p.id);
            l.extend(p.lowers.iter().copied());
            Arc::new(l)
        };
        st.next += 1;
        let now = SystemTime::now();
        let snap = Snap {
            id: st.next,
            info: Info {
                name: key.to_string(),
                parent: parent.to_string(),
                kind,
                created: now,
                updated: now,
                labels,
            },
            lowers,
            children: 0,
        };
        let mounts = mounts_of(&snap);
        st.snaps.insert(k, snap);
        Ok(mounts)
    }
}

/// Mounts of the shape lamina gives: a bind of a base layer, an overlay of the lower directories otherwise.
fn mounts_of(s: &Snap) -> Vec<Mount> {
    let rw = s.info.kind == Kind::Active;
    if s.lowers.is_empty() || (!rw && s.lowers.len() == 1) {
        let source = if rw { dir(s.id) } else { dir(s.lowers[0]) };
        let mode = if rw { "rw" } else { "ro" };
        return vec![Mount {
            kind: "bind".into(),
            source: format!("{source}/diff"),
            options: vec![mode.into(), "rbind".into()],
        }];
    }
    let lowers: Vec<String> = s.lowers.iter().map(|&n| format!("{}/diff", dir(n))).collect();
    let mut options = vec!["index=off".to_string()];
    if rw {
        options.push(format!("workdir={}/work", dir(s.id)));
        options.push(format!("upperdir={}/diff", dir(s.id)));
    } else {
        options.push("ro".into());
    }
    options.push(format!("lowerdir={}", lowers.join(":")));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

impl Snapshotter for MemorySnapshotter {
    fn prepare(&self, sn: &str, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(sn, key, parent, labels, Kind::Active)
    }

    fn view(&self, sn: &str, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(sn, key, parent, labels, Kind::View)
    }

    fn mounts(&self, sn: &str, key: &str) -> Result<Vec<Mount>> {
        let st = self.state();
        let s = st
            .snaps
            .get(&(sn.to_string(), key.to_string()))
            .ok_or_else(|| SnapshotError::not_found(format!("snapshot {key}")))?;
        if s.info.kind == Kind::Committed {
            return Err(conflict(format!("{key} is committed")));
        }
        Ok(mounts_of(s))
    }

    fn mounts_now(&self, sn: &str, key: &str) -> Option<Result<Vec<Mount>>> {
        Some(self.mounts(sn, key))
    }

    fn commit(&self, sn: &str, name: &str, key: &str, labels: Labels) -> Result<()> {
        let mut st = self.state();
        let to = (sn.to_string(), name.to_string());
        if st.snaps.contains_key(&to) {
            return Err(SnapshotError::new(
                Code::AlreadyExists,
                format!("snapshot {name}"),
            ));
        }
        let from = (sn.to_string(), key.to_string());
        match st.snaps.get(&from) {
            None => return Err(SnapshotError::not_found(format!("snapshot {key}"))),
            Some(s) if s.info.kind != Kind::Active => return Err(conflict(format!("{key} is not active"))),
            Some(_) => {}
        }
        let mut s = st.snaps.remove(&from).expect("checked above");
        s.info.name = name.to_string();
        s.info.kind = Kind::Committed;
        s.info.labels = labels;
        s.info.updated = SystemTime::now();
        st.snaps.insert(to, s);
        Ok(())
    }

    fn remove(&self, sn: &str, key: &str) -> Result<()> {
        let mut st = self.state();
        let k = (sn.to_string(), key.to_string());
        match st.snaps.get(&k) {
            None => return Err(SnapshotError::not_found(format!("snapshot {key}"))),
            Some(s) if s.children > 0 => return Err(conflict(format!("{key} has children"))),
            Some(_) => {}
        }
        let s = st.snaps.remove(&k).expect("checked above");
        if !s.info.parent.is_empty() {
            if let Some(p) = st.snaps.get_mut(&(sn.to_string(), s.info.parent)) {
                p.children -= 1;
            }
        }
        Ok(())
    }

    fn stat(&self, sn: &str, key: &str) -> Result<Info> {
        self.state()
            .snaps
            .get(&(sn.to_string(), key.to_string()))
            .map(|s| s.info.clone())
            .ok_or_else(|| SnapshotError::not_found(format!("snapshot {key}")))
    }

    fn update(&self, sn: &str, name: &str, change: &LabelChange) -> Result<Info> {
        let mut st = self.state();
        let s = st
            .snaps
            .get_mut(&(sn.to_string(), name.to_string()))
            .ok_or_else(|| SnapshotError::not_found(format!("snapshot {name}")))?;
        change.apply(&mut s.info.labels);
        s.info.updated = SystemTime::now();
        Ok(s.info.clone())
    }

    fn list(&self, sn: &str) -> Result<Vec<Info>> {
        Ok(self
            .state()
            .snaps
            .iter()
            .filter(|((s, _), _)| s == sn)
            .map(|(_, s)| s.info.clone())
            .collect())
    }

    fn usage(&self, sn: &str, key: &str) -> Result<Usage> {
        self.stat(sn, key).map(|_| Usage::default())
    }

    fn cleanup(&self, _sn: &str) -> Result<()> {
        Ok(())
    }
}

/// A [`MemorySnapshotter`] served on a unix socket until dropped.
pub struct FloorServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    served: ServedTimes,
}

/// The time the floor's service took for each call that succeeded, from its dispatch to the backend until the
/// answer came back (the span lamina's latency histograms time for lamina), by RPC.
#[derive(Clone, Default)]
pub struct ServedTimes(Arc<Mutex<HashMap<&'static str, Vec<Duration>>>>);

impl ServedTimes {
    fn times(&self) -> MutexGuard<'_, HashMap<&'static str, Vec<Duration>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observer(&self) -> Observer {
        let times = self.clone();
        Arc::new(move |rpc, ok, took| {
            if ok {
                times.times().entry(rpc).or_default().push(took);
            }
        })
    }

    /// Forgets every time kept so far.
    pub fn clear(&self) {
        self.times().clear();
    }

    /// The times of `rpc` kept since the last [`ServedTimes::clear`], and forgets them.
    pub fn take(&self, rpc: &str) -> Vec<Duration> {
        self.times().remove(rpc).unwrap_or_default()
    }
}

impl FloorServer {
    /// Binds `socket` and serves there on a thread of its own with a single-threaded runtime (as the daemon
    /// serves its snapshotter socket; calls still run on that runtime's blocking pool).
    pub fn start(socket: &Path) -> anyhow::Result<FloorServer> {
        let listener = UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let backend: Arc<dyn Snapshotter> = Arc::new(MemorySnapshotter::default());
        let served = ServedTimes::default();
        let observer = Some(served.observer());
        let thread = std::thread::Builder::new()
            .name("proxy-floor".into())
            .spawn(move || {
                rt.block_on(lamina_snapshotter::serve(listener, backend, observer, async {
                    let _ = stopped.await;
                }))
            })?;
        Ok(FloorServer {
            stop: Some(stop),
            thread: Some(thread),
            served,
        })
    }

    /// The service's time for each call, as lamina's histograms time lamina's.
    pub fn served(&self) -> &ServedTimes {
        &self.served
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_commit_remove_in_memory() {
        let s = MemorySnapshotter::default();
        let m = s.prepare("f", "a", "", Labels::new()).unwrap();
        assert_eq!(m[0].kind, "bind");
        s.commit("f", "a-c", "a", Labels::new()).unwrap();
        let m = s.prepare("f", "b", "a-c", Labels::new()).unwrap();
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(s.mounts("f", "b").unwrap(), m);
        assert_eq!(
            s.prepare("f", "b", "a-c", Labels::new()).unwrap_err().code,
            Code::AlreadyExists
        );
        assert_eq!(s.remove("f", "a-c").unwrap_err().code, Code::FailedPrecondition);
        s.remove("f", "b").unwrap();
        s.remove("f", "a-c").unwrap();
        assert!(s.list("f").unwrap().is_empty());
    }
}
