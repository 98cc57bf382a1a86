//! lamina: a container layer store serving the Docker GraphDriver plugin protocol and the containerd
//! snapshots API.
#![forbid(unsafe_code)]

mod adapters;
mod admin;
mod cli;
mod cluster;
mod config;
mod metrics;
mod serve;
mod store_config;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const ABOUT: &str =
    "Container layer store daemon: a Docker storage driver (GraphDriver plugin), a Docker volume \
driver (VolumeDriver plugin) and a containerd snapshotter over one overlayfs layer store.";

const SERVE_ABOUT: &str = "Opens the data root, then serves the Docker plugin socket (GraphDriver and VolumeDriver \
protocols) and the containerd snapshotter socket until SIGTERM or SIGINT. Settings come from the built-in defaults, \
then the config file, then LAMINA_* environment variables, then flags (each later one wins).

dockerd finds the plugin by its socket: /run/docker/plugins/NAME.sock is the driver NAME (`dockerd --experimental -s \
NAME`, `docker volume create -d NAME`). Start lamina before dockerd and containerd. lamina holds a lock on its data \
root, so a second instance on the same data root refuses to start. It never unmounts layers at exit (containers may \
still use them); dockerd's shutdown does.";

const SERVE_AFTER: &str = "FILES:
  /etc/lamina/config.toml     config file, read when present (every key is documented in the packaged copy)
  /var/lib/lamina             default data root (format version checked at start; older formats are migrated)
  /run/docker/plugins/lamina.sock
                              default Docker plugin socket
  /run/lamina/snapshotter.sock
                              default containerd snapshotter socket

ENVIRONMENT:
  LAMINA_DATA_ROOT, LAMINA_SOCKET, LAMINA_SNAPSHOTTER_SOCKET, LAMINA_CONFIG, LAMINA_CONFIG_TOML,
  LAMINA_LOG_LEVEL, LAMINA_VOLUMES_MOUNT_BASE, LAMINA_METRICS_ADDRESS, LAMINA_LOG_FORMAT,
  LAMINA_VERIFY_ON_MOUNT
                              the same as the flags of the same names (a flag wins over its variable)
  REMOTE_PATH                 overrides [volumes.moosefs] remote_path

EXIT STATUS:
  0 after a clean stop on SIGTERM/SIGINT; 1 on a bad setting, an unreadable data root, a socket in use or a failure.

EXAMPLES:
  lamina serve
  lamina serve --config /etc/lamina/config.toml --log-level debug
  lamina serve --socket /run/docker/plugins/lamina2.sock --snapshotter-socket none --data-root /srv/lamina2

SEE ALSO:
  dockerd(8); /usr/share/doc/lamina/ (README, packaging, volumes, snapshotter, on-disk format)";

/// Container layer store daemon.
#[derive(Debug, Parser)]
#[command(name = "lamina", version, about = ABOUT, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Docker GraphDriver/VolumeDriver plugin and the containerd snapshotter, each on its unix socket.
    #[command(args_override_self = true, long_about = SERVE_ABOUT, after_long_help = SERVE_AFTER)]
    Serve(config::Flags),
    /// Store-wide figures: layers, bytes, mounts, operation counts.
    Status(cli::Target),
    /// List, rank and inspect layers.
    #[command(subcommand)]
    Layers(cli::LayersCommand),
    /// Find and remove what nothing references (leftovers of crashes, layers of removed namespaces).
    Gc(cli::GcArgs),
    /// Check layers against their content manifests; exits 1 on a mismatch.
    Verify(cli::VerifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(flags) => match &flags.config_toml {
            Some(text) if !text.trim().is_empty() => config::FileConfig::parse(text, "--config-toml"),
            _ => config::FileConfig::load(flags.config.as_deref()),
        }
        .and_then(|file| config::resolve(file, flags))
        .and_then(serve::run)
        .map(|()| ExitCode::SUCCESS),
        Command::Status(t) => cli::run_status(t),
        Command::Layers(c) => cli::run_layers(c),
        Command::Gc(a) => cli::run_gc(a),
        Command::Verify(a) => cli::run_verify(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lamina: {e:#}");
            ExitCode::FAILURE
        }
    }
}
