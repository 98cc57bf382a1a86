//! The served floor of `containers100`: a graph driver that does, per call, the least of the workload's kernel
//! floor (`FloorDir::containers`) that a driver must do while dockerd waits, plus one durable record per
//! `Create`/`Remove` (one row put or dropped in a redb database of its own, as `durable_commits`):
//!
//! - a Create commits its record and finds its layer directory (`diff`, `work`, `merged`) made before the run
//!   under its number, as lamina takes a spare made in place; the pool never runs dry during a run and is
//!   refilled between runs, untimed, where lamina refills its own on a thread during the run;
//! - the first Get of a layer with a parent mounts its overlay (once the teardown of its previous mount is
//!   over: overlayfs warns about an upper directory that another mount still uses); a Put leaves the whole
//!   unmount to a thread of its own and answers at once (lamina's Put detaches the mount itself and leaves
//!   only the sync of the upper filesystem to its thread);
//! - a Remove drops its record and renames the layer's directory into a trash emptied between runs, untimed.
//!
//! It is served by lamina's own GraphDriver protocol server (`lamina_docker::serve`) on a socket of its own. A
//! third dockerd reaches it through a timing proxy of its own, so its share of 100 × `run -d` + `rm -f` is
//! measured as lamina's is, with the same daemon, the same containers and the same load on the machine: what
//! any out-of-process driver that does this work pays.
//!
//! It keeps its layers in memory (a restart forgets them) and holds one lock around each call's work: dockerd
//! makes the workload's calls one after another. `docker import` of the image goes through `ApplyDiff`, which
//! GNU tar unpacks (untimed). Diff, Changes and DiffSize are refused: the workload needs none of them.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::Context;
use lamina_docker::{
    CreateRequest, DiffStream, ErrorKind, FileChange, GraphDriver, InitRequest, PluginError, Router,
    ShutdownHandle,
};
use lamina_sys::mount::{detach_held, mount_overlay, unmount, OverlaySpec};

/// The driver's records: `layer number -> id`.
const RECORDS: redb::TableDefinition<u64, &str> = redb::TableDefinition::new("floor-layers");

/// One layer.
struct Layer {
    n: u64,
    parent: Option<String>,
    /// Outstanding `Get`s; the overlay is mounted while there are any (a layer with a parent only).
    gets: u32,
}

#[derive(Default)]
struct State {
    next: u64,
    layers: HashMap<String, Layer>,
}

/// The floor graph driver (see the module documentation).
pub struct FloorDriver {
    /// `<root>/layers/<n>/{diff,work,merged}`, laid out as lamina lays out its layers.
    layers: PathBuf,
    /// `<root>/spare/<k>`: where layer directories made ahead are made before they are renamed into `layers/`
    /// ([`FloorDriver::make_spares`]).
    spare: PathBuf,
    /// `<root>/trash/<n>`: removed layers' directories, deleted by [`FloorDriver::empty_trash`].
    trash: PathBuf,
    /// The layer numbers whose directories were made ahead.
    spares: Mutex<std::collections::BTreeSet<u64>>,
    /// Spare directories made so far (their names in `spare/`).
    made: AtomicU64,
    db: redb::Database,
    state: Mutex<State>,
    teardowns: Teardowns,
}

/// The unmounts left by Puts to the teardown thread ([`FloorPlugin::start`]).
#[derive(Default)]
struct Teardowns {
    queue: Mutex<Option<mpsc::Sender<u64>>>,
    jobs: Mutex<Jobs>,
    /// Signalled when a teardown is over.
    done: Condvar,
}

#[derive(Default)]
struct Jobs {
    /// Layer -> where its merged view is still to be detached. The thread detaches under the entry's lock, and
    /// a Remove moves the layer's directory under it, so the path the thread detaches is always current.
    detach: HashMap<u64, Arc<Mutex<Option<PathBuf>>>>,
    /// Layer -> teardowns not over (the sync after the detach included).
    running: HashMap<u64, u32>,
}

impl Teardowns {
    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the unmount of layer `n`'s merged view `merged`; runs it in line without a thread.
    fn queue(&self, n: u64, merged: PathBuf) {
        {
            let mut jobs = self.jobs();
            jobs.detach.insert(n, Arc::new(Mutex::new(Some(merged))));
            *jobs.running.entry(n).or_default() += 1;
        }
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(queue.as_ref().map(|q| q.send(n)), Some(Ok(()))) {
            drop(queue);
            self.run(n);
        }
    }

    /// Runs the teardown of layer `n`: detaches its merged view while holding the view's root (a detach is
    /// quick), then lets go of it, which runs the sync of the upper filesystem.
    fn run(&self, n: u64) {
        let entry = self.jobs().detach.get(&n).cloned();
        let held = entry.and_then(|entry| {
            let mut path = entry.lock().unwrap_or_else(|p| p.into_inner());
            let merged = path.take()?;
            detach_held(&merged)
                .inspect_err(|e| tracing::warn!("served floor: {e}"))
                .ok()
                .flatten()
        });
        drop(held);
        let mut jobs = self.jobs();
        jobs.detach.remove(&n);
        if let Some(k) = jobs.running.get_mut(&n) {
            *k -= 1;
            if *k == 0 {
                jobs.running.remove(&n);
            }
        }
        drop(jobs);
        self.done.notify_all();
    }

    /// Returns once no teardown of layer `n` (of any layer: `None`) is running or queued.
    fn wait(&self, n: Option<u64>) {
        let mut jobs = self.jobs();
        while n.map_or(!jobs.running.is_empty(), |n| jobs.running.contains_key(&n)) {
            jobs = self.done.wait(jobs).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Renames `dir` (layer `n`'s directory) to `to`, and the merged view a queued teardown detaches with it.
    fn rename(&self, n: u64, dir: &Path, to: &Path) -> io::Result<()> {
        let entry = self.jobs().detach.get(&n).cloned();
        let Some(entry) = entry else {
            return fs::rename(dir, to);
        };
        let mut path = entry.lock().unwrap_or_else(|p| p.into_inner());
        fs::rename(dir, to)?;
        if path.is_some() {
            *path = Some(to.join("merged"));
        }
        Ok(())
    }
}

/// A detached unmount of `merged`; one that is not mounted any more is not an error.
fn detach(merged: &Path) -> Result<(), PluginError> {
    unmount(merged, true).map_err(|e| io_err("unmount", e))
}

fn io_err(what: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::new(ErrorKind::Io, format!("{what}: {e}"))
}

fn not_found(id: &str) -> PluginError {
    PluginError::new(ErrorKind::NotFound, format!("layer {id}"))
}

impl FloorDriver {
    /// A driver keeping its layers and its database under `root` (made if missing).
    pub fn new(root: &Path) -> anyhow::Result<FloorDriver> {
        let (layers, spare, trash) = (root.join("layers"), root.join("spare"), root.join("trash"));
        for d in [&layers, &spare, &trash] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let db = redb::Database::create(root.join("floor.redb"))?;
        Ok(FloorDriver {
            layers,
            spare,
            trash,
            spares: Mutex::default(),
            made: AtomicU64::new(0),
            db,
            state: Mutex::new(State::default()),
            teardowns: Teardowns::default(),
        })
    }

    /// Makes the directories of the next `count` layers ahead, each whole in `spare/` and then renamed to
    /// `layers/<n>` (untimed, between runs).
    pub fn make_spares(&self, count: usize) -> anyhow::Result<()> {
        let next = self.state().next + 1;
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        for n in next..next + count as u64 {
            if spares.contains(&n) {
                continue;
            }
            let dir = self
                .spare
                .join(format!("{:x}", self.made.fetch_add(1, Ordering::Relaxed)));
            make_tree(&dir).with_context(|| format!("make {}", dir.display()))?;
            fs::rename(&dir, self.dir(n)).with_context(|| format!("move {} into layers/", dir.display()))?;
            spares.insert(n);
        }
        Ok(())
    }

    /// Deletes the directories of removed layers (untimed, between runs), once their queued unmounts ran.
    pub fn empty_trash(&self) -> anyhow::Result<()> {
        self.teardowns.wait(None);
        for entry in fs::read_dir(&self.trash)? {
            let path = entry?.path();
            fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self, n: u64) -> PathBuf {
        self.layers.join(format!("{n:x}"))
    }

    /// One durable commit: the record of layer `n` put (`Some(id)`) or dropped (`None`).
    fn record(&self, n: u64, id: Option<&str>) -> Result<(), PluginError> {
        let db = |e: &dyn std::fmt::Display| io_err("floor record", e);
        let txn = self.db.begin_write().map_err(|e| db(&e))?;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| db(&e))?;
            match id {
                Some(id) => drop(table.insert(n, id).map_err(|e| db(&e))?),
                None => drop(table.remove(n).map_err(|e| db(&e))?),
            }
        }
        txn.commit().map_err(|e| db(&e))
    }

    /// The `diff/` directories below `parent`, nearest first.
    fn lowers(&self, st: &State, parent: &str) -> Result<Vec<PathBuf>, PluginError> {
        let mut out = Vec::new();
        let mut next = Some(parent.to_string());
        while let Some(id) = next {
            let l = st.layers.get(&id).ok_or_else(|| not_found(&id))?;
            out.push(self.dir(l.n).join("diff"));
            next = l.parent.clone();
        }
        Ok(out)
    }
}

impl GraphDriver for FloorDriver {
    fn init(&self, _req: InitRequest) -> Result<(), PluginError> {
        Ok(())
    }

    fn create(&self, req: CreateRequest, _read_write: bool) -> Result<(), PluginError> {
        let mut st = self.state();
        if st.layers.contains_key(&req.id) {
            return Err(PluginError::new(
                ErrorKind::AlreadyExists,
                format!("layer {}", req.id),
            ));
        }
        if let Some(p) = &req.parent {
            if !st.layers.contains_key(p) {
                return Err(not_found(p));
            }
        }
        st.next += 1;
        let n = st.next;
        // The record first, then the directories, as lamina orders them: made ahead, or made here.
        self.record(n, Some(&req.id))?;
        let made_ahead = self.spares.lock().unwrap_or_else(|p| p.into_inner()).remove(&n);
        if !made_ahead {
            let dir = self.dir(n);
            make_tree(&dir).map_err(|e| io_err(&format!("mkdir {}", dir.display()), e))?;
        }
        st.layers.insert(
            req.id,
            Layer {
                n,
                parent: req.parent,
                gets: 0,
            },
        );
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), PluginError> {
        let mut st = self.state();
        let Some(l) = st.layers.remove(id) else {
            return Ok(());
        };
        let dir = self.dir(l.n);
        if l.gets > 0 && l.parent.is_some() {
            detach(&dir.join("merged"))?;
        }
        self.record(l.n, None)?;
        // A teardown still queued detaches the view in the trash.
        let trashed = self.trash.join(format!("{:x}", l.n));
        self.teardowns
            .rename(l.n, &dir, &trashed)
            .map_err(|e| io_err(&format!("rename {}", dir.display()), e))
    }

    fn get(&self, id: &str, _mount_label: &str) -> Result<PathBuf, PluginError> {
        let mut st = self.state();
        let (n, parent, gets) = {
            let l = st.layers.get(id).ok_or_else(|| not_found(id))?;
            (l.n, l.parent.clone(), l.gets)
        };
        let dir = self.dir(n);
        // A layer without a parent is its own `diff/` (as overlay2 serves it); others are mounted once.
        let path = match &parent {
            None => dir.join("diff"),
            Some(p) => {
                let merged = dir.join("merged");
                if gets == 0 {
                    self.teardowns.wait(Some(n));
                    let spec = OverlaySpec {
                        lowers: self.lowers(&st, p)?,
                        upper: Some(dir.join("diff")),
                        work: Some(dir.join("work")),
                        label: None,
                        read_only: false,
                    };
                    mount_overlay(&merged, &spec).map_err(|e| io_err("mount", e))?;
                }
                merged
            }
        };
        if let Some(l) = st.layers.get_mut(id) {
            l.gets += 1;
        }
        Ok(path)
    }

    fn put(&self, id: &str) -> Result<(), PluginError> {
        let mut st = self.state();
        let l = st.layers.get_mut(id).ok_or_else(|| not_found(id))?;
        if l.gets == 0 {
            return Ok(());
        }
        l.gets -= 1;
        if l.gets == 0 && l.parent.is_some() {
            let n = l.n;
            self.teardowns.queue(n, self.dir(n).join("merged"));
        }
        Ok(())
    }

    fn exists(&self, id: &str) -> bool {
        self.state().layers.contains_key(id)
    }

    fn status(&self) -> Vec<[String; 2]> {
        vec![["Layers".into(), self.state().layers.len().to_string()]]
    }

    fn get_metadata(&self, id: &str) -> Result<BTreeMap<String, String>, PluginError> {
        if self.exists(id) {
            Ok(BTreeMap::new())
        } else {
            Err(not_found(id))
        }
    }

    fn cleanup(&self) -> Result<(), PluginError> {
        let mut st = self.state();
        let mounted: Vec<u64> = st
            .layers
            .values_mut()
            .filter(|l| l.gets > 0 && l.parent.is_some())
            .map(|l| {
                l.gets = 0;
                l.n
            })
            .collect();
        for n in mounted {
            let _ = detach(&self.dir(n).join("merged"));
        }
        Ok(())
    }

    fn diff(&self, _id: &str, _parent: &str) -> Result<Box<dyn DiffStream + '_>, PluginError> {
        Err(unsupported("Diff"))
    }

    fn changes(&self, _id: &str, _parent: &str) -> Result<Vec<FileChange>, PluginError> {
        Err(unsupported("Changes"))
    }

    fn apply_diff(&self, id: &str, _parent: &str, body: &mut dyn Read) -> Result<u64, PluginError> {
        let diff = {
            let st = self.state();
            self.dir(st.layers.get(id).ok_or_else(|| not_found(id))?.n)
                .join("diff")
        };
        let mut tar = Command::new("tar")
            .args(["-x", "--numeric-owner", "-p", "-f", "-", "-C"])
            .arg(&diff)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io_err("run tar", e))?;
        let copied = tar
            .stdin
            .take()
            .map(|mut stdin| io::copy(body, &mut stdin).and_then(|n| stdin.flush().map(|()| n)));
        let out = tar.wait_with_output().map_err(|e| io_err("tar", e))?;
        if !out.status.success() {
            return Err(io_err("tar -x", String::from_utf8_lossy(&out.stderr).trim()));
        }
        copied
            .unwrap_or(Ok(0))
            .map_err(|e| io_err("stream the layer into tar", e))
    }

    fn diff_size(&self, _id: &str, _parent: &str) -> Result<u64, PluginError> {
        Err(unsupported("DiffSize"))
    }
}

/// A layer's empty directories: `dir` with `diff`, `work` and `merged`.
fn make_tree(dir: &Path) -> io::Result<()> {
    fs::create_dir(dir)?;
    for leaf in ["diff", "work", "merged"] {
        fs::create_dir(dir.join(leaf))?;
    }
    Ok(())
}

fn unsupported(call: &str) -> PluginError {
    PluginError::new(
        ErrorKind::Unsupported,
        format!("{call}: not served by the floor driver"),
    )
}

/// A [`FloorDriver`] served on a unix socket until dropped (its mounts are then detached).
pub struct FloorPlugin {
    /// The driver served.
    pub driver: Arc<FloorDriver>,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
    teardown: Option<JoinHandle<()>>,
}

impl FloorPlugin {
    /// Serves a driver keeping its layers under `root` on `socket`, on the server lamina runs.
    pub fn start(root: &Path, socket: &Path) -> anyhow::Result<FloorPlugin> {
        let driver = Arc::new(FloorDriver::new(root)?);
        let (queue, queued) = mpsc::channel::<u64>();
        *driver.teardowns.queue.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue);
        let teardown = {
            let driver = driver.clone();
            std::thread::Builder::new()
                .name("docker-floor-teardown".into())
                .spawn(move || {
                    for n in queued {
                        driver.teardowns.run(n);
                    }
                })?
        };
        let listener =
            lamina_docker::bind_socket(socket).with_context(|| format!("bind {}", socket.display()))?;
        let router = Arc::new(Router::new().with_graph_driver(driver.clone()));
        let shutdown = ShutdownHandle::new();
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("docker-floor".into())
            .spawn(move || lamina_docker::serve(listener, router, &stop))?;
        Ok(FloorPlugin {
            driver,
            shutdown,
            thread: Some(thread),
            teardown: Some(teardown),
        })
    }
}

impl Drop for FloorPlugin {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The queue closes; the thread ends once it has unmounted what was queued.
        self.driver
            .teardowns
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = self.teardown.take() {
            let _ = t.join();
        }
        let _ = self.driver.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_directories_without_mounts() {
        let tmp = std::env::temp_dir().join(format!("docker-floor-{}", std::process::id()));
        let d = FloorDriver::new(&tmp).unwrap();
        d.make_spares(1).unwrap();
        assert!(
            d.dir(1).join("merged").is_dir(),
            "made ahead under the next number"
        );
        let create = |id: &str, parent: Option<&str>| CreateRequest {
            id: id.into(),
            parent: parent.map(str::to_string),
            ..CreateRequest::default()
        };
        d.create(create("img", None), false).unwrap();
        assert_eq!(
            d.create(create("img", None), false).unwrap_err().kind,
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            d.create(create("c", Some("nope")), true).unwrap_err().kind,
            ErrorKind::NotFound
        );
        // A layer without a parent is served as its own diff directory, unmounted.
        let p = d.get("img", "").unwrap();
        assert!(p.ends_with("diff") && p.is_dir());
        d.put("img").unwrap();
        d.remove("img").unwrap();
        assert!(!d.exists("img"));
        assert!(!p.exists());
        // Past the spare: the directories are made in line.
        d.create(create("img2", None), false).unwrap();
        assert!(d.get("img2", "").unwrap().is_dir());
        d.remove("img2").unwrap();
        assert_eq!(fs::read_dir(&d.trash).unwrap().count(), 2);
        d.empty_trash().unwrap();
        assert_eq!(fs::read_dir(&d.trash).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_queued_teardown_follows_its_layer_into_the_trash() {
        let tmp = std::env::temp_dir().join(format!("docker-floor-t-{}", std::process::id()));
        let (dir, to) = (tmp.join("layers/1"), tmp.join("trash/1"));
        fs::create_dir_all(dir.join("merged")).unwrap();
        fs::create_dir_all(tmp.join("trash")).unwrap();
        let t = Teardowns::default();
        let (tx, rx) = mpsc::channel();
        *t.queue.lock().unwrap() = Some(tx);
        t.queue(1, dir.join("merged"));
        assert_eq!(rx.try_recv().unwrap(), 1);
        assert_eq!(t.jobs().running.get(&1), Some(&1));
        t.rename(1, &dir, &to).unwrap();
        let entry = t.jobs().detach.get(&1).cloned().unwrap();
        assert_eq!(
            entry.lock().unwrap().as_deref(),
            Some(to.join("merged").as_path())
        );
        // The thread's part: the moved view is "detached" (it is no mount point here) and the job is over.
        t.run(1);
        assert!(t.jobs().running.is_empty() && t.jobs().detach.is_empty());
        t.wait(Some(1));
        t.wait(None);
        let _ = fs::remove_dir_all(&tmp);
    }
}
