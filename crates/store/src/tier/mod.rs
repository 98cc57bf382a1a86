//! The shared layer tier: read-only layers on a POSIX distributed filesystem mounted on every host, named by
//! chain id, so that a layer unpacked on one host serves every host (docs/cluster.md).
//!
//! Layout of the tier directory (tier format 2):
//!
//! ```text
//! layers/<hex>/            one published layer (chain id sha256:<hex>), never changed after its rename
//!     layer.erofs          its content as one read-only EROFS image (format `erofs`, the default)
//!     seal-erofs.json      chain id, bytes, inodes, manifest digest, publishing host and time, format
//!   or
//!     diff/                its content, an overlay lower directory (format `directory`, tier format 1)
//!     seal.json            the same seal, without a format
//!     manifest             its content manifest (the store's format, docs/on-disk-format.md)
//! staging/<hex>-<ns>-<seq>@<host>/   a publication being written; renamed to layers/<hex> when whole
//! trash/                   removals on their way out
//! claims/layer/<hex>       a host is unpacking that layer            (lamina-lease)
//! refs/layer/<hex>/<host>  that host holds the layer                  (lamina-lease)
//! hosts/<host>, clock/     heartbeats, probes of the filesystem's clock (lamina-lease)
//! usage/<host>             the tier layers that host uses now and when it last used each (JSON)
//! ```
//!
//! A host sees a layer either whole (after the rename of its staging directory) or not at all. A store links a
//! tier layer as the content of a local record (a symbolic link in place of the layer's own directory), so the
//! overlay stacks take their lower directories from the tier and every rule of the store applies unchanged. An
//! image layer is linked through its mount on this host, `<data root>/tier/<hex>` (the image file mounted
//! read-only by the kernel's EROFS, backed by the file itself); a directory layer is linked directly.
//!
//! The seal of an image layer has its own name so that a lamina which knows only directory layers finds no
//! seal there and unpacks the layer itself (its publication then loses the rename race cleanly) instead of
//! linking a `diff/` that is not there.

mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lamina_archive::{ApplyOptions, DiffOptions};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use lamina_lease::{Claim, Lease, LeaseError};

use crate::{mkdir, now_ns, open_dir, remove_tree, Result, StoreError};

/// The kind of the tier's references and claims in the lease directory.
const KIND: &str = "layer";

pub use store::{TierLayer, TierSummary};

/// Where the tier is and how this host takes part.
#[derive(Debug, Clone)]
pub struct TierOptions {
    /// The tier directory, on a filesystem every host mounts (it must exist: lamina does not create the mount).
    pub dir: PathBuf,
    /// This host's lease on the cluster directory: its id, heartbeats, references and claims. A host whose
    /// heartbeat is older than the lease counts as gone: its references stop protecting layers and its claims
    /// expire.
    pub lease: Lease,
    /// How long a Prepare waits for another host's unpack of the same layer before unpacking it too.
    pub claim_wait: Duration,
    /// How this host publishes layers (it adopts layers of either format).
    pub format: TierFormat,
    /// How long the usage file (`usage/<host>`) of a host that is gone is kept for the last uses it records;
    /// older ones are removed by the collection.
    pub usage_retention: Duration,
}

/// The default of [`TierOptions::usage_retention`]: a week.
pub const DEFAULT_USAGE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How a published layer's content is stored in the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierFormat {
    /// One read-only EROFS image file per layer (`layer.erofs`, made by `mkfs.erofs` on the local disk),
    /// mounted on each host that holds the layer: one file on the filesystem's metadata server per layer.
    #[default]
    Erofs,
    /// The layer's directory tree (`diff/`), linked as the lower directory itself: one inode on the metadata
    /// server per file of the layer, and every open of a file a request to it.
    Directory,
}

impl TierFormat {
    fn directory() -> TierFormat {
        TierFormat::Directory
    }
}

/// The seal of an image layer.
const IMAGE_SEAL: &str = "seal-erofs.json";
/// The seal of a directory layer.
const DIR_SEAL: &str = "seal.json";
/// The image of an image layer.
const IMAGE: &str = "layer.erofs";

/// What `seal.json` records of a published layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Seal {
    pub chain: String,
    pub bytes: u64,
    pub inodes: u64,
    pub manifest: String,
    pub host: String,
    pub published_ns: u64,
    /// How the content is stored (absent in a directory layer's seal, written before images existed).
    #[serde(default = "TierFormat::directory")]
    pub format: TierFormat,
}

/// What `usage/<host>` records: the tier layers a host uses (an active layer or a mounted stack of that host
/// reaches them) and when it last used each, on the tier's clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Usage {
    /// Layers in use at the time of the write (hex), with the number of active layers and mounted stacks
    /// of the host that reach each.
    pub uses: BTreeMap<String, u32>,
    /// Last use of each layer the host used and still holds (unix nanoseconds, the tier's clock): the time of
    /// the write that found it in use, or that found its use ended.
    pub last_use_ns: BTreeMap<String, u64>,
}

/// This host's usage as last written, and whether a write is on its way.
#[derive(Debug, Default)]
struct UsageState {
    written: Option<Usage>,
    busy: bool,
    /// Local time of the previous call (unix nanoseconds): layers used since count as used again.
    since_ns: u64,
}

/// The tier as one host sees it.
#[derive(Debug)]
pub(crate) struct Tier {
    opts: TierOptions,
    /// This host's claims on layers it is unpacking, until their publication.
    claims: Mutex<HashMap<String, Claim>>,
    seq: AtomicU64,
    usage: std::sync::Arc<Mutex<UsageState>>,
    /// `<data root>/tier`: the mounts of image layers on this host, one directory per layer (`<hex>`), there
    /// only while the image is mounted on it, and `.build/` where images are made before their copy.
    mounts: PathBuf,
    /// Held exclusively by a reconciliation of the mounts, and shared by each adoption until its record is
    /// committed, so that a reconciliation never takes down a mount that a record is about to need while
    /// adoptions of different layers run side by side.
    mounting: RwLock<()>,
    /// One lock per image layer being mounted: two adoptions of one layer mount it once.
    mount_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

const SUBDIRS: [&str; 4] = ["layers", "staging", "trash", "usage"];

/// `sha256:<64 hex>` → `<hex>`.
pub(crate) fn chain_hex(chain: &str) -> Option<&str> {
    let hex = chain.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

fn tier_io(what: impl Into<String>, e: io::Error) -> StoreError {
    StoreError::io(format!("cluster tier: {}", what.into()), e)
}

fn lease_err(e: LeaseError) -> StoreError {
    match e {
        LeaseError::Io { context, source } => StoreError::io(format!("cluster tier: {context}"), source),
        e => StoreError::io("cluster tier", io::Error::other(e.to_string())),
    }
}

/// The longest a call that needs the shared filesystem waits for it: a metadata server that does not answer
/// (stopped, or cut off) makes the call fail with a clear error instead of hanging the caller.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `f` (a call on the shared filesystem) on its own thread and gives up after [`CALL_TIMEOUT`]; a thread
/// stuck in the filesystem finishes when the filesystem answers again.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    started(what, f)?.wait()
}

/// Starts `f` (a call on the shared filesystem) on its own thread; [`Pending::wait`] gives its result, or
/// gives up after [`CALL_TIMEOUT`] as [`bounded`] does. A call whose result is not waited for ends on its own.
fn started<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<Pending<T>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("tier-call".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| tier_io("start a call", e))?;
    Ok(Pending {
        what: what.to_string(),
        rx,
    })
}

/// A call on the shared filesystem running on its own thread ([`started`]).
pub(crate) struct Pending<T> {
    what: String,
    rx: std::sync::mpsc::Receiver<T>,
}

impl<T> Pending<T> {
    /// Its result, waited for at most [`CALL_TIMEOUT`].
    pub(crate) fn wait(self) -> Result<T> {
        self.rx.recv_timeout(CALL_TIMEOUT).map_err(|_| {
            tier_io(
                self.what,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the shared filesystem did not answer within {} s (is its metadata server up?)",
                        CALL_TIMEOUT.as_secs()
                    ),
                ),
            )
        })
    }
}

/// What [`Tier::claim`] found.
pub(crate) enum Claimed {
    /// This host holds the claim now.
    Taken,
    /// Another host holds it.
    HeldBy(String),
}

impl Tier {
    /// Makes the tier's directories (the tier directory itself must exist).
    pub(crate) fn open(opts: TierOptions, root: &Path) -> Result<Tier> {
        if !opts.dir.is_dir() {
            return Err(StoreError::InvalidArgument(format!(
                "cluster tier directory {} is not there (is the shared filesystem mounted?)",
                opts.dir.display()
            )));
        }
        for d in SUBDIRS {
            mkdir(&opts.dir.join(d), 0o755)?;
        }
        // Publications this host's previous run left half-written (it died): nobody else finishes them.
        let own = format!("@{}", opts.lease.host());
        if let Ok(rd) = std::fs::read_dir(opts.dir.join("staging")) {
            for e in rd.filter_map(|e| e.ok()) {
                if e.file_name().to_string_lossy().ends_with(&own) {
                    info!(path = %e.path().display(), "removing a publication cut short");
                    remove_tree(&e.path());
                }
            }
        }
        let own_tmp = format!(".tmp-{}-", opts.lease.host());
        if let Ok(rd) = std::fs::read_dir(opts.dir.join("usage")) {
            for e in rd.filter_map(|e| e.ok()) {
                if e.file_name().to_string_lossy().starts_with(&own_tmp) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let mounts = root.join("tier");
        mkdir(&mounts, 0o700)?;
        // Images a previous run was making when it stopped.
        remove_tree(&mounts.join(BUILD_DIR));
        mkdir(&mounts.join(BUILD_DIR), 0o700)?;
        if opts.format == TierFormat::Erofs && mkfs_erofs().is_none() {
            warn!("mkfs.erofs is not installed (Debian: erofs-utils): this host cannot publish layers to the tier");
        }
        Ok(Tier {
            opts,
            claims: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            usage: Default::default(),
            mounts,
            mounting: RwLock::new(()),
            mount_locks: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn options(&self) -> &TierOptions {
        &self.opts
    }

    /// The hosts whose lease is alive.
    pub(crate) fn live_hosts(&self) -> Result<HashSet<String>> {
        Ok(self
            .lease()
            .hosts()
            .map_err(lease_err)?
            .into_iter()
            .filter(|h| h.alive)
            .map(|h| h.host.as_str().to_string())
            .collect())
    }

    pub(crate) fn lease(&self) -> &Lease {
        &self.opts.lease
    }

    fn host(&self) -> &str {
        self.opts.lease.host().as_str()
    }

    /// Claims the unpack of layer `hex` for this host (kept until [`Tier::release`]).
    pub(crate) fn claim(&self, hex: &str) -> Result<Claimed> {
        let (lease, name) = (self.opts.lease.clone(), hex.to_string());
        match bounded("claim", move || lease.claim(KIND, &name))? {
            Ok(c) => {
                self.claims
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(hex.to_string(), c);
                Ok(Claimed::Taken)
            }
            // A claim this host holds already: the unpack that took it was given up (containerd asks again).
            Err(LeaseError::HeldBy { .. })
                if self
                    .claims
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(hex) =>
            {
                Ok(Claimed::Taken)
            }
            Err(LeaseError::HeldBy { host, .. }) => Ok(Claimed::HeldBy(host)),
            Err(e) => Err(lease_err(e)),
        }
    }

    /// Drops this host's claim on layer `hex`, if it holds one.
    pub(crate) fn release(&self, hex: &str) {
        let c = self.claims.lock().unwrap_or_else(|p| p.into_inner()).remove(hex);
        if let Some(c) = c {
            if let Err(e) = c.release() {
                warn!(layer = hex, error = %e, "could not release a claim");
            }
        }
    }

    /// Records that this host holds layer `hex`.
    pub(crate) fn hold(&self, hex: &str) -> Result<()> {
        self.opts.lease.hold(KIND, hex).map_err(lease_err)
    }

    /// Starts [`Tier::hold`] of layer `hex` on a thread of its own.
    pub(crate) fn start_hold(&self, hex: &str) -> Result<Pending<Result<()>>> {
        let (lease, name) = (self.opts.lease.clone(), hex.to_string());
        started("reference the layer", move || {
            lease.hold(KIND, &name).map_err(lease_err)
        })
    }

    /// The layers this host references.
    pub(crate) fn references(&self) -> Result<HashSet<String>> {
        Ok(self
            .opts
            .lease
            .references(KIND)
            .map_err(lease_err)?
            .into_iter()
            .collect())
    }

    /// Drops this host's reference to layer `hex`.
    pub(crate) fn unhold(&self, hex: &str) -> Result<()> {
        self.opts.lease.release(KIND, hex).map_err(lease_err)
    }

    pub(crate) fn layer_dir(&self, hex: &str) -> PathBuf {
        self.opts.dir.join("layers").join(hex)
    }

    /// The content directory of a published directory layer.
    pub(crate) fn content(&self, hex: &str) -> PathBuf {
        self.layer_dir(hex).join("diff")
    }

    /// Where this host mounts image layer `hex`.
    pub(crate) fn mount_point(&self, hex: &str) -> PathBuf {
        self.mounts.join(hex)
    }

    /// The directory a local record of published layer `hex` links to: the tier's directory of a directory
    /// layer; the mount on this host of an image layer, mounted now unless it is already. The caller holds
    /// [`Tier::adopting`] until the record that links it is committed.
    pub(crate) fn linked_content(&self, hex: &str, seal: &Seal) -> Result<PathBuf> {
        match seal.format {
            TierFormat::Directory => Ok(self.content(hex)),
            TierFormat::Erofs => self.mount(hex),
        }
    }

    /// Held by a reconciliation of the mounts of image layers (see the field).
    pub(crate) fn mounting(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.mounting.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Held by an adoption until its record is committed (see [`Tier::mounting`]'s field).
    pub(crate) fn adopting(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.mounting.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts image layer `hex` on its mount point unless it is mounted there already (a previous run's
    /// mount, kept across a restart or a kill), bounded like the other calls on the shared filesystem. A
    /// failed mount leaves no mount point behind: links to it then fail loudly instead of showing an empty
    /// directory.
    fn mount(&self, hex: &str) -> Result<PathBuf> {
        let lock = self
            .mount_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hex.to_string())
            .or_default()
            .clone();
        let mounted = {
            let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
            self.mount_once(hex)
        };
        let mut locks = self.mount_locks.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this call's: no other call waits for it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(hex);
        }
        mounted
    }

    /// [`Tier::mount`] under the layer's lock.
    fn mount_once(&self, hex: &str) -> Result<PathBuf> {
        let target = self.mount_point(hex);
        if lamina_sys::mount::is_mount_root(&target).ok().flatten() == Some(true) {
            return Ok(target);
        }
        mkdir(&target, 0o755)?;
        let image = self.layer_dir(hex).join(IMAGE);
        let (img, tgt) = (image.clone(), target.clone());
        let what = format!("mount {}", image.display());
        let mounted = bounded(&what, move || lamina_sys::mount::mount_erofs_file(&img, &tgt)).and_then(|r| {
            r.map_err(|e| tier_io(format!("mount {} on {}", image.display(), target.display()), e))
        });
        match mounted {
            Ok(()) => {
                debug!(layer = hex, "image layer mounted");
                Ok(target)
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&target);
                Err(e)
            }
        }
    }

    /// Brings this host's mounts of image layers in line with `needed` (the layers its records link to
    /// through a mount): mounts the missing ones and takes down (lazily detached) and removes the others.
    /// Gives the errors; the caller holds [`Tier::mounting`].
    pub(crate) fn sync_mounts(&self, needed: &HashSet<String>) -> Vec<String> {
        let mut errors = Vec::new();
        for hex in needed {
            if let Err(e) = self.mount(hex) {
                errors.push(e.to_string());
            }
        }
        let Ok(rd) = std::fs::read_dir(&self.mounts) else {
            return errors;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || needed.contains(&name) {
                continue;
            }
            let path = e.path();
            // A directory that is no mount is a mount point a crash left between its mkdir and its mount.
            let mounted = lamina_sys::mount::is_mount_root(&path).ok().flatten() == Some(true);
            let unmounted = if mounted {
                lamina_sys::mount::unmount(&path, true)
            } else {
                Ok(())
            };
            match unmounted.and_then(|()| std::fs::remove_dir(&path)) {
                Ok(()) => debug!(layer = name, "image layer unmounted"),
                Err(e) => errors.push(format!("take down {}: {e}", path.display())),
            }
        }
        errors
    }

    /// Whether layer `hex` is published.
    pub(crate) fn has(&self, hex: &str) -> Result<bool> {
        let path = self.layer_dir(hex);
        let what = format!("look up {}", path.display());
        bounded(&what.clone(), move || match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(tier_io(what, e)),
        })?
    }

    /// The seal of layer `hex` when it is published (`None` when it is not): whether it is there and what it
    /// is in one read (lookup, open and read of its seal; a second lookup for a directory layer's seal when
    /// there is no image layer's), bounded like [`Tier::has`].
    pub(crate) fn published(&self, hex: &str) -> Result<Option<Seal>> {
        let dir = self.layer_dir(hex);
        let what = format!("read the seal in {}", dir.display());
        bounded(&what, move || read_seal(&dir))?
    }

    /// The seal of a published layer.
    pub(crate) fn seal(&self, hex: &str) -> Result<Seal> {
        let dir = self.layer_dir(hex);
        read_seal(&dir)?.ok_or_else(|| {
            tier_io(
                format!("read the seal in {}", dir.display()),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }

    /// Copies the manifest of published layer `hex` to `dest` after checking it against the digest its seal
    /// records (a torn or replaced manifest is refused). The layer's content is not read.
    pub(crate) fn copy_manifest(&self, hex: &str, seal: &Seal, dest: &Path) -> Result<()> {
        let bytes = self.manifest(hex, seal, None)?;
        std::fs::write(dest, &bytes).map_err(|e| tier_io(format!("write {}", dest.display()), e))
    }

    /// Starts the read of layer `hex`'s manifest (it may not be published yet), for [`Tier::manifest`].
    pub(crate) fn read_manifest(&self, hex: &str) -> Result<Pending<io::Result<Vec<u8>>>> {
        let src = self.layer_dir(hex).join(crate::MANIFEST_FILE);
        started(&format!("read {}", src.display()), move || std::fs::read(&src))
    }

    /// The manifest of published layer `hex`, checked against the digest its seal records: the result of
    /// `early` (a read started before the seal was seen) when that read found it, else read now.
    pub(crate) fn manifest(
        &self,
        hex: &str,
        seal: &Seal,
        early: Option<Pending<io::Result<Vec<u8>>>>,
    ) -> Result<Vec<u8>> {
        let src = self.layer_dir(hex).join(crate::MANIFEST_FILE);
        let bytes = match early.map(Pending::wait) {
            Some(Ok(Ok(bytes))) => bytes,
            // Not there yet when the read began (the layer was published meanwhile), or it failed: once more.
            _ => self
                .read_manifest(hex)?
                .wait()?
                .map_err(|e| tier_io(format!("read {}", src.display()), e))?,
        };
        let digest = lamina_archive::manifest::digest_of(&bytes);
        if digest != seal.manifest {
            return Err(StoreError::CorruptMetadata(format!(
                "cluster tier: {}: digest {digest}, its seal records {}",
                src.display(),
                seal.manifest
            )));
        }
        Ok(bytes)
    }

    /// Published layers (hex names).
    pub(crate) fn layers(&self) -> Result<Vec<String>> {
        let dir = self.opts.dir.join("layers");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| tier_io(format!("read {}", dir.display()), e))? {
            let e = e.map_err(|e| tier_io(format!("read {}", dir.display()), e))?;
            if let Some(name) = e.file_name().to_str() {
                if chain_hex(&format!("sha256:{name}")).is_some() {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Copies the local layer content `content` (an overlay upper directory) into the tier as layer `chain`,
    /// in this host's format (an EROFS image made on the local disk, or a directory tree), sealed with its
    /// manifest, and publishes it with one rename. Gives `false` when another host published it first (the
    /// copy is dropped; the tier's layer is the same content by its chain id).
    pub(crate) fn publish(&self, hex: &str, chain: &str, content: &Path) -> Result<bool> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let staging = self
            .opts
            .dir
            .join("staging")
            .join(format!("{hex}-{}-{seq}@{}", now_ns(), self.host()));
        let written = match self.opts.format {
            TierFormat::Erofs => self.write_staging_image(&staging, hex, chain, content),
            TierFormat::Directory => self.write_staging(&staging, chain, content),
        };
        let result = written.and_then(|()| {
            lamina_sys::fault::point("tier.publish.rename")
                .map_err(|e| tier_io(format!("publish {chain}"), e))?;
            match std::fs::rename(&staging, self.layer_dir(hex)) {
                Ok(()) => Ok(true),
                // A published layer is never empty, so a rename onto it fails instead of replacing it.
                Err(e) if self.has(hex).unwrap_or(false) => {
                    debug!(chain, error = %e, "another host published the layer first");
                    Ok(false)
                }
                Err(e) => Err(tier_io(format!("publish {chain}"), e)),
            }
        });
        if !matches!(result, Ok(true)) {
            remove_tree(&staging);
        }
        result
    }

    fn write_staging(&self, staging: &Path, chain: &str, content: &Path) -> Result<()> {
        mkdir(staging, 0o755)?;
        let diff = staging.join("diff");
        mkdir(&diff, 0o755)?;
        // The layer's tar (as `Diff` streams it) unpacked into the tier: whiteouts, opaque directories, hard
        // links, owners and xattrs come out as an apply makes them, without holding the tar anywhere.
        let (reader, writer) = io::pipe().map_err(|e| tier_io("pipe", e))?;
        let src = open_dir(content)?;
        let writer_thread = std::thread::Builder::new()
            .name("tier-publish".into())
            .spawn(move || lamina_archive::write_layer_diff(src.as_fd(), writer, &DiffOptions::default()))
            .map_err(|e| tier_io("start the copy thread", e))?;
        let dst = open_dir(&diff)?;
        let applied = lamina_archive::apply_layer(dst.as_fd(), reader, &ApplyOptions::default());
        let written = writer_thread
            .join()
            .map_err(|_| StoreError::io("cluster tier: copy thread", io::Error::other("panicked")))?;
        written?;
        applied?;
        self.write_seal(staging, chain, content, TierFormat::Directory)
    }

    /// The staging of an image layer: the image is made from the local content on the local disk (the
    /// image maker writes it in place, which a FUSE filesystem serves badly), copied into `staging` and
    /// flushed, then the manifest and the seal are written beside it.
    fn write_staging_image(&self, staging: &Path, hex: &str, chain: &str, content: &Path) -> Result<()> {
        mkdir(staging, 0o755)?;
        let local = self.mounts.join(BUILD_DIR).join(format!(
            "{hex}-{}-{}.erofs",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::SeqCst)
        ));
        let made = build_image(content, &local).and_then(|()| {
            let dest = staging.join(IMAGE);
            let copy = || -> io::Result<u64> {
                let mut src = std::fs::File::open(&local)?;
                let mut dst = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)?;
                let n = io::copy(&mut src, &mut dst)?;
                dst.sync_all()?;
                Ok(n)
            };
            copy().map_err(|e| tier_io(format!("copy the image to {}", dest.display()), e))
        });
        let _ = std::fs::remove_file(&local);
        let bytes = made?;
        debug!(chain, bytes, "layer image made");
        self.write_seal(staging, chain, content, TierFormat::Erofs)
    }

    /// Writes the manifest of the local content `content` and the layer's seal into `staging`, and flushes it.
    fn write_seal(&self, staging: &Path, chain: &str, content: &Path, format: TierFormat) -> Result<()> {
        let digest = crate::verify::write_manifest_file(content, &staging.join(crate::MANIFEST_FILE))?;
        let usage = lamina_archive::disk_usage(open_dir(content)?.as_fd())?;
        let seal = Seal {
            chain: chain.to_string(),
            bytes: usage.bytes,
            inodes: usage.inodes,
            manifest: digest,
            host: self.host().to_string(),
            published_ns: now_ns(),
            format,
        };
        let seal_bytes = serde_json::to_vec_pretty(&seal).unwrap_or_default();
        let name = match format {
            TierFormat::Erofs => IMAGE_SEAL,
            TierFormat::Directory => DIR_SEAL,
        };
        std::fs::write(staging.join(name), seal_bytes).map_err(|e| tier_io("write seal", e))?;
        // Everything on the chunk servers before the name appears (a FUSE filesystem may not implement syncfs:
        // its close already flushed the data then).
        if let Err(e) = lamina_sys::mount::syncfs(staging) {
            debug!(error = %e, "syncfs of the tier staging directory");
        }
        Ok(())
    }

    /// The local time (unix nanoseconds) of the previous [`Tier::share_usage`] call; this call's is `now`.
    pub(crate) fn usage_since(&self, now: u64) -> u64 {
        let mut st = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut st.since_ns, now)
    }

    /// Records in `usage/<host>` that this host uses the layers `uses` now (hex → active layers and mounted
    /// stacks reaching each) and used the layers `recent` since the previous call (a mount brought up and
    /// gone between two calls); `held` are the layers it holds (the last uses of others are forgotten).
    /// Writes only when the layers in use or their counts changed, or a layer was used since the previous
    /// call: a temporary file is created (its mtime is the tier's clock, the time recorded), written and
    /// renamed over the host's file. Gives whether it wrote. A write still stuck in the filesystem (its
    /// metadata server down) makes the next calls skip until it returns.
    pub(crate) fn share_usage(
        &self,
        uses: BTreeMap<String, u32>,
        recent: BTreeSet<String>,
        held: &HashSet<String>,
    ) -> Result<bool> {
        let previous = {
            let mut st = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            let same = st.written.as_ref().is_some_and(|w| w.uses == uses);
            if st.busy || (same && recent.is_empty()) {
                return Ok(false);
            }
            st.busy = true;
            st.written.clone()
        };
        let dir = self.opts.dir.join("usage");
        let tmp = dir.join(format!(
            ".tmp-{}-{}-{}",
            self.host(),
            std::process::id(),
            self.seq.fetch_add(1, Ordering::SeqCst)
        ));
        let target = dir.join(self.host());
        let state = self.usage.clone();
        let held = held.clone();
        let done = bounded("record layer use", move || {
            let result = write_usage(&tmp, &target, previous.unwrap_or_default(), uses, recent, &held);
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.busy = false;
            match result {
                Ok(u) => {
                    st.written = Some(u);
                    Ok(())
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        })?;
        done.map(|()| true)
    }

    /// Every host's usage file with its mtime (hosts whose file is unreadable are left out).
    pub(crate) fn usages(&self) -> Result<Vec<(String, Usage, SystemTime)>> {
        let dir = self.opts.dir.join("usage");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| tier_io(format!("read {}", dir.display()), e))? {
            let Ok(e) = e else { continue };
            let host = e.file_name().to_string_lossy().into_owned();
            if host.starts_with('.') {
                continue;
            }
            let read = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Usage>(&b).ok());
            let mtime = e.metadata().and_then(|m| m.modified()).ok();
            if let (Some(u), Some(t)) = (read, mtime) {
                out.push((host, u, t));
            }
        }
        Ok(out)
    }

    /// Garbage of the tier: published layers that no live host holds (`held` are the layers this host holds),
    /// removed unless `dry_run`; staging directories of publications cut short, trash, and the usage files of
    /// hosts gone for longer than the usage retention. Gives the items and the errors.
    pub(crate) fn collect(
        &self,
        held: &HashSet<String>,
        dry_run: bool,
    ) -> Result<(Vec<TierGarbage>, Vec<String>)> {
        let host = self.host().to_string();
        let protects = |hex: &str| -> Result<bool> {
            let holders = self.opts.lease.holders(KIND, hex).map_err(lease_err)?;
            Ok(holders.iter().any(|h| {
                if h.as_str() == host {
                    held.contains(hex)
                } else {
                    true
                }
            }))
        };
        let lease_ns = u64::try_from(self.opts.lease.config().lease.as_nanos()).unwrap_or(u64::MAX);
        let mut items = Vec::new();
        let mut errors = Vec::new();
        for hex in self.layers()? {
            if protects(&hex)? {
                continue;
            }
            let seal = self.seal(&hex).ok();
            // A layer just published may not have its publisher's reference yet.
            if seal
                .as_ref()
                .is_some_and(|s| now_ns().saturating_sub(s.published_ns) < lease_ns)
            {
                continue;
            }
            let item = TierGarbage {
                kind: TierGarbageKind::Layer,
                hex: Some(hex.clone()),
                path: self.layer_dir(&hex),
                bytes: seal.map(|s| s.bytes).unwrap_or(0),
            };
            if !dry_run {
                if let Err(e) = self.remove_layer(&hex, &protects) {
                    errors.push(format!("{}: {e}", item.path.display()));
                }
            }
            items.push(item);
        }
        // Leftovers: staging of publications whose host is gone, trash older than a lease, and usage files of
        // hosts gone for longer than the retention (their file is written at most once per heartbeat while
        // they live, so its age is at least the time they have been gone).
        let live = self.live_hosts()?;
        let retention_ns = u64::try_from(self.opts.usage_retention.as_nanos()).unwrap_or(u64::MAX);
        for (sub, kind) in [
            ("staging", TierGarbageKind::Staging),
            ("trash", TierGarbageKind::Trash),
            ("usage", TierGarbageKind::Usage),
        ] {
            let dir = self.opts.dir.join(sub);
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let age_ns = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                    .unwrap_or(0);
                let stale = match kind {
                    TierGarbageKind::Staging => {
                        let owner = name.rsplit('@').next().unwrap_or("");
                        owner != host && !live.contains(owner) && age_ns > lease_ns
                    }
                    TierGarbageKind::Usage => {
                        !name.starts_with('.')
                            && name != host
                            && !live.contains(&name)
                            && age_ns > retention_ns
                    }
                    _ => age_ns > lease_ns,
                };
                if !stale {
                    continue;
                }
                if !dry_run {
                    if kind == TierGarbageKind::Usage {
                        if let Err(e) = std::fs::remove_file(e.path()) {
                            if e.kind() != io::ErrorKind::NotFound {
                                errors.push(format!("{}/{name}: {e}", dir.display()));
                            }
                        }
                    } else {
                        remove_tree(&e.path());
                    }
                }
                items.push(TierGarbage {
                    kind,
                    hex: None,
                    path: e.path(),
                    bytes: 0,
                });
            }
        }
        Ok((items, errors))
    }

    /// Moves a layer out of view, checks again that nothing protects it (a host may have referenced it between
    /// the check and the move: the layer goes back), then deletes it and the references of gone hosts.
    fn remove_layer(&self, hex: &str, protects: &dyn Fn(&str) -> Result<bool>) -> Result<()> {
        let trash = self.opts.dir.join("trash").join(format!("{hex}-{}", now_ns()));
        std::fs::rename(self.layer_dir(hex), &trash).map_err(|e| tier_io(format!("move layer {hex}"), e))?;
        if protects(hex)? {
            info!(
                layer = hex,
                "a host referenced the layer while it was being collected; kept"
            );
            return std::fs::rename(&trash, self.layer_dir(hex))
                .map_err(|e| tier_io(format!("put layer {hex} back"), e));
        }
        remove_tree(&trash);
        let _ = self.opts.lease.prune_dead(KIND, hex);
        let _ = self.unhold(hex);
        Ok(())
    }
}

/// Where images are made on the local disk, under the mounts' directory.
const BUILD_DIR: &str = ".build";

/// The image maker, when installed.
fn mkfs_erofs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("mkfs.erofs"))
        .find(|p| p.is_file())
}

/// Makes an uncompressed EROFS image `image` of the directory `content`. `mkfs.erofs` keeps what an overlay
/// lower directory needs: owners, modes, times, hard links, device nodes (overlay whiteouts are `0:0`
/// character devices) and extended attributes (an opaque directory's `trusted.overlay.opaque`).
fn build_image(content: &Path, image: &Path) -> Result<()> {
    let mkfs = mkfs_erofs().ok_or_else(|| {
        tier_io(
            "make a layer image",
            io::Error::new(
                io::ErrorKind::NotFound,
                "mkfs.erofs is not installed (Debian: erofs-utils)",
            ),
        )
    })?;
    let out = std::process::Command::new(&mkfs)
        .arg("--quiet")
        .arg(image)
        .arg(content)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| tier_io(format!("run {}", mkfs.display()), e))?;
    if !out.status.success() {
        return Err(tier_io(
            format!("make the image of {}", content.display()),
            io::Error::other(format!(
                "mkfs.erofs: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        ));
    }
    Ok(())
}

/// The seal in the layer directory `dir`: an image layer's, else a directory layer's; `None` when neither
/// is there (the layer is not published).
fn read_seal(dir: &Path) -> Result<Option<Seal>> {
    for (name, format) in [(IMAGE_SEAL, TierFormat::Erofs), (DIR_SEAL, TierFormat::Directory)] {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut seal: Seal = serde_json::from_slice(&bytes).map_err(|e| {
                    StoreError::CorruptMetadata(format!("cluster tier: {}: {e}", path.display()))
                })?;
                seal.format = format;
                return Ok(Some(seal));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(tier_io(format!("read {}", path.display()), e)),
        }
    }
    Ok(None)
}

/// Writes the usage `uses` to a new file `tmp`, its time the file's mtime (the tier's clock), and renames it
/// over `target`. The last use of a layer in use now, used since the previous call (`recent`), or in use at
/// the previous write and not now, is that time; the others keep theirs, while held.
fn write_usage(
    tmp: &Path,
    target: &Path,
    previous: Usage,
    uses: BTreeMap<String, u32>,
    recent: BTreeSet<String>,
    held: &HashSet<String>,
) -> Result<Usage> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| tier_io(format!("create {}", tmp.display()), e))?;
    let now = f
        .metadata()
        .and_then(|m| m.modified())
        .map_err(|e| tier_io(format!("stat {}", tmp.display()), e))?;
    let now_ns = now
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut last = previous.last_use_ns;
    for hex in previous.uses.keys().chain(uses.keys()).chain(recent.iter()) {
        last.insert(hex.clone(), now_ns);
    }
    last.retain(|hex, _| held.contains(hex) || uses.contains_key(hex));
    let usage = Usage {
        uses,
        last_use_ns: last,
    };
    let bytes = serde_json::to_vec(&usage).unwrap_or_default();
    f.write_all(&bytes)
        .map_err(|e| tier_io(format!("write {}", tmp.display()), e))?;
    drop(f);
    std::fs::rename(tmp, target).map_err(|e| tier_io(format!("rename to {}", target.display()), e))?;
    Ok(usage)
}

/// What a piece of tier garbage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TierGarbageKind {
    Layer,
    Staging,
    Trash,
    /// The usage file of a host gone for longer than the retention.
    Usage,
}

/// One piece of tier garbage.
#[derive(Debug, Clone)]
pub(crate) struct TierGarbage {
    pub kind: TierGarbageKind,
    pub hex: Option<String>,
    pub path: PathBuf,
    pub bytes: u64,
}

#[cfg(test)]
mod tests;
