//! `lamina-testkit-serve`: [`lamina_testkit::Lamina`] for the harnesses that are not written in Rust (the Go
//! conformance suite in `tests/conformance/` and the snapshotter latency bench of `scripts/conformance.sh`), so
//! that `lamina serve` has one launcher.
//!
//! It starts `lamina serve` on the given data root and sockets, waits until every socket answers, then prints
//! `ready <socket>` on stdout and writes the same line to `--ready-file` if asked. It stops lamina (SIGTERM by
//! PID, SIGKILL after `--stop-timeout`; then the mounts under the data root are detached and the socket files
//! removed) when it gets SIGTERM or SIGINT, or when its stdin is a pipe and reaches end of file (the caller
//! exited). It exits 0 only when lamina came up and ended cleanly on SIGTERM; if lamina exits by itself, the
//! launcher exits 1 at once.
//!
//! With `--rbd-ceph-conf`, lamina's layers are RBD images (`[store] backend = "rbd"`, images
//! `<--rbd-image-prefix><n>` in `--rbd-pool`). lamina keeps its attachments (rbd-fuse, loop device, mount)
//! when it stops, for the containers that use them; after lamina stopped, the launcher takes them down and
//! removes every image of that prefix, so that runs sharing one cluster leave nothing behind.
//!
//! With `--ceph-cluster DIR` it starts no lamina: it runs testkit's throw-away Ceph cluster
//! ([`lamina_testkit::ceph::CephCluster`], memstore) in DIR, prints and writes `ready <DIR>/ceph.conf` once the
//! pool `rbd` is usable, and stops the cluster by PID (its clients, the OSD, the monitor) on SIGTERM, SIGINT or
//! the end of its stdin.

use std::fs;
use std::io::{self, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use lamina_testkit::ceph::{detach_rbd_layers, rbd_store_toml, remove_images, CephCluster, ObjectStore};
use lamina_testkit::{Lamina, Ready};

/// Starts `lamina serve` through the test kit's launcher and stops it on SIGTERM or when stdin closes.
#[derive(Parser)]
#[command(name = "lamina-testkit-serve")]
struct Args {
    /// `--data-root` of lamina serve.
    #[arg(long, value_name = "DIR", required_unless_present = "ceph_cluster")]
    data_root: Option<PathBuf>,
    /// Run a throw-away Ceph cluster in DIR instead of lamina.
    #[arg(long, value_name = "DIR", conflicts_with = "data_root")]
    ceph_cluster: Option<PathBuf>,
    /// Put the layers in RBD images of the cluster this `ceph.conf` describes.
    #[arg(long, value_name = "FILE", requires = "rbd_image_prefix")]
    rbd_ceph_conf: Option<PathBuf>,
    /// The pool of the layer images.
    #[arg(long, value_name = "POOL", default_value = "rbd")]
    rbd_pool: String,
    /// `image_prefix` of the layer images (one per data root).
    #[arg(long, value_name = "PREFIX")]
    rbd_image_prefix: Option<String>,
    /// Filesystem of the base layer images (`ext4` or `xfs`).
    #[arg(long, value_name = "FS", default_value = "ext4")]
    rbd_fs: String,
    /// The Docker plugin socket, or `none`.
    #[arg(long, value_name = "PATH", default_value = "none")]
    socket: PathBuf,
    /// The containerd snapshotter socket, or `none`.
    #[arg(long, value_name = "PATH", default_value = "none")]
    snapshotter_socket: PathBuf,
    /// lamina's stdout and stderr, appended [default: lamina.log next to the data root].
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// `--log-level` of lamina serve.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Written (`ready <socket>`) once every socket answers.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Seconds lamina may take to start.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    start_timeout: u64,
    /// Seconds lamina may take to exit on SIGTERM before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
    /// More arguments for lamina serve (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    extra: Vec<String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lamina-testkit-serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A flag set by SIGTERM, SIGINT, or the end of stdin when it is a pipe.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    if stdin_is_pipe()? {
        let stop = stop.clone();
        thread::spawn(move || {
            let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
            stop.store(true, Ordering::SeqCst);
        });
    }
    Ok(stop)
}

/// Prints `line` and writes it to the ready file if there is one.
fn announce(args: &Args, line: &str) -> Result<()> {
    if let Some(f) = &args.ready_file {
        fs::write(f, line).with_context(|| format!("writing {}", f.display()))?;
    }
    let mut out = io::stdout().lock();
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
    Ok(())
}

/// The Ceph cluster mode: true when the cluster came up and was stopped.
fn run_cluster(args: &Args, dir: &Path) -> Result<bool> {
    let stop = stop_flag()?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cluster = CephCluster::start_in(dir, ObjectStore::Memstore);
    announce(args, &format!("ready {}\n", cluster.conf().display()))?;
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    cluster.stop();
    eprintln!("lamina-testkit-serve: Ceph cluster stopped in {:?}", t.elapsed());
    Ok(true)
}

/// True when lamina came up and ended cleanly on SIGTERM (and, on rbd, its images were removed).
fn run(args: Args) -> Result<bool> {
    let data_root = match (&args.ceph_cluster, &args.data_root) {
        (Some(dir), _) => return run_cluster(&args, dir),
        (None, Some(root)) => root.clone(),
        (None, None) => anyhow::bail!("--data-root or --ceph-cluster is needed"),
    };
    let stop = stop_flag()?;

    let dir = data_root.parent().unwrap_or(Path::new("/"));
    let mut lamina = Lamina::in_dir("lamina", dir)
        .plugin_socket(&args.socket)
        .snapshotter(&args.snapshotter_socket);
    lamina.data_root = data_root.clone();
    if let Some(log) = &args.log {
        lamina.log = log.clone();
    }
    lamina.log_level = args.log_level.clone();
    let rbd = args.rbd_ceph_conf.as_ref().zip(args.rbd_image_prefix.as_ref());
    if let Some((conf, prefix)) = rbd {
        // sets the extra arguments to `--config FILE`
        lamina.use_config(&rbd_store_toml(conf, &args.rbd_pool, prefix, &args.rbd_fs, 10));
    }
    lamina.extra_args.extend(args.extra.iter().cloned());
    let ok = serve(&args, &data_root, &mut lamina, &stop)?;
    let Some((conf, prefix)) = rbd else {
        return Ok(ok);
    };
    let t = Instant::now();
    let detached = detach_rbd_layers(&data_root, Duration::from_secs(10));
    if let Err(e) = &detached {
        eprintln!("lamina-testkit-serve: {e}");
    }
    match remove_images(conf, &args.rbd_pool, prefix, Duration::from_secs(10)) {
        Ok(n) => {
            eprintln!(
                "lamina-testkit-serve: attachments taken down, {n} images {prefix}* removed in {:?}",
                t.elapsed()
            );
            Ok(ok && detached.is_ok())
        }
        Err(e) => {
            eprintln!("lamina-testkit-serve: images {prefix}* left in the pool: {e}");
            Ok(false)
        }
    }
}

/// Runs the started `lamina` until the stop flag; true when it came up and ended cleanly on SIGTERM.
fn serve(args: &Args, data_root: &Path, lamina: &mut Lamina, stop: &AtomicBool) -> Result<bool> {
    lamina.spawn();
    // Waits in slices, so that a stop asked for during the start is not held up by it.
    let deadline = Instant::now() + Duration::from_secs(args.start_timeout);
    let ready = loop {
        match lamina.poll_ready(Duration::from_millis(200)) {
            Ready::TimedOut if Instant::now() < deadline && !stop.load(Ordering::SeqCst) => continue,
            r => break r,
        }
    };
    match ready {
        Ready::Up(after) => {
            let socket = [&args.snapshotter_socket, &args.socket]
                .into_iter()
                .find(|s| s.as_os_str() != "none")
                .map_or(data_root, |s| s.as_path());
            announce(args, &format!("ready {}\n", socket.display()))?;
            eprintln!(
                "lamina-testkit-serve: lamina pid {} up after {after:?}",
                lamina.pid().unwrap_or(0)
            );
        }
        Ready::Exited(st) => {
            eprintln!("lamina-testkit-serve: lamina exited during start-up ({st})");
            return Ok(false);
        }
        Ready::TimedOut => {
            eprintln!(
                "lamina-testkit-serve: lamina did not answer within {} s, or a stop came first",
                args.start_timeout
            );
            lamina.terminate(Duration::from_secs(args.stop_timeout));
            return Ok(false);
        }
    }

    while !stop.load(Ordering::SeqCst) {
        if !lamina.running() {
            eprintln!("lamina-testkit-serve: lamina exited by itself");
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
    match lamina.terminate(Duration::from_secs(args.stop_timeout)) {
        Some(st) if st.success() => Ok(true),
        Some(st) => {
            eprintln!("lamina-testkit-serve: lamina exited with {st} on SIGTERM");
            Ok(false)
        }
        None => {
            eprintln!(
                "lamina-testkit-serve: lamina ignored SIGTERM for {} s and was killed",
                args.stop_timeout
            );
            Ok(false)
        }
    }
}

/// True when stdin is a pipe or a socket, whose end of file means the caller is gone (not `/dev/null`, which
/// ends at once).
fn stdin_is_pipe() -> Result<bool> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdin")?;
    let ft = fs::File::from(fd)
        .metadata()
        .context("stat of stdin")?
        .file_type();
    Ok(ft.is_fifo() || ft.is_socket())
}
