//! `lamina serve`: open the store, bind the sockets, serve until SIGTERM/SIGINT.
//!
//! The Docker plugin socket, the admin socket and the metrics endpoint are served by the blocking HTTP server
//! of `lamina-http` (a thread per connection, see docs/architecture.md); the plugin socket on the main thread.
//! The containerd snapshotter is gRPC and runs in a single-threaded tokio runtime on its own thread, calling
//! the store on tokio's blocking pool (a Mounts the store can answer from memory is answered on that thread).
//! One flag stops them all.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use lamina_docker::{Router, ShutdownHandle};
use lamina_store::{CheckOutcome, OpenOptions, Store};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::adapters::graphdriver::GraphDriverAdapter;
use crate::adapters::snapshotter::SnapshotterAdapter;
use crate::adapters::volumedriver::VolumeDriverAdapter;
use crate::config::{LogFormat, Settings};
use crate::metrics::{self, VerifyOutcome};

/// How long in-flight gRPC calls get to finish after a termination signal.
const GRPC_DRAIN: Duration = Duration::from_secs(5);
/// How often usage counters are written to the database (the most a crash loses).
const STATS_FLUSH: Duration = Duration::from_secs(10);

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    // A plain level applies to lamina; the HTTP/2 stack's own debug output (every frame) stays quiet.
    let directives = if ["error", "warn", "info", "debug", "trace"].contains(&level) {
        format!("{level},h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn")
    } else {
        level.to_string()
    };
    let filter = EnvFilter::try_new(&directives).with_context(|| format!("bad log level {level:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours only on a terminal; a log file or journald gets plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per line; the request span's fields (`rid`) are in "span" and "spans".
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

/// How the daemon opens its store: recovering (serve mode), with `verify_on_mount` as configured and its
/// checks counted in the metrics.
fn store_options(settings: &Settings) -> OpenOptions {
    OpenOptions {
        verify_on_mount: settings.verify_on_mount,
        quarantine_unknown: settings.quarantine_unknown,
        rbd: settings.store_rbd.clone(),
        on_check: Some(Arc::new(|outcome, bytes, elapsed| {
            let outcome = match outcome {
                CheckOutcome::Clean => VerifyOutcome::Clean,
                CheckOutcome::Skipped => VerifyOutcome::Skipped,
                CheckOutcome::Mismatch => VerifyOutcome::Mismatch,
                CheckOutcome::Error => VerifyOutcome::Error,
            };
            metrics::verified(outcome, bytes, elapsed);
        })),
        ..OpenOptions::default()
    }
}

/// Runs the daemon with `settings` until a termination signal.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    init_logging(&settings.log_level, settings.log_format)?;
    let mut options = store_options(&settings);
    // The cluster tier: lamina's own mount of it (`[cluster.moosefs]`), kept when the daemon stops (the image
    // layers' mounts read through it for running containers; the next start adopts it), then this host's
    // lease on the shared directory, beating until the daemon stops.
    crate::cluster::mount_tier(&settings)?;
    let (tier, _heartbeat) = crate::cluster::tier_options(&settings)?.unzip();
    options.tier = tier;
    let store = Arc::new(
        Store::open_with_options(&settings.data_root, options)
            .with_context(|| format!("opening the store at {}", settings.data_root.display()))?,
    );
    if settings.verify_on_mount {
        info!("verify_on_mount: frozen layers are checked against their manifests before their first mount");
    }
    let shutdown = ShutdownHandle::new();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.flag()).context("installing signal handlers")?;
    }
    // Bind everything before serving anything, so a bad socket fails the start cleanly.
    let metrics = settings
        .metrics_address
        .as_ref()
        .map(crate::metrics::bind)
        .transpose()?;
    let mut volumes = None;
    let plugin = match &settings.socket {
        Some(path) => {
            let graph =
                Arc::new(GraphDriverAdapter::new(store.clone()).context("restoring graphdriver settings")?);
            let mut router = Router::new().with_graph_driver(graph);
            if let Some(observer) = crate::metrics::plugin_observer() {
                router = router.with_observer(observer);
            }
            // Volumes are served on the plugin socket only; the service mounts its cluster (if any) now.
            if let Some(mut cfg) = settings.volumes.clone() {
                if cfg.moosefs.is_some() {
                    cfg.lease = Some(lamina_volume::VolumeLeaseConfig {
                        host: settings.cluster.host_id(&settings.data_root)?,
                        lease: settings.cluster.lease,
                        heartbeat: settings.cluster.heartbeat,
                    });
                }
                let v =
                    Arc::new(lamina_volume::VolumeManager::open(cfg).context("opening the volume service")?);
                router = router.with_volume_driver(Arc::new(VolumeDriverAdapter::new(v.clone())));
                volumes = Some(v);
            }
            let router = Arc::new(router);
            let listener =
                lamina_docker::bind_socket(path).with_context(|| format!("binding {}", path.display()))?;
            Some((path.clone(), router, listener))
        }
        None => None,
    };
    let admin_listener = crate::admin::bind(&settings.data_root)?;
    let grpc = match &settings.snapshotter_socket {
        Some(path) => {
            let backend = Arc::new(SnapshotterAdapter::new(store.clone())?);
            let listener =
                lamina_http::bind_socket(path).with_context(|| format!("binding {}", path.display()))?;
            info!(socket = %path.display(), "serving the containerd snapshotter; name it in containerd's [proxy_plugins]");
            Some((path.clone(), spawn_grpc(listener, backend, shutdown.flag())?))
        }
        None => None,
    };
    let admin = crate::admin::spawn(admin_listener, store.clone(), shutdown.flag())?;
    let tier_usage = settings
        .cluster
        .dir
        .is_some()
        .then_some(settings.cluster.heartbeat);
    let housekeeping = spawn_housekeeping(store.clone(), shutdown.flag(), settings.gc_interval, tier_usage)?;
    let lease_keeper = match &volumes {
        Some(v) => spawn_lease_keeper(v.clone(), shutdown.flag())?,
        None => None,
    };
    let metrics = match metrics {
        Some(m) => Some(m.spawn(store.clone(), shutdown.flag())?),
        None => None,
    };
    let mut result = Ok(());
    let mut sockets: Vec<PathBuf> = vec![crate::admin::socket_path(&settings.data_root)];
    if let Some((path, router, listener)) = plugin {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        info!(socket = %path.display(), data_root = %settings.data_root.display(), plugin = %name,
            "serving the Docker plugin; start dockerd with --experimental -s {name}");
        result = lamina_docker::serve(listener, router, &shutdown).context("serving the plugin socket");
        // The gRPC side stops too, whatever ended this one.
        shutdown.shutdown();
        sockets.push(path);
    }
    if let Some((path, handle)) = grpc {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %format!("{e:#}"), "snapshotter server failed");
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(_) => {
                if result.is_ok() {
                    result = Err(anyhow::anyhow!("snapshotter server thread panicked"));
                }
            }
        }
        sockets.push(path);
    }
    for s in sockets {
        let _ = std::fs::remove_file(&s);
    }
    if let Some(k) = lease_keeper {
        let _ = k.join();
    }
    if let Some(v) = &volumes {
        v.shutdown();
    }
    shutdown.shutdown();
    let _ = admin.join();
    let _ = housekeeping.join();
    if let Some(m) = metrics {
        let _ = m.join();
    }
    if let Err(e) = store.flush_stats() {
        warn!(error = %e, "could not save usage statistics");
    }
    // Mounts stay: containers may still use them. dockerd's Cleanup unmounts at its shutdown.
    info!("stopped");
    result
}

/// Runs the gRPC server on its own thread and runtime until `stop` is set; sets `stop` itself if the
/// server fails, so the whole daemon goes down with it.
fn spawn_grpc(
    listener: std::os::unix::net::UnixListener,
    backend: Arc<SnapshotterAdapter>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    // One thread runs the connections (containerd keeps one HTTP/2 connection per proxy plugin); the store
    // calls run on the runtime's blocking pool. A second I/O thread only made the connection's task and its
    // streams' tasks wake each other across the two threads at every call.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("grpc")
        .enable_all()
        .build()
        .context("starting the gRPC runtime")?;
    let handle = std::thread::Builder::new()
        .name("snapshotter".into())
        .spawn(move || {
            let flag = stop.clone();
            let result = runtime.block_on(async move {
                let signal = {
                    let flag = flag.clone();
                    async move {
                        while !flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                };
                let observer = crate::metrics::snapshotter_observer();
                let server = tokio::spawn(lamina_snapshotter::serve(listener, backend, observer, signal));
                // Wait for the stop flag (or an early server failure), then give calls a moment to drain.
                let mut server = server;
                loop {
                    if server.is_finished() || flag.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                match tokio::time::timeout(GRPC_DRAIN, &mut server).await {
                    Ok(Ok(r)) => r.context("serving the snapshotter socket"),
                    Ok(Err(e)) => Err(anyhow::anyhow!("snapshotter server task failed: {e}")),
                    Err(_) => {
                        warn!("gRPC calls still running after {GRPC_DRAIN:?}; stopping anyway");
                        server.abort();
                        Ok(())
                    }
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            stop.store(true, Ordering::SeqCst);
            result
        })
        .context("starting the snapshotter thread")?;
    Ok(handle)
}

/// Opens the volume lease once the cluster is reachable (a no-op once it is open), every heartbeat
/// interval until `stop`; `None` when the volume service has no lease.
fn spawn_lease_keeper(
    volumes: Arc<lamina_volume::VolumeManager>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let Some(every) = volumes.lease_interval() else {
        return Ok(None);
    };
    std::thread::Builder::new()
        .name("volume-lease".into())
        .spawn(move || {
            let tick = Duration::from_millis(100);
            let mut since = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(tick);
                since += tick;
                if since >= every {
                    since = Duration::ZERO;
                    volumes.maintain_lease();
                }
            }
        })
        .map(Some)
        .context("starting the volume lease thread")
}

/// Flushes usage counters and drops the proofs of finished removals every [`STATS_FLUSH`], records this host's
/// use of cluster tier layers every `tier_usage` (the heartbeat interval; the tier is written only when that use
/// changed) and runs the periodic garbage collection, until `stop`.
fn spawn_housekeeping(
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    gc_interval: Option<Duration>,
    tier_usage: Option<Duration>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let tick = Duration::from_millis(100);
            let mut since_flush = Duration::ZERO;
            let mut since_gc = Duration::ZERO;
            let mut since_usage = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(tick);
                since_flush += tick;
                since_gc += tick;
                since_usage += tick;
                if let Some(every) = tier_usage {
                    if since_usage >= every {
                        since_usage = Duration::ZERO;
                        if let Err(e) = store.share_tier_usage() {
                            warn!(error = %e, "could not record the use of cluster tier layers");
                        }
                    }
                }
                if since_flush >= STATS_FLUSH {
                    since_flush = Duration::ZERO;
                    if let Err(e) = store.flush_stats() {
                        warn!(error = %e, "could not save usage statistics");
                    }
                    if let Err(e) = store.drop_finished_removals() {
                        warn!(error = %e, "could not drop the proofs of finished removals");
                    }
                }
                if let Some(every) = gc_interval {
                    if since_gc >= every {
                        since_gc = Duration::ZERO;
                        if let Err(e) = store.gc(&lamina_store::GcOptions::default()) {
                            warn!(error = %e, "periodic garbage collection failed");
                        }
                    }
                }
            }
        })
        .context("starting the housekeeping thread")
}

/// Runs the HTTP server `name` (the admin socket, `/metrics`) on a thread of that name until `stop` is set:
/// `serve` gets the shutdown handle and the default server settings named `name`; its error is logged.
pub(crate) fn spawn_http_thread(
    name: &'static str,
    stop: Arc<AtomicBool>,
    serve: impl FnOnce(&lamina_http::ShutdownHandle, lamina_http::ServerConfig) -> std::io::Result<()>
        + Send
        + 'static,
) -> anyhow::Result<JoinHandle<()>> {
    let shutdown = lamina_http::ShutdownHandle::from_flag(stop);
    let cfg = lamina_http::ServerConfig {
        name,
        ..lamina_http::ServerConfig::default()
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = serve(&shutdown, cfg) {
                warn!(server = name, error = %e, "server failed");
            }
        })
        .with_context(|| format!("starting the {name} thread"))
}
