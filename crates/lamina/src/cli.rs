//! The operator's commands: `lamina status`, `lamina layers ls|top|inspect`, `lamina gc`, `lamina verify`.
//!
//! Each command is a [`Request`] run by [`execute`] against a store. When `lamina serve` runs on the data root,
//! the request goes to it over the admin socket (see [`crate::admin`]); otherwise the command opens the store
//! itself in [`OpenMode::Admin`] (no crash recovery: `gc` shows and removes what a crash left). Both paths run
//! the same code and print the same output.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand};
use lamina_store::{GcOptions, LayerOverview, OpenMode, Store, StoreError, VerifyStatus};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{FileConfig, DEFAULT_DATA_ROOT};

/// Where the store is.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Data root [default: from the config file, else /var/lib/lamina].
    #[arg(long, value_name = "DIR")]
    pub data_root: Option<PathBuf>,
    /// Config file [default: /etc/lamina/config.toml when present].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `lamina layers ...`.
#[derive(Debug, Subcommand)]
pub enum LayersCommand {
    /// Every layer: number, owner's name, kind, size, mounts, use counts.
    Ls {
        #[command(flatten)]
        target: Target,
    },
    /// The most used layers (by `uses`: times a mounted stack containing them was brought up).
    Top {
        #[command(flatten)]
        target: Target,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 10)]
        count: usize,
        /// The cluster tier's layers instead, by how many live hosts hold them and use them (with their
        /// size, their last use on any host and the holders; read from the tier: needs the daemon of a host
        /// with `[cluster] dir`).
        #[arg(long)]
        cluster: bool,
    },
    /// One layer in detail (disk usage measured now).
    Inspect {
        #[command(flatten)]
        target: Target,
        /// Layer number (hex), NAMESPACE/NAME (e.g. docker:/var/lib/docker/<id>), or a NAME unique across
        /// namespaces.
        layer: String,
        /// Namespace of LAYER (e.g. `docker:/var/lib/docker`, `containerd:lamina`).
        #[arg(long)]
        namespace: Option<String>,
    },
}

/// A command as it travels to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Store-wide figures.
    Status,
    /// All layers.
    Layers,
    /// One layer.
    Inspect {
        /// As given by the user.
        layer: String,
        /// `--namespace`.
        namespace: Option<String>,
    },
    /// The cluster tier's layers.
    ClusterLayers,
    /// Garbage collection.
    Gc {
        /// List only.
        dry_run: bool,
        /// Namespaces declared removed.
        namespaces: Vec<String>,
        /// Also directories the metadata does not know (`layers/` entries never removed by this store, and
        /// `quarantine/`): only an operator's `lamina gc` sets it.
        #[serde(default)]
        unknown: bool,
    },
    /// Verification.
    Verify {
        /// Layers as given (empty with `all`).
        layers: Vec<String>,
        /// `--namespace`.
        namespace: Option<String>,
        /// Every layer with a manifest.
        all: bool,
    },
}

/// The graph driver's current namespace (never removable by gc).
fn protected_namespaces(store: &Store) -> Vec<String> {
    match store.setting("graphdriver.home") {
        Ok(Some(home)) => vec![format!("docker:{home}")],
        _ => Vec::new(),
    }
}

fn status(store: &Store) -> anyhow::Result<Value> {
    let st = store.status()?;
    let layers = store.overview()?;
    let bytes: u64 = layers.iter().filter_map(|l| l.record.size).sum();
    let mounts: u64 = layers.iter().map(|l| u64::from(l.mounts)).sum();
    let mut namespaces = std::collections::BTreeMap::<String, u64>::new();
    for l in &layers {
        *namespaces.entry(l.record.ns.clone()).or_default() += 1;
    }
    Ok(json!({
        "data_root": st.root,
        "backing_fs": st.backing_fs,
        "format": st.format,
        "layers": st.layers,
        "bytes": bytes,
        "mounts": mounts,
        "mounted_layers": layers.iter().filter(|l| l.mounted || l.mounts > 0).count(),
        "namespaces": namespaces,
        "counters": store.counters(),
    }))
}

fn inspect(store: &Store, layer: &str, namespace: Option<&str>) -> anyhow::Result<Value> {
    let n = store.resolve(layer, namespace)?;
    let o = store.overview_of(n)?;
    let mut v = serde_json::to_value(&o)?;
    let usage = std::fs::File::open(o.dir.join("diff"))
        .ok()
        .and_then(|f| lamina_archive::disk_usage(std::os::fd::AsFd::as_fd(&f)).ok());
    if let Some(u) = usage {
        v["disk_usage"] = json!({ "bytes": u.bytes, "inodes": u.inodes });
    }
    Ok(v)
}

fn verify(
    store: &Store,
    layers: &[String],
    namespace: Option<&str>,
    all: bool,
    progress: &mut dyn FnMut(Value),
) -> anyhow::Result<Value> {
    let numbers = if all {
        store.verifiable_layers()?
    } else {
        if layers.is_empty() {
            anyhow::bail!("name layers to verify, or --all");
        }
        layers
            .iter()
            .map(|l| store.resolve(l, namespace))
            .collect::<Result<Vec<_>, StoreError>>()?
    };
    let sizes: Vec<u64> = numbers
        .iter()
        .map(|n| {
            store
                .overview_of(*n)
                .ok()
                .and_then(|o| o.record.size)
                .unwrap_or(0)
        })
        .collect();
    progress(json!({ "start": { "layers": numbers.len(), "bytes": sizes.iter().sum::<u64>() } }));
    let mut results = Vec::new();
    for n in numbers {
        let mut pending = 0u64;
        let r = store.verify_layer(n, &mut |b| {
            pending += b;
            if pending >= 8 << 20 {
                progress(json!({ "bytes": pending }));
                pending = 0;
            }
        })?;
        if pending > 0 {
            progress(json!({ "bytes": pending }));
        }
        progress(json!({ "done": r }));
        results.push(r);
    }
    let mismatches = results
        .iter()
        .filter(|r| matches!(r.status, VerifyStatus::Mismatch { .. }))
        .count();
    Ok(json!({ "results": results, "mismatches": mismatches }))
}

/// Runs a request against an open store; `progress` receives events of long commands.
pub fn execute(store: &Store, req: &Request, progress: &mut dyn FnMut(Value)) -> anyhow::Result<Value> {
    Ok(match req {
        Request::Status => status(store)?,
        Request::Layers => serde_json::to_value(store.overview()?)?,
        Request::ClusterLayers => match store.tier_layers()? {
            Some(l) => serde_json::to_value(l)?,
            None => anyhow::bail!("this lamina is in no cluster (no [cluster] dir, or no daemon serving it)"),
        },
        Request::Inspect { layer, namespace } => inspect(store, layer, namespace.as_deref())?,
        Request::Gc {
            dry_run,
            namespaces,
            unknown,
        } => serde_json::to_value(store.gc(&GcOptions {
            dry_run: *dry_run,
            removed_namespaces: namespaces.clone(),
            protected_namespaces: protected_namespaces(store),
            unknown: *unknown,
        })?)?,
        Request::Verify {
            layers,
            namespace,
            all,
        } => verify(store, layers, namespace.as_deref(), *all, progress)?,
    })
}

fn data_root(t: &Target) -> anyhow::Result<PathBuf> {
    let root = match &t.data_root {
        Some(r) => r.clone(),
        None => FileConfig::load(t.config.as_deref())?
            .data_root
            .unwrap_or_else(|| DEFAULT_DATA_ROOT.into()),
    };
    if !root.is_absolute() {
        anyhow::bail!("data root {} must be an absolute path", root.display());
    }
    Ok(root)
}

/// Runs `req` through the daemon if one serves the data root, else on the store opened here.
fn dispatch(t: &Target, req: &Request, progress: &mut dyn FnMut(Value)) -> anyhow::Result<Value> {
    let root = data_root(t)?;
    if let Some(v) = crate::admin::call(&root, req, progress)? {
        return Ok(v);
    }
    if !root.join("meta.redb").exists() {
        anyhow::bail!("no lamina store at {}", root.display());
    }
    let store = Store::open_with(&root, OpenMode::Admin).map_err(|e| match e {
        StoreError::Locked(m) => anyhow::anyhow!(
            "{} is locked by a running lamina ({m}) whose admin socket does not answer",
            root.display()
        ),
        e => anyhow::Error::new(e).context(format!("opening the store at {}", root.display())),
    })?;
    execute(&store, req, progress)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn ago(ns: u64) -> String {
    if ns == 0 {
        return "never".into();
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let then = Duration::from_nanos(ns);
    let s = now.saturating_sub(then).as_secs();
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 1).collect();
        format!("{t}…")
    }
}

fn print_table(layers: &[LayerOverview]) {
    println!(
        "{:<6} {:<28} {:<26} {:<9} {:>10} {:>6} {:>6} {:>6} {:>8} LAST USED",
        "LAYER", "NAMESPACE", "NAME", "KIND", "SIZE", "MOUNTS", "GETS", "USES", "CHILDREN"
    );
    for l in layers {
        let kind = format!("{:?}", l.record.kind);
        let mounts = if l.mounts == 0 && l.mounted {
            "1?".to_string()
        } else {
            l.mounts.to_string()
        };
        println!(
            "{:<6} {:<28} {:<26} {:<9} {:>10} {:>6} {:>6} {:>6} {:>8} {}",
            format!("{:x}", l.number),
            short(&l.record.ns, 28),
            short(&l.record.name, 26),
            kind,
            l.record.size.map(human).unwrap_or_else(|| "-".into()),
            mounts,
            l.stats.gets,
            l.stats.uses,
            l.children,
            ago(l.stats.last_used_ns),
        );
    }
}

/// A spinner on stderr while a long command runs, on a terminal only (and not with `--json`); other output
/// is unchanged.
fn spinner(json: bool, msg: &str) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new_spinner();
    b.set_message(msg.to_string());
    b.enable_steady_tick(Duration::from_millis(100));
    Some(b)
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `lamina status`.
pub fn run_status(t: Target) -> anyhow::Result<ExitCode> {
    let v = dispatch(&t, &Request::Status, &mut |_| {})?;
    if t.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("data root:       {}", v["data_root"].as_str().unwrap_or(""));
    println!("backing fs:      {}", v["backing_fs"].as_str().unwrap_or(""));
    println!("format:          {}", v["format"]);
    println!("layers:          {}", v["layers"]);
    println!("bytes (applied): {}", human(v["bytes"].as_u64().unwrap_or(0)));
    println!(
        "mounts now:      {} (layers mounted: {})",
        v["mounts"], v["mounted_layers"]
    );
    if let Some(ns) = v["namespaces"].as_object() {
        for (k, n) in ns {
            println!("  {k}: {n} layers");
        }
    }
    if let Some(c) = v["counters"].as_object() {
        let line: Vec<String> = c.iter().map(|(k, n)| format!("{k}={n}")).collect();
        println!("counters:        {}", line.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `lamina layers ...`.
pub fn run_layers(cmd: LayersCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LayersCommand::Ls { target } => {
            let v = dispatch(&target, &Request::Layers, &mut |_| {})?;
            if target.json {
                print_json(&v)?;
            } else {
                let layers: Vec<LayerOverview> = serde_json::from_value(v).context("layer list")?;
                print_table(&layers);
            }
        }
        LayersCommand::Top {
            target,
            count,
            cluster: true,
        } => {
            let v = dispatch(&target, &Request::ClusterLayers, &mut |_| {})?;
            let mut layers: Vec<lamina_store::TierLayer> =
                serde_json::from_value(v).context("tier layers")?;
            layers.truncate(count);
            if target.json {
                print_json(&serde_json::to_value(&layers)?)?;
            } else {
                println!(
                    "{:<19} {:>10} {:>8} {:>5} {:>5} {:>5} {:>5} {:<10} {:<16} HOSTS",
                    "CHAIN", "SIZE", "FILES", "HELD", "ALL", "USED", "USES", "LAST USE", "PUBLISHED BY"
                );
                for l in &layers {
                    println!(
                        "{:<19} {:>10} {:>8} {:>5} {:>5} {:>5} {:>5} {:<10} {:<16} {}",
                        l.chain.get(..19).unwrap_or(&l.chain),
                        human(l.bytes),
                        l.inodes,
                        l.live_hosts,
                        l.hosts.len(),
                        l.users.len(),
                        l.uses,
                        ago(l.last_use_ns),
                        l.published_by,
                        l.hosts.join(",")
                    );
                }
            }
        }
        LayersCommand::Top { target, count, .. } => {
            let v = dispatch(&target, &Request::Layers, &mut |_| {})?;
            let mut layers: Vec<LayerOverview> = serde_json::from_value(v).context("layer list")?;
            layers.sort_by(|a, b| {
                (b.stats.uses, b.stats.gets, b.stats.last_used_ns).cmp(&(
                    a.stats.uses,
                    a.stats.gets,
                    a.stats.last_used_ns,
                ))
            });
            layers.truncate(count);
            if target.json {
                print_json(&serde_json::to_value(&layers)?)?;
            } else {
                print_table(&layers);
            }
        }
        LayersCommand::Inspect {
            target,
            layer,
            namespace,
        } => {
            let bar = spinner(target.json, "measuring disk usage");
            let v = dispatch(&target, &Request::Inspect { layer, namespace }, &mut |_| {});
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            print_json(&v?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lamina gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    target: Target,
    /// List what would be removed, with sizes; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Declare an engine namespace removed (e.g. `docker:/old/docker/root`): its layers are collected unless
    /// mounted or used by a mount. Repeatable. Never guessed: only namespaces named here are collected.
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
}

/// `lamina gc`.
pub fn run_gc(a: GcArgs) -> anyhow::Result<ExitCode> {
    // The operator's request: directories the metadata does not know (quarantined ones included) are shown,
    // and removed without --dry-run; the daemon's periodic collection never touches them.
    let req = Request::Gc {
        dry_run: a.dry_run,
        namespaces: a.namespaces,
        unknown: true,
    };
    let bar = spinner(
        a.target.json,
        if a.dry_run {
            "looking for garbage (dry run)"
        } else {
            "collecting garbage"
        },
    );
    let v = dispatch(&a.target, &req, &mut |_| {});
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let v = v?;
    if a.target.json {
        print_json(&v)?;
    } else {
        let verb = if a.dry_run { "would remove" } else { "removed" };
        for g in v["items"].as_array().into_iter().flatten() {
            println!(
                "{verb} {:<18} {:>10}  {}",
                g["kind"].as_str().unwrap_or(""),
                human(g["bytes"].as_u64().unwrap_or(0)),
                g["name"]
                    .as_str()
                    .unwrap_or_else(|| g["path"].as_str().unwrap_or(""))
            );
        }
        for k in v["kept"].as_array().into_iter().flatten() {
            println!(
                "kept {} ({})",
                k["name"].as_str().unwrap_or(""),
                k["reason"].as_str().unwrap_or("")
            );
        }
        for e in v["errors"].as_array().into_iter().flatten() {
            eprintln!("error: {}", e.as_str().unwrap_or(""));
        }
        println!(
            "{} items, {} in {} ms{}",
            v["items"].as_array().map(|a| a.len()).unwrap_or(0),
            human(v["bytes"].as_u64().unwrap_or(0)),
            v["elapsed_ms"],
            if a.dry_run { " (dry run)" } else { "" }
        );
    }
    let failed = v["errors"].as_array().is_some_and(|e| !e.is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `lamina verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    target: Target,
    /// Layers: number (hex), NAMESPACE/NAME, or NAME.
    layers: Vec<String>,
    /// Every layer that has a manifest.
    #[arg(long, conflicts_with = "layers")]
    all: bool,
    /// Namespace of the named layers.
    #[arg(long)]
    namespace: Option<String>,
}

fn verdict_line(r: &Value) -> String {
    let name = r["name"].as_str().unwrap_or("");
    let layer = r["layer"].as_u64().unwrap_or(0);
    match r["status"].as_str().unwrap_or("") {
        "clean" => format!(
            "ok        {layer:x} {name} ({} entries, {})",
            r["entries"],
            human(r["bytes"].as_u64().unwrap_or(0))
        ),
        "mismatch" => format!(
            "MISMATCH  {layer:x} {name}: {} ({})",
            r["path"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or("")
        ),
        _ => format!(
            "skipped   {layer:x} {name}: {}",
            r["reason"].as_str().unwrap_or("")
        ),
    }
}

/// `lamina verify`; exits 1 when a layer does not match.
pub fn run_verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let req = Request::Verify {
        layers: a.layers,
        namespace: a.namespace,
        all: a.all,
    };
    let json_out = a.target.json;
    let tty = std::io::stderr().is_terminal() && !json_out;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let started = std::time::Instant::now();
    let mut progress = |p: Value| {
        if let Some(s) = p.get("start") {
            if tty {
                let b = indicatif::ProgressBar::new(s["bytes"].as_u64().unwrap_or(0));
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} verifying [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar = Some(b);
            } else if !json_out {
                eprintln!(
                    "verifying {} layers ({})",
                    s["layers"],
                    human(s["bytes"].as_u64().unwrap_or(0))
                );
            }
        } else if let Some(n) = p.get("bytes").and_then(Value::as_u64) {
            if let Some(b) = &bar {
                b.inc(n);
            }
        } else if let Some(r) = p.get("done") {
            if json_out {
                return;
            }
            let line = verdict_line(r);
            match &bar {
                Some(b) => b.println(line),
                None => println!("{line}"),
            }
        }
    };
    let v = dispatch(&a.target, &req, &mut progress)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let mismatches = v["mismatches"].as_u64().unwrap_or(0);
    if json_out {
        print_json(&v)?;
    } else {
        let total: u64 = v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["bytes"].as_u64())
            .sum();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{} layers, {mismatches} mismatched, {} read in {secs:.2} s ({}/s)",
            v["results"].as_array().map(|a| a.len()).unwrap_or(0),
            human(total),
            human((total as f64 / secs.max(1e-9)) as u64)
        );
    }
    Ok(if mismatches > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
