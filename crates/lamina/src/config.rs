//! Configuration: embedded defaults, then `/etc/lamina/config.toml` (or `--config`), then flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Default data root.
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/lamina";
/// Default plugin socket; dockerd's plugin name is the file name without `.sock`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/lamina.sock";
/// Default containerd snapshotter socket.
pub const DEFAULT_SNAPSHOTTER_SOCKET: &str = "/run/lamina/snapshotter.sock";
/// Read when present and no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/lamina/config.toml";

/// The config file's shape. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where layers and metadata live.
    pub data_root: Option<PathBuf>,
    /// The Docker plugin socket, or `none`.
    pub socket: Option<PathBuf>,
    /// The containerd snapshotter (gRPC) socket, or `none`.
    pub snapshotter_socket: Option<PathBuf>,
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter.
    pub log_level: Option<String>,
    /// Docker volumes (VolumeDriver); see docs/volumes.md.
    pub volumes: Option<VolumesFile>,
    /// Run `lamina gc` (without removed namespaces) every this many seconds; absent or 0: never.
    pub gc_interval_secs: Option<u64>,
    /// Prometheus endpoint: `HOST:PORT` or `unix:/PATH`; absent or `none`: off.
    pub metrics_address: Option<String>,
    /// `text` (default) or `json`.
    pub log_format: Option<String>,
    /// Check frozen layers against their manifests before their first mount after a start.
    pub verify_on_mount: Option<bool>,
    /// The cluster: the shared directory, this host's id, lease timings; see docs/cluster.md.
    pub cluster: Option<ClusterFile>,
    /// The layer store's backend; see docs/rbd.md.
    pub store: Option<crate::store_config::StoreFile>,
}

/// The `[cluster]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The directory on a distributed filesystem that every host of the cluster mounts (absent: no shared
    /// tier; MooseFS volumes keep their leases beside the volumes either way).
    pub dir: Option<PathBuf>,
    /// This host's id, unique in the cluster (default: made once and kept in `<data_root>/host-id`).
    pub host_id: Option<String>,
    /// A host silent this long counts as gone; an unrenewed claim this old expires (default 30).
    pub lease_secs: Option<u64>,
    /// How often this host refreshes its heartbeat (default 5).
    pub heartbeat_secs: Option<u64>,
    /// How this host publishes layers to the tier: `erofs` (one image file per layer, the default) or
    /// `directory` (a directory tree per layer).
    pub layer_format: Option<lamina_store::TierFormat>,
    /// How long the tier keeps the usage file of a host that is gone, for the last uses it records (days,
    /// default 7).
    pub usage_retention_days: Option<u64>,
    /// lamina mounts the tier's MooseFS itself (then `dir` must be absent).
    pub moosefs: Option<ClusterMooseFsFile>,
}

/// The `[cluster.moosefs]` table: the MooseFS (or LizardFS) cluster that lamina mounts itself at
/// `<data_root>/cluster/moosefs` for the tier, which is `remote_path` on that mount.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMooseFsFile {
    /// `HOST:PORT` or `HOST` (port 9421) of the master. Required.
    pub master: Option<String>,
    /// Cluster path mounted by lamina (`mfsmount -S`, default `/`).
    pub subfolder: Option<String>,
    /// The tier's directory inside the subfolder (default `/lamina`).
    pub remote_path: Option<String>,
    /// Extra mount options, each passed as `-o OPTION`.
    pub mount_options: Option<Vec<String>>,
    /// The mount program (default `mfsmount`).
    pub mfsmount: Option<PathBuf>,
    /// Deadline of the mount and of the checks of the mount at start, in seconds (default 10).
    pub timeout_secs: Option<u64>,
}

/// Where, in the data root, lamina mounts the tier's MooseFS (`[cluster.moosefs]`): `<data_root>/cluster/moosefs`
/// (the `cluster` directory is private to root).
pub const TIER_MOUNT_PARENT: &str = "cluster";
/// The mount point's name in [`TIER_MOUNT_PARENT`].
pub const TIER_MOUNT_NAME: &str = "moosefs";
/// The tier's directory on lamina's own mount when `remote_path` is not given.
pub const DEFAULT_TIER_REMOTE_PATH: &str = "/lamina";

/// The resolved `[cluster.moosefs]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierMount {
    /// What lamina's mfsmount mounts where.
    pub mount: lamina_volume::MfsMountConfig,
    /// Deadline of the mount and of the checks of the mount at start.
    pub timeout: std::time::Duration,
}

/// The file in the data root that keeps this host's generated cluster id.
pub const HOST_ID_FILE: &str = "host-id";

/// The resolved `[cluster]` table (always present: the timings and host id also serve the volume lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The shared directory (None: no shared tier); with `[cluster.moosefs]`, the tier's directory on
    /// lamina's own mount.
    pub dir: Option<PathBuf>,
    /// `[cluster.moosefs]`: the mount lamina makes for the tier before the store opens.
    pub moosefs: Option<TierMount>,
    /// This host's id (None: the one kept in `<data_root>/host-id`, made at the first start).
    pub host_id: Option<lamina_lease::HostId>,
    /// The lease.
    pub lease: std::time::Duration,
    /// The heartbeat interval.
    pub heartbeat: std::time::Duration,
    /// How this host publishes layers to the tier.
    pub layer_format: lamina_store::TierFormat,
    /// How long the tier keeps the usage file of a host that is gone.
    pub usage_retention: std::time::Duration,
}

impl ClusterSettings {
    /// This host's id: the configured one, else the one kept in the data root (made when missing).
    pub fn host_id(&self, data_root: &Path) -> anyhow::Result<lamina_lease::HostId> {
        match &self.host_id {
            Some(h) => Ok(h.clone()),
            None => lamina_lease::HostId::load_or_create(&data_root.join(HOST_ID_FILE))
                .context("[cluster] host_id is not set and the data root's host-id cannot be used"),
        }
    }
}

/// Checks `[cluster]` and fills in the defaults; `data_root` holds the mount of `[cluster.moosefs]`.
pub fn cluster_settings(file: Option<ClusterFile>, data_root: &Path) -> anyhow::Result<ClusterSettings> {
    let file = file.unwrap_or_default();
    if let Some(d) = &file.dir {
        if !d.is_absolute() {
            bail!("[cluster] dir {} must be an absolute path", d.display());
        }
    }
    let moosefs = file
        .moosefs
        .map(|m| tier_mount_settings(m, data_root))
        .transpose()?;
    let dir = match (file.dir, &moosefs) {
        (Some(_), Some(_)) => bail!(
            "[cluster] dir and [cluster.moosefs] exclude each other: with [cluster.moosefs] the tier is its \
             remote_path on lamina's own mount ({}); remove dir",
            data_root.join(TIER_MOUNT_PARENT).join(TIER_MOUNT_NAME).display()
        ),
        (dir, None) => dir,
        (None, Some((_, tier))) => Some(tier.clone()),
    };
    let host_id = file
        .host_id
        .map(|h| lamina_lease::HostId::new(h).map_err(|e| anyhow::anyhow!("[cluster] host_id: {e}")))
        .transpose()?;
    let heartbeat = file
        .heartbeat_secs
        .map_or(lamina_lease::DEFAULT_HEARTBEAT, std::time::Duration::from_secs);
    let lease = match file.lease_secs {
        Some(l @ 0..=86_400) => std::time::Duration::from_secs(l),
        Some(l) => bail!("[cluster] lease_secs {l}: at most 86400"),
        None => lamina_lease::DEFAULT_LEASE.max(2 * heartbeat),
    };
    let c = lamina_lease::LeaseConfig {
        dir: PathBuf::new(),
        host: lamina_lease::HostId::new("check")?,
        lease,
        heartbeat,
    };
    c.check().map_err(|e| anyhow::anyhow!("[cluster] {e}"))?;
    let usage_retention = match file.usage_retention_days {
        Some(d @ 0..=36_500) => std::time::Duration::from_secs(d * 86_400),
        Some(d) => bail!("[cluster] usage_retention_days {d}: at most 36500"),
        None => lamina_store::DEFAULT_USAGE_RETENTION,
    };
    Ok(ClusterSettings {
        dir,
        moosefs: moosefs.map(|(m, _)| m),
        host_id,
        lease,
        heartbeat,
        layer_format: file.layer_format.unwrap_or_default(),
        usage_retention,
    })
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `text` or `json`.
    pub fn parse(s: &str) -> anyhow::Result<LogFormat> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => bail!("log format {s:?}: must be \"text\" or \"json\""),
        }
    }
}

/// The settings `serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Data root.
    pub data_root: PathBuf,
    /// Docker plugin socket (None: off).
    pub socket: Option<PathBuf>,
    /// containerd snapshotter socket (None: off).
    pub snapshotter_socket: Option<PathBuf>,
    /// Log filter.
    pub log_level: String,
    /// The volume service; `None` when `[volumes] enabled = false`.
    pub volumes: Option<lamina_volume::VolumeConfig>,
    /// Periodic garbage collection.
    pub gc_interval: Option<std::time::Duration>,
    /// The Prometheus endpoint (None: off).
    pub metrics_address: Option<crate::metrics::MetricsAddress>,
    /// Log line format.
    pub log_format: LogFormat,
    /// `verify_on_mount`.
    pub verify_on_mount: bool,
    /// `--quarantine-unknown`.
    pub quarantine_unknown: bool,
    /// `[cluster]`.
    pub cluster: ClusterSettings,
    /// `[store] backend = "rbd"`: layers as RBD images.
    pub store_rbd: Option<lamina_store::RbdLayers>,
}

impl FileConfig {
    /// Reads `path`; a missing default file is not an error, a missing explicit one is.
    pub fn load(path: Option<&Path>) -> anyhow::Result<FileConfig> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(FileConfig::default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading config {}", path.display())),
        };
        FileConfig::parse(&text, &format!("config {}", path.display()))
    }

    /// Parses config text; `what` names its origin in errors.
    pub fn parse(text: &str, what: &str) -> anyhow::Result<FileConfig> {
        toml::from_str(text).with_context(|| format!("parsing {what}"))
    }
}

/// The flags of `lamina serve`: which config to read, and the settings that override it.
#[derive(Debug, Default, clap::Args)]
pub struct Flags {
    /// Data root holding layers and metadata [default: /var/lib/lamina].
    #[arg(long, value_name = "DIR", env = "LAMINA_DATA_ROOT")]
    pub data_root: Option<PathBuf>,
    /// Plugin socket; dockerd's name for the driver is its file name without `.sock`
    /// [default: /run/docker/plugins/lamina.sock]; `none` turns it off.
    #[arg(long, value_name = "PATH", env = "LAMINA_SOCKET")]
    pub socket: Option<PathBuf>,
    /// containerd snapshotter (gRPC) socket, for `[proxy_plugins]` in containerd's config
    /// [default: /run/lamina/snapshotter.sock]; `none` turns it off.
    #[arg(long, value_name = "PATH", env = "LAMINA_SNAPSHOTTER_SOCKET")]
    pub snapshotter_socket: Option<PathBuf>,
    /// Config file [default: /etc/lamina/config.toml when present].
    #[arg(long, value_name = "FILE", env = "LAMINA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Config given inline (TOML, the same keys as the file); when not empty it is read instead of any
    /// file. Meant for the Docker managed plugin: `docker plugin set lamina LAMINA_CONFIG_TOML=...`.
    #[arg(long, value_name = "TOML", env = "LAMINA_CONFIG_TOML")]
    pub config_toml: Option<String>,
    /// Log filter (error, warn, info, debug, trace) [default: info].
    #[arg(long, value_name = "LEVEL", env = "LAMINA_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Where volumes are mounted while in use; overrides `[volumes] mount_base`
    /// [default: /mnt/docker-volumes].
    #[arg(long, value_name = "DIR", env = "LAMINA_VOLUMES_MOUNT_BASE")]
    pub volumes_mount_base: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics on HOST:PORT (e.g. 127.0.0.1:9323) or unix:/PATH
    /// [default: off]; `none` turns it off.
    #[arg(long, value_name = "ADDR", env = "LAMINA_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Log line format: text or json (one object per line) [default: text].
    #[arg(long, value_name = "FORMAT", env = "LAMINA_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Check each frozen layer of a stack against its content manifest before its first mount after a
    /// start; a mismatch refuses the mount [default: false].
    #[arg(long, value_name = "BOOL", env = "LAMINA_VERIFY_ON_MOUNT", num_args = 0..=1,
        default_missing_value = "true")]
    pub verify_on_mount: Option<bool>,
    /// Start even when the metadata database is new (missing or empty) or belongs to another data root
    /// while layer directories are present: they are moved, untouched, to `<data-root>/quarantine/`
    /// (`lamina gc` lists and removes them). Without it lamina refuses to start and changes nothing.
    #[arg(long)]
    pub quarantine_unknown: bool,
}

/// `none` (or an empty value) turns a socket off.
fn socket_setting(value: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    match value {
        Some(p) if p.as_os_str().is_empty() || p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => Some(default.into()),
    }
}

/// Merges flags over the file over the defaults, and checks the result.
pub fn resolve(file: FileConfig, flags: Flags) -> anyhow::Result<Settings> {
    let data_root: PathBuf = flags
        .data_root
        .or(file.data_root)
        .unwrap_or_else(|| DEFAULT_DATA_ROOT.into());
    let mut volumes_file = file.volumes;
    if let Some(base) = flags.volumes_mount_base {
        volumes_file.get_or_insert_with(VolumesFile::default).mount_base = Some(base);
    }
    let volumes = volume_settings(volumes_file, &data_root, std::env::var("REMOTE_PATH").ok())?;
    let cluster = cluster_settings(file.cluster, &data_root)?;
    let s = Settings {
        data_root,
        socket: socket_setting(flags.socket.or(file.socket), DEFAULT_SOCKET),
        snapshotter_socket: socket_setting(
            flags.snapshotter_socket.or(file.snapshotter_socket),
            DEFAULT_SNAPSHOTTER_SOCKET,
        ),
        log_level: flags
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| "info".into()),
        volumes,
        gc_interval: file
            .gc_interval_secs
            .filter(|s| *s > 0)
            .map(std::time::Duration::from_secs),
        metrics_address: match flags.metrics_address.or(file.metrics_address) {
            Some(a) if a.is_empty() || a == "none" => None,
            Some(a) => Some(crate::metrics::MetricsAddress::parse(&a)?),
            None => None,
        },
        log_format: LogFormat::parse(flags.log_format.or(file.log_format).as_deref().unwrap_or("text"))?,
        verify_on_mount: flags.verify_on_mount.or(file.verify_on_mount).unwrap_or(false),
        quarantine_unknown: flags.quarantine_unknown,
        cluster,
        store_rbd: crate::store_config::store_settings(file.store)?,
    };
    if !s.data_root.is_absolute() {
        bail!("data root {} must be an absolute path", s.data_root.display());
    }
    let sockets: Vec<&PathBuf> = s.socket.iter().chain(s.snapshotter_socket.iter()).collect();
    if sockets.is_empty() {
        bail!("both sockets are turned off: nothing to serve");
    }
    for sock in &sockets {
        if !sock.is_absolute() {
            bail!("socket {} must be an absolute path", sock.display());
        }
        if sock.starts_with(&s.data_root) {
            bail!("socket {} must not live inside the data root", sock.display());
        }
    }
    if sockets.len() == 2 && sockets[0] == sockets[1] {
        bail!("the plugin socket and the snapshotter socket must differ");
    }
    if let (Some(d), None) = (&s.cluster.dir, &s.cluster.moosefs) {
        if d.starts_with(&s.data_root) {
            bail!("[cluster] dir must not live inside the data root");
        }
    }
    Ok(s)
}

/// The `[volumes]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumesFile {
    /// Serve the VolumeDriver protocol (default true).
    pub enabled: Option<bool>,
    /// `local` (default), `moosefs` or `rbd`: the backend of volumes created without `-o backend=`.
    pub backend: Option<String>,
    /// Volumes are mounted at `<mount_base>/<name>` (default `/mnt/docker-volumes`).
    pub mount_base: Option<PathBuf>,
    /// `delete` (default) or `trash`: what Remove does with the data.
    pub on_remove: Option<String>,
    /// Deadline of each cluster operation and tool run, in seconds (default 10).
    pub timeout_secs: Option<u64>,
    /// The MooseFS/LizardFS backend.
    pub moosefs: Option<MooseFsFile>,
    /// The Ceph RBD backend.
    pub rbd: Option<RbdFile>,
}

/// The `[volumes.rbd]` table; see docs/rbd.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdFile {
    /// Ceph configuration file (default `/etc/ceph/ceph.conf`).
    pub ceph_conf: Option<PathBuf>,
    /// Client id, `--id` (default `admin`).
    pub client: Option<String>,
    /// Pool of the images (default `rbd`).
    pub pool: Option<String>,
    /// Image name = prefix + volume name (default `lamina-vol-`).
    pub image_prefix: Option<String>,
    /// Size of volumes created without `-o size=` (default `10G`).
    pub size: Option<String>,
    /// `ext4` (default) or `xfs`: filesystem of volumes created without `-o fs=`.
    pub fs: Option<String>,
    /// `auto` (default), `krbd` or `fuse`: how images reach this host.
    pub map: Option<String>,
    /// This host's name in the image locks (default: the host name); unique per host sharing the pool.
    pub host: Option<String>,
    /// The `rbd` program (default `rbd`).
    pub rbd: Option<PathBuf>,
    /// The `rbd-fuse` program (default `rbd-fuse`).
    pub rbd_fuse: Option<PathBuf>,
    /// The `ceph` program (default `ceph`).
    pub ceph: Option<PathBuf>,
}

/// Letters, digits, `_`, `.`, `-` (what a pool, client id, host id or image prefix may hold here).
pub(crate) fn plain_word(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && !s.starts_with('-')
}

fn rbd_settings(r: RbdFile) -> anyhow::Result<lamina_volume::RbdConfig> {
    use lamina_volume::{FsType, MapMode};
    let word = |what: &str, v: String, allow_empty: bool| -> anyhow::Result<String> {
        if (v.is_empty() && !allow_empty) || !plain_word(&v) {
            bail!("[volumes.rbd] {what} {v:?}: letters, digits, '_', '.' and '-' only");
        }
        Ok(v)
    };
    let host = match r.host {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("[volumes.rbd] host is not set and the host name cannot be read")?,
    };
    let size = r.size.unwrap_or_else(|| "10G".into());
    let default_size = lamina_volume::options::parse_size_of("size", &size)
        .map_err(|e| anyhow::anyhow!("[volumes.rbd] {e}"))?;
    let fs = r.fs.unwrap_or_else(|| "ext4".into());
    let map = r.map.unwrap_or_else(|| "auto".into());
    let ceph_conf = r.ceph_conf.unwrap_or_else(|| "/etc/ceph/ceph.conf".into());
    if !ceph_conf.is_absolute() {
        bail!("[volumes.rbd] ceph_conf must be an absolute path");
    }
    Ok(lamina_volume::RbdConfig {
        ceph_conf,
        client_id: word("client", r.client.unwrap_or_else(|| "admin".into()), false)?,
        pool: word("pool", r.pool.unwrap_or_else(|| "rbd".into()), false)?,
        image_prefix: word(
            "image_prefix",
            r.image_prefix.unwrap_or_else(|| "lamina-vol-".into()),
            true,
        )?,
        default_size,
        default_fs: FsType::parse(&fs)
            .with_context(|| format!("[volumes.rbd] fs {fs:?}: must be \"ext4\" or \"xfs\""))?,
        map: MapMode::parse(&map)
            .with_context(|| format!("[volumes.rbd] map {map:?}: must be \"auto\", \"krbd\" or \"fuse\""))?,
        host_id: word("host", host, false)?,
        rbd: r.rbd.unwrap_or_else(|| "rbd".into()),
        rbd_fuse: r.rbd_fuse.unwrap_or_else(|| "rbd-fuse".into()),
        ceph: r.ceph.unwrap_or_else(|| "ceph".into()),
    })
}

/// The `[volumes.moosefs]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MooseFsFile {
    /// `HOST:PORT` or `HOST` (port 9421) of the master. Required.
    pub master: Option<String>,
    /// Cluster path mounted by lamina (`mfsmount -S`, default `/`).
    pub subfolder: Option<String>,
    /// Directory of the volumes inside the subfolder (default `/docker/volumes`; `REMOTE_PATH` overrides).
    pub remote_path: Option<String>,
    /// Extra mount options, each passed as `-o OPTION`.
    pub mount_options: Option<Vec<String>>,
    /// The mount program (default `mfsmount`).
    pub mfsmount: Option<PathBuf>,
    /// Where lamina mounts the cluster (default `<data_root>/volumes/moosefs`).
    pub mountpoint: Option<PathBuf>,
    /// Goal command, argv with `{goal}` and `{path}` (default `mfssetgoal -r {goal} {path}`).
    pub goal_command: Option<Vec<String>>,
    /// Goal query, argv with `{path}` (default `mfsgetgoal {path}`; `[]` disables).
    pub getgoal_command: Option<Vec<String>>,
    /// Quota command, argv with `{size}` (bytes) and `{path}` (default `mfssetquota -L {size} {path}`;
    /// `[]` disables `-o quota=`).
    pub quota_command: Option<Vec<String>>,
    /// Goal of volumes created without `ReplicationGoal` (default: none, the cluster's own default applies):
    /// a number (`2` or `"2"`) or a goal name (`"ssd"`).
    #[serde(default, deserialize_with = "goal_text")]
    pub default_goal: Option<String>,
}

/// Reads a goal written as a TOML integer or string into its text, which `Goal::parse` then checks.
fn goal_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct GoalText;
    impl serde::de::Visitor<'_> for GoalText {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a goal: a number of copies or a goal name")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            if v < 0 {
                return Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self));
            }
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(GoalText).map(Some)
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn template(what: &str, v: Vec<String>, allowed: &[&str]) -> anyhow::Result<lamina_volume::CommandTemplate> {
    lamina_volume::CommandTemplate::new(what, v, allowed)
        .map_err(|e| anyhow::anyhow!("[volumes.moosefs] {e}"))
}

fn optional_template(
    what: &str,
    v: Option<Vec<String>>,
    default: &[&str],
    allowed: &[&str],
) -> anyhow::Result<Option<lamina_volume::CommandTemplate>> {
    match v {
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => template(what, v, allowed).map(Some),
        None => template(what, argv(default), allowed).map(Some),
    }
}

/// `HOST:PORT` or `HOST` (port 9421) of a MooseFS master, checked; `table` names the table in errors.
fn master_address(table: &str, master: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = match master.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("{table} master {master:?}: bad port"))?,
        ),
        None => (master.to_string(), 9421),
    };
    if host.is_empty() || host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c == '/') {
        bail!("{table} master {master:?}: bad host");
    }
    Ok((host, port))
}

/// A path inside a MooseFS cluster: absolute, without `..` or NUL.
fn cluster_path(table: &str, what: &str, p: String) -> anyhow::Result<String> {
    if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p.contains('\0') {
        bail!("{table} {what} {p:?} must be an absolute cluster path without ..");
    }
    Ok(p)
}

/// The deadline of cluster operations: `timeout_secs`, 1-100 (default 10).
fn cluster_timeout(table: &str, secs: Option<u64>) -> anyhow::Result<std::time::Duration> {
    Ok(std::time::Duration::from_secs(match secs {
        None => 10,
        Some(t @ 1..=100) => t,
        Some(t) => bail!("{table} timeout_secs {t}: must be 1-100 (dockerd gives most calls 30 s)"),
    }))
}

/// Checks `[cluster.moosefs]`; gives the mount and the tier's directory on it.
fn tier_mount_settings(m: ClusterMooseFsFile, data_root: &Path) -> anyhow::Result<(TierMount, PathBuf)> {
    const T: &str = "[cluster.moosefs]";
    let master = m
        .master
        .with_context(|| format!("{T} master (\"HOST:PORT\") is required"))?;
    let (master_host, master_port) = master_address(T, &master)?;
    let subfolder = cluster_path(T, "subfolder", m.subfolder.unwrap_or_else(|| "/".into()))?;
    let remote_path = cluster_path(
        T,
        "remote_path",
        m.remote_path.unwrap_or_else(|| DEFAULT_TIER_REMOTE_PATH.into()),
    )?;
    let rel = remote_path.trim_matches('/');
    if rel.is_empty() {
        bail!("{T} remote_path {remote_path:?}: the tier needs a directory of its own, not the mount's root");
    }
    let mountpoint = data_root.join(TIER_MOUNT_PARENT).join(TIER_MOUNT_NAME);
    let tier = mountpoint.join(rel);
    Ok((
        TierMount {
            mount: lamina_volume::MfsMountConfig {
                master_host,
                master_port,
                subfolder,
                mount_options: m.mount_options.unwrap_or_default(),
                mfsmount: m.mfsmount.unwrap_or_else(|| "mfsmount".into()),
                mountpoint,
            },
            timeout: cluster_timeout(T, m.timeout_secs)?,
        },
        tier,
    ))
}

/// Checks `[volumes]` and fills in the defaults.
pub fn volume_settings(
    file: Option<VolumesFile>,
    data_root: &Path,
    remote_path_env: Option<String>,
) -> anyhow::Result<Option<lamina_volume::VolumeConfig>> {
    use lamina_volume::{BackendKind, Goal, OnRemove};
    let file = file.unwrap_or_default();
    if file.enabled == Some(false) {
        return Ok(None);
    }
    let backend = match file.backend.as_deref() {
        None => BackendKind::Local,
        Some(b) => BackendKind::parse(b)
            .with_context(|| format!("[volumes] backend {b:?}: must be \"local\", \"moosefs\" or \"rbd\""))?,
    };
    let on_remove = match file.on_remove.as_deref() {
        None | Some("delete") => OnRemove::Delete,
        Some("trash") => OnRemove::Trash,
        Some(o) => bail!("[volumes] on_remove {o:?}: must be \"delete\" or \"trash\""),
    };
    let mount_base = file
        .mount_base
        .unwrap_or_else(|| lamina_volume::DEFAULT_MOUNT_BASE.into());
    if !mount_base.is_absolute() {
        bail!(
            "[volumes] mount_base {} must be an absolute path",
            mount_base.display()
        );
    }
    if mount_base.starts_with(data_root) {
        bail!("[volumes] mount_base must not live inside the data root");
    }
    let timeout = cluster_timeout("[volumes]", file.timeout_secs)?;
    let state_dir = data_root.join("volumes");
    let moosefs = match file.moosefs {
        None => None,
        Some(m) => {
            let master = m
                .master
                .context("[volumes.moosefs] master (\"HOST:PORT\") is required")?;
            let (host, port) = master_address("[volumes.moosefs]", &master)?;
            let clean = |what: &str, p: String| cluster_path("[volumes.moosefs]", what, p);
            let subfolder = clean("subfolder", m.subfolder.unwrap_or_else(|| "/".into()))?;
            let remote_path = clean(
                "remote_path (or REMOTE_PATH)",
                remote_path_env
                    .filter(|s| !s.is_empty())
                    .or(m.remote_path)
                    .unwrap_or_else(|| "/docker/volumes".into()),
            )?;
            let default_goal = m
                .default_goal
                .map(|g| Goal::parse(&g).map_err(|e| anyhow::anyhow!("[volumes.moosefs] default_goal: {e}")))
                .transpose()?;
            let mountpoint = m.mountpoint.unwrap_or_else(|| state_dir.join("moosefs"));
            if !mountpoint.is_absolute() {
                bail!("[volumes.moosefs] mountpoint must be an absolute path");
            }
            Some(lamina_volume::MooseFsConfig {
                mount: lamina_volume::MfsMountConfig {
                    master_host: host,
                    master_port: port,
                    subfolder,
                    mount_options: m.mount_options.unwrap_or_default(),
                    mfsmount: m.mfsmount.unwrap_or_else(|| "mfsmount".into()),
                    mountpoint,
                },
                remote_path,
                goal_command: template(
                    "goal_command",
                    m.goal_command
                        .unwrap_or_else(|| argv(&["mfssetgoal", "-r", "{goal}", "{path}"])),
                    &["{goal}", "{path}"],
                )?,
                getgoal_command: optional_template(
                    "getgoal_command",
                    m.getgoal_command,
                    &["mfsgetgoal", "{path}"],
                    &["{path}"],
                )?,
                quota_command: optional_template(
                    "quota_command",
                    m.quota_command,
                    &["mfssetquota", "-L", "{size}", "{path}"],
                    &["{size}", "{path}"],
                )?,
                default_goal,
            })
        }
    };
    if backend == BackendKind::Moosefs && moosefs.is_none() {
        bail!("[volumes] backend = \"moosefs\" needs a [volumes.moosefs] table");
    }
    let rbd = file.rbd.map(rbd_settings).transpose()?;
    if backend == BackendKind::Rbd && rbd.is_none() {
        bail!("[volumes] backend = \"rbd\" needs a [volumes.rbd] table");
    }
    Ok(Some(lamina_volume::VolumeConfig {
        state_dir,
        default_backend: backend,
        mount_base,
        on_remove,
        timeout,
        moosefs,
        rbd,
        lease: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beat_defaults() {
        let file: FileConfig = toml::from_str("data_root = \"/srv/l\"\nlog_level = \"debug\"").unwrap();
        let flags = Flags {
            socket: Some("/run/x.sock".into()),
            ..Flags::default()
        };
        let s = resolve(file, flags).unwrap();
        assert_eq!(s.data_root, PathBuf::from("/srv/l"));
        assert_eq!(s.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(
            s.snapshotter_socket,
            Some(PathBuf::from(DEFAULT_SNAPSHOTTER_SOCKET))
        );
        assert_eq!(s.log_level, "debug");
        let d = resolve(FileConfig::default(), Flags::default()).unwrap();
        assert_eq!(d.data_root, PathBuf::from(DEFAULT_DATA_ROOT));
        assert_eq!(d.socket, Some(PathBuf::from(DEFAULT_SOCKET)));
    }

    #[test]
    fn sockets_can_be_turned_off_but_not_both() {
        let file: FileConfig = toml::from_str("socket = \"none\"").unwrap();
        let s = resolve(file, Flags::default()).unwrap();
        assert_eq!(s.socket, None);
        assert!(s.snapshotter_socket.is_some());
        let flags = Flags {
            socket: Some("none".into()),
            snapshotter_socket: Some("".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), flags).is_err());
        let same = Flags {
            socket: Some("/run/a.sock".into()),
            snapshotter_socket: Some("/run/a.sock".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), same).is_err());
        let inside = Flags {
            data_root: Some("/srv/l".into()),
            snapshotter_socket: Some("/srv/l/s.sock".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), inside).is_err());
    }

    #[test]
    fn volumes_table() {
        let text = r#"
            [volumes]
            backend = "moosefs"
            mount_base = "/mnt/v"
            on_remove = "trash"
            [volumes.moosefs]
            master = "198.18.0.1:9421"
            subfolder = "/"
            mount_options = ["mfscachemode=DIRECT"]
            goal_command = ["lizardfs", "setgoal", "-r", "{goal}", "{path}"]
            quota_command = []
            default_goal = "2"
        "#;
        let file: FileConfig = toml::from_str(text).unwrap();
        let v = volume_settings(file.volumes, Path::new("/d"), None)
            .unwrap()
            .unwrap();
        assert_eq!(v.default_backend, lamina_volume::BackendKind::Moosefs);
        assert_eq!(v.mount_base, PathBuf::from("/mnt/v"));
        assert_eq!(v.on_remove, lamina_volume::OnRemove::Trash);
        let m = v.moosefs.unwrap();
        assert_eq!(
            (m.mount.master_host.as_str(), m.mount.master_port),
            ("198.18.0.1", 9421)
        );
        assert_eq!(m.remote_path, "/docker/volumes");
        assert_eq!(m.mount.mountpoint, PathBuf::from("/d/volumes/moosefs"));
        assert_eq!(m.goal_command.program(), "lizardfs");
        assert!(m.quota_command.is_none());
        assert_eq!(m.default_goal, Some(lamina_volume::Goal::Copies(2)));
        let file: FileConfig = toml::from_str(text).unwrap();
        let v = volume_settings(file.volumes, Path::new("/d"), Some("/lizard/vols".into()))
            .unwrap()
            .unwrap();
        assert_eq!(v.moosefs.unwrap().remote_path, "/lizard/vols", "REMOTE_PATH wins");

        let d = volume_settings(None, Path::new("/d"), None).unwrap().unwrap();
        assert_eq!(d.default_backend, lamina_volume::BackendKind::Local);
        assert_eq!(d.mount_base, PathBuf::from("/mnt/docker-volumes"));
        assert!(d.moosefs.is_none());
        let off: FileConfig = toml::from_str("[volumes]\nenabled = false").unwrap();
        assert!(volume_settings(off.volumes, Path::new("/d"), None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn goals_as_numbers_or_names() {
        use lamina_volume::Goal;
        for (value, want) in [
            ("2", Goal::Copies(2)),
            ("\"2\"", Goal::Copies(2)),
            ("9", Goal::Copies(9)),
            ("\"ssd_2-copies\"", Goal::Named("ssd_2-copies".into())),
        ] {
            let text = format!("[volumes.moosefs]\nmaster = \"h:1\"\ndefault_goal = {value}");
            let file: FileConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{value}: {e}"));
            let v = volume_settings(file.volumes, Path::new("/d"), None)
                .unwrap()
                .unwrap();
            assert_eq!(v.moosefs.unwrap().default_goal, Some(want), "{value}");
        }
        let file: FileConfig = toml::from_str("[volumes.moosefs]\nmaster = \"h:1\"").unwrap();
        let v = volume_settings(file.volumes, Path::new("/d"), None)
            .unwrap()
            .unwrap();
        assert_eq!(v.moosefs.unwrap().default_goal, None, "no default goal");
    }

    #[test]
    fn bad_volumes_tables() {
        for (text, want) in [
            ("[volumes]\nbakend = \"local\"", "unknown field"),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\nmfsmnt = \"x\"",
                "unknown field",
            ),
            ("[volumes]\nbackend = \"nfs\"", "must be"),
            ("[volumes]\nbackend = \"moosefs\"", "needs a [volumes.moosefs]"),
            ("[volumes]\non_remove = \"keep\"", "delete"),
            ("[volumes]\nmount_base = \"rel\"", "absolute"),
            ("[volumes]\ntimeout_secs = 0", "1-100"),
            ("[volumes.moosefs]\nsubfolder = \"/\"", "master"),
            ("[volumes.moosefs]\nmaster = \"h:x\"", "bad port"),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\nremote_path = \"/a/../b\"",
                "without ..",
            ),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\ngoal_command = []",
                "empty command",
            ),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\ngoal_command = [\"x\", \"{size}\"]",
                "not available",
            ),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\ndefault_goal = \"10\"",
                "1-9",
            ),
            ("[volumes.moosefs]\nmaster = \"h:1\"\ndefault_goal = 10", "1-9"),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\ndefault_goal = -1",
                "invalid value: integer `-1`",
            ),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\ndefault_goal = 2.5",
                "a goal: a number of copies or a goal name",
            ),
            (
                "[volumes.moosefs]\nmaster = \"h:1\"\ndefault_goal = true",
                "a goal: a number of copies or a goal name",
            ),
        ] {
            let e = toml::from_str::<FileConfig>(text)
                .map_err(anyhow::Error::from)
                .and_then(|f| volume_settings(f.volumes, Path::new("/d"), None));
            let e = format!("{:#}", e.unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn mount_base_flag_beats_the_volumes_table() {
        let file = FileConfig::parse("[volumes]\nmount_base = \"/mnt/v\"", "test").unwrap();
        let flags = Flags {
            data_root: Some("/p/store".into()),
            volumes_mount_base: Some("/p/volumes".into()),
            ..Flags::default()
        };
        let s = resolve(file, flags).unwrap();
        assert_eq!(s.volumes.unwrap().mount_base, PathBuf::from("/p/volumes"));
        let flags = Flags {
            volumes_mount_base: Some("/p/volumes".into()),
            ..Flags::default()
        };
        let s = resolve(FileConfig::default(), flags).unwrap();
        assert_eq!(s.volumes.unwrap().mount_base, PathBuf::from("/p/volumes"));
    }

    #[test]
    fn metrics_logs_and_verify_settings() {
        let d = resolve(FileConfig::default(), Flags::default()).unwrap();
        assert_eq!(d.metrics_address, None);
        assert_eq!(d.log_format, LogFormat::Text);
        assert!(!d.verify_on_mount);
        let file = FileConfig::parse(
            "metrics_address = \"unix:/run/lamina/metrics.sock\"\nlog_format = \"json\"\nverify_on_mount = true",
            "test",
        )
        .unwrap();
        let s = resolve(file, Flags::default()).unwrap();
        assert_eq!(
            s.metrics_address,
            Some(crate::metrics::MetricsAddress::Unix(
                "/run/lamina/metrics.sock".into()
            ))
        );
        assert_eq!(s.log_format, LogFormat::Json);
        assert!(s.verify_on_mount);
        let file = FileConfig::parse(
            "metrics_address = \"127.0.0.1:9323\"\nverify_on_mount = true",
            "t",
        )
        .unwrap();
        let flags = Flags {
            metrics_address: Some("none".into()),
            log_format: Some("text".into()),
            verify_on_mount: Some(false),
            ..Flags::default()
        };
        let s = resolve(file, flags).unwrap();
        assert_eq!(s.metrics_address, None, "a flag of none wins over the file");
        assert!(!s.verify_on_mount);
        for (text, want) in [
            ("log_format = \"xml\"", "text"),
            ("metrics_address = \"9323\"", "HOST:PORT"),
            ("metrics_address = \"unix:rel\"", "absolute"),
        ] {
            let e = resolve(FileConfig::parse(text, "t").unwrap(), Flags::default()).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text}: {e:#}");
        }
    }

    #[test]
    fn rbd_volumes_table() {
        let text = r#"
            [volumes]
            backend = "rbd"
            [volumes.rbd]
            ceph_conf = "/etc/ceph/test.conf"
            pool = "vols"
            size = "1G"
            fs = "xfs"
            map = "fuse"
            host = "node-1"
        "#;
        let file: FileConfig = toml::from_str(text).unwrap();
        let v = volume_settings(file.volumes, Path::new("/d"), None)
            .unwrap()
            .unwrap();
        assert_eq!(v.default_backend, lamina_volume::BackendKind::Rbd);
        let r = v.rbd.unwrap();
        assert_eq!(r.pool, "vols");
        assert_eq!(r.default_size, 1 << 30);
        assert_eq!(r.default_fs, lamina_volume::FsType::Xfs);
        assert_eq!(r.map, lamina_volume::MapMode::Fuse);
        assert_eq!(r.host_id, "node-1");
        assert_eq!(r.client_id, "admin");
        assert_eq!(r.image_prefix, "lamina-vol-");
        for (bad, want) in [
            ("[volumes]\nbackend = \"rbd\"\n", "needs a [volumes.rbd] table"),
            (
                "[volumes.rbd]\nmap = \"nbd\"\n",
                "must be \"auto\", \"krbd\" or \"fuse\"",
            ),
            ("[volumes.rbd]\nfs = \"btrfs\"\n", "must be \"ext4\" or \"xfs\""),
            ("[volumes.rbd]\npool = \"a b\"\n", "letters, digits"),
            ("[volumes.rbd]\nsize = \"lots\"\n", "not a size"),
            ("[volumes.rbd]\nceph_conf = \"rel.conf\"\n", "absolute"),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let e = volume_settings(file.volumes, Path::new("/d"), None).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{bad}: {e:#}");
        }
    }

    #[test]
    fn cluster_table() {
        let d = resolve(FileConfig::default(), Flags::default()).unwrap().cluster;
        assert_eq!(d.dir, None);
        assert_eq!(d.host_id, None);
        assert_eq!(d.lease, lamina_lease::DEFAULT_LEASE);
        assert_eq!(d.heartbeat, lamina_lease::DEFAULT_HEARTBEAT);
        let file = FileConfig::parse(
            "[cluster]\ndir = \"/mnt/mfs/lamina\"\nhost_id = \"node-1\"\nlease_secs = 6\nheartbeat_secs = 2",
            "t",
        )
        .unwrap();
        let c = resolve(file, Flags::default()).unwrap().cluster;
        assert_eq!(c.dir, Some(PathBuf::from("/mnt/mfs/lamina")));
        assert_eq!(c.host_id.as_ref().map(|h| h.as_str()), Some("node-1"));
        assert_eq!(c.lease, std::time::Duration::from_secs(6));
        assert_eq!(c.heartbeat, std::time::Duration::from_secs(2));
        assert_eq!(c.host_id(Path::new("/nonexistent")).unwrap().as_str(), "node-1");
        let long_beat = FileConfig::parse("[cluster]\nheartbeat_secs = 20", "t").unwrap();
        let c = resolve(long_beat, Flags::default()).unwrap().cluster;
        assert_eq!(
            c.lease,
            std::time::Duration::from_secs(40),
            "the default lease follows the heartbeat"
        );
        assert_eq!(
            d.layer_format,
            lamina_store::TierFormat::Erofs,
            "images by default"
        );
        let dirs = FileConfig::parse("[cluster]\nlayer_format = \"directory\"", "t").unwrap();
        let c = resolve(dirs, Flags::default()).unwrap().cluster;
        assert_eq!(c.layer_format, lamina_store::TierFormat::Directory);
        assert!(FileConfig::parse("[cluster]\nlayer_format = \"squashfs\"", "t").is_err());
        assert_eq!(d.usage_retention, lamina_store::DEFAULT_USAGE_RETENTION);
        let kept = FileConfig::parse("[cluster]\nusage_retention_days = 2", "t").unwrap();
        let c = resolve(kept, Flags::default()).unwrap().cluster;
        assert_eq!(c.usage_retention, std::time::Duration::from_secs(2 * 86_400));
        let t = tempfile::tempdir().unwrap();
        let id = d.host_id(t.path()).unwrap();
        assert_eq!(d.host_id(t.path()).unwrap(), id, "kept in the data root");
        assert!(t.path().join(HOST_ID_FILE).exists());
        for (text, want) in [
            ("[cluster]\ndir = \"rel\"", "absolute"),
            (
                "[cluster]\ndir = \"/var/lib/lamina/tier\"",
                "inside the data root",
            ),
            ("[cluster]\nhost_id = \"a b\"", "letters"),
            ("[cluster]\nlease_secs = 3\nheartbeat_secs = 2", "twice"),
            ("[cluster]\nheartbeat_secs = 0", "at least 1 s"),
            ("[cluster]\nlease_secs = 100000", "at most"),
            ("[cluster]\nusage_retention_days = 40000", "at most 36500"),
            ("[cluster]\nleas_secs = 3", "unknown field"),
        ] {
            let e = FileConfig::parse(text, "t")
                .and_then(|f| resolve(f, Flags::default()))
                .unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text}: {e:#}");
        }
    }

    #[test]
    fn cluster_moosefs_table() {
        let text = r#"
            data_root = "/srv/l"
            [cluster]
            host_id = "node-1"
            [cluster.moosefs]
            master = "198.18.0.1:9521"
            subfolder = "/shared"
            remote_path = "/lamina/tier"
            mount_options = ["mfscachemode=DIRECT"]
            mfsmount = "/usr/local/bin/mfsmount"
            timeout_secs = 4
        "#;
        let c = resolve(FileConfig::parse(text, "t").unwrap(), Flags::default())
            .unwrap()
            .cluster;
        assert_eq!(
            c.dir,
            Some(PathBuf::from("/srv/l/cluster/moosefs/lamina/tier")),
            "the tier is remote_path on lamina's own mount, in the data root"
        );
        let m = c.moosefs.unwrap();
        assert_eq!(
            m.mount,
            lamina_volume::MfsMountConfig {
                master_host: "198.18.0.1".into(),
                master_port: 9521,
                subfolder: "/shared".into(),
                mount_options: vec!["mfscachemode=DIRECT".into()],
                mfsmount: "/usr/local/bin/mfsmount".into(),
                mountpoint: "/srv/l/cluster/moosefs".into(),
            }
        );
        assert_eq!(m.timeout, std::time::Duration::from_secs(4));
        let least = "[cluster.moosefs]\nmaster = \"mfsmaster\"";
        let c = resolve(FileConfig::parse(least, "t").unwrap(), Flags::default())
            .unwrap()
            .cluster;
        assert_eq!(
            c.dir,
            Some(PathBuf::from("/var/lib/lamina/cluster/moosefs/lamina"))
        );
        let m = c.moosefs.unwrap();
        assert_eq!(
            (m.mount.master_host.as_str(), m.mount.master_port),
            ("mfsmaster", 9421)
        );
        assert_eq!(m.mount.subfolder, "/");
        assert_eq!(m.mount.mfsmount, PathBuf::from("mfsmount"));
        assert!(m.mount.mount_options.is_empty());
        assert_eq!(m.timeout, std::time::Duration::from_secs(10));
        assert_eq!(
            resolve(FileConfig::default(), Flags::default())
                .unwrap()
                .cluster
                .moosefs,
            None
        );
        for (text, want) in [
            (
                "[cluster]\ndir = \"/mnt/mfs/lamina\"\n[cluster.moosefs]\nmaster = \"m\"",
                "[cluster] dir and [cluster.moosefs] exclude each other",
            ),
            (
                "[cluster.moosefs]\nsubfolder = \"/\"",
                "master (\"HOST:PORT\") is required",
            ),
            ("[cluster.moosefs]\nmaster = \"m:0\"", "bad port"),
            ("[cluster.moosefs]\nmaster = \"m:x\"", "bad port"),
            ("[cluster.moosefs]\nmaster = \"-m\"", "bad host"),
            (
                "[cluster.moosefs]\nmaster = \"m\"\nremote_path = \"/\"",
                "a directory of its own",
            ),
            (
                "[cluster.moosefs]\nmaster = \"m\"\nremote_path = \"tier\"",
                "[cluster.moosefs] remote_path \"tier\" must be an absolute cluster path",
            ),
            (
                "[cluster.moosefs]\nmaster = \"m\"\nsubfolder = \"/a/../b\"",
                "without ..",
            ),
            (
                "[cluster.moosefs]\nmaster = \"m\"\ntimeout_secs = 0",
                "must be 1-100",
            ),
            (
                "[cluster.moosefs]\nmaster = \"m\"\nmountpoint = \"/x\"",
                "unknown field",
            ),
        ] {
            let e = FileConfig::parse(text, "t")
                .and_then(|f| resolve(f, Flags::default()))
                .unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text}: {e:#}");
        }
    }

    #[test]
    fn unknown_keys_and_relative_paths_are_refused() {
        assert!(toml::from_str::<FileConfig>("datroot = \"/x\"").is_err());
        let rel = Flags {
            data_root: Some("rel".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), rel).is_err());
    }
}
