//! lamina: a container layer store serving the Docker GraphDriver plugin protocol and the containerd
//! snapshots API.
#![forbid(unsafe_code)]

mod adapters;
mod admin;
mod cli;
mod config;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Container layer store daemon.
#[derive(Debug, Parser)]
#[command(name = "lamina", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Docker GraphDriver plugin and the containerd snapshotter, each on its unix socket.
    #[command(args_override_self = true)]
    Serve {
        /// Data root holding layers and metadata [default: /var/lib/lamina].
        #[arg(long, value_name = "DIR")]
        data_root: Option<PathBuf>,
        /// Plugin socket; dockerd's name for the driver is its file name without `.sock`
        /// [default: /run/docker/plugins/lamina.sock]; `none` turns it off.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// containerd snapshotter (gRPC) socket, for `[proxy_plugins]` in containerd's config
        /// [default: /run/lamina/snapshotter.sock]; `none` turns it off.
        #[arg(long, value_name = "PATH")]
        snapshotter_socket: Option<PathBuf>,
        /// Config file [default: /etc/lamina/config.toml when present].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Log filter (error, warn, info, debug, trace) [default: info].
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<String>,
    },
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
        Command::Serve {
            data_root,
            socket,
            snapshotter_socket,
            config,
            log_level,
        } => config::FileConfig::load(config.as_deref())
            .and_then(|file| {
                let flags = config::Flags {
                    data_root,
                    socket,
                    snapshotter_socket,
                    log_level,
                };
                config::resolve(file, flags)
            })
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
