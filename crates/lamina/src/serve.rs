//! `lamina serve`: open the store, bind the plugin socket, serve until SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;
use lamina_docker::{Router, ShutdownHandle};
use lamina_store::Store;
use tracing::info;
use tracing_subscriber::EnvFilter;

use crate::adapters::graphdriver::GraphDriverAdapter;
use crate::adapters::volumedriver::VolumeDriverAdapter;
use crate::config::Settings;

fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level).with_context(|| format!("bad log level {level:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// Runs the daemon with `settings` until a termination signal.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    init_logging(&settings.log_level)?;
    let store = Arc::new(
        Store::open(&settings.data_root)
            .with_context(|| format!("opening the store at {}", settings.data_root.display()))?,
    );
    let graph = Arc::new(GraphDriverAdapter::new(store.clone()).context("restoring graphdriver settings")?);
    let mut router = Router::new().with_graph_driver(graph);
    let volumes = match settings.volumes.clone() {
        Some(cfg) => Some(Arc::new(
            lamina_volume::VolumeManager::open(cfg).context("opening the volume service")?,
        )),
        None => None,
    };
    if let Some(v) = &volumes {
        router = router.with_volume_driver(Arc::new(VolumeDriverAdapter::new(v.clone())));
    }
    let router = Arc::new(router);
    let listener = lamina_docker::bind_socket(&settings.socket)
        .with_context(|| format!("binding {}", settings.socket.display()))?;
    let shutdown = ShutdownHandle::new();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.flag()).context("installing signal handlers")?;
    }
    let plugin = settings
        .socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    info!(socket = %settings.socket.display(), data_root = %settings.data_root.display(), plugin = %plugin,
        "serving; start dockerd with --experimental -s {plugin}");
    lamina_docker::serve(listener, router, &shutdown).context("serving the plugin socket")?;
    let _ = std::fs::remove_file(&settings.socket);
    if let Some(v) = &volumes {
        v.shutdown();
    }
    // Mounts stay: containers may still use them. dockerd's Cleanup unmounts at its shutdown.
    info!("stopped");
    Ok(())
}
