//! The results of a run: `results.json`, `results.md` and one SVG bar chart per workload.
//!
//! Pairing: within one workload and filesystem, every figure of subject `lamina` is compared with every
//! figure of another subject (the baseline) that has the same case and metric; the ratio is lamina's median
//! over the baseline's. A figure's goal is checked against lamina's median (`<= 0.3 ms`, `<= 64 MiB`, `<= 1 s`)
//! or against the ratio (`<= 1.1x gnu-tar+syncfs`). Where the workload gives a lower bound of lamina's figure
//! (a subject marked [`Figure::bound`]) and the goal, checked against the bound in the same way, fails too, the
//! goal is out of reach on this machine: no implementation doing the same work would meet it in this run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{Figure, FsKind, Unit};

/// What one workload produced on one filesystem.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// Workload name.
    pub name: &'static str,
    /// Its one-line description.
    pub about: &'static str,
    /// The filesystem it ran on.
    pub fs: FsKind,
    /// The error, when it failed (its figures up to the failure are kept).
    pub error: Option<String>,
    /// Wall time of the workload, seconds.
    pub seconds: f64,
    /// Everything it measured.
    pub figures: Vec<Figure>,
}

/// The run as a whole.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// CPU, cores, RAM, kernel.
    pub machine: Machine,
    /// Start of the run, UTC (`YYYY-MM-DD HH:MM:SS UTC`).
    pub date: String,
    /// lamina's version.
    pub lamina_version: String,
    /// `release` or `debug` (a debug build's figures say little about lamina).
    pub build: String,
    /// `--quick`.
    pub quick: bool,
    /// Repetitions per timed case.
    pub runs: usize,
    /// One line per filesystem used.
    pub filesystems: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub duration_s: f64,
    /// 1-minute load average at start and at the end (other work on the machine skews figures).
    pub load_avg: (f64, f64),
}

/// The machine description.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs.
    pub cores: usize,
    /// MemTotal, GiB.
    pub ram_gib: f64,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads /proc.
    pub fn probe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let ram_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Machine {
            cpu,
            cores,
            ram_gib,
            kernel,
        }
    }

    fn line(&self) -> String {
        format!(
            "{} × {}, {:.1} GiB RAM, Linux {}",
            self.cores, self.cpu, self.ram_gib, self.kernel
        )
    }
}

/// The 1-minute load average.
pub fn load_avg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Now, UTC, as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    // `YYYY-MM-DDTHH:MM:SSZ` from the volume crate's date helper, shown as `YYYY-MM-DD HH:MM:SS UTC`.
    let t = lamina_volume::time::rfc3339(lamina_volume::time::now_secs());
    format!("{} UTC", t.trim_end_matches('Z').replacen('T', " ", 1))
}

impl Unit {
    /// Short label for tables and axes.
    pub fn label(self) -> &'static str {
        match self {
            Unit::Seconds => "s",
            Unit::Millis => "ms",
            Unit::Micros => "µs",
            Unit::Bytes => "B",
            Unit::MiB => "MiB",
            Unit::MBps => "MB/s",
            Unit::OpsPerSec => "ops/s",
            Unit::Count => "",
        }
    }

    /// The value in the unit's base (seconds for times, bytes for sizes), for goals in other units.
    fn to_base(self, v: f64) -> f64 {
        match self {
            Unit::Millis => v / 1e3,
            Unit::Micros => v / 1e6,
            Unit::MiB => v * 1_048_576.0,
            _ => v,
        }
    }
}

/// A goal's unit as written (`s`, `ms`, `us`/`µs`, `B`, `KiB`, `MiB`, `GiB`, `MB`) to the base multiplier.
fn goal_unit(s: &str) -> Option<f64> {
    Some(match s {
        "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1_048_576.0,
        "GiB" => 1_073_741_824.0,
        "MB" => 1e6,
        "MB/s" | "ops/s" | "" => 1.0,
        _ => return None,
    })
}

/// The baseline a relative goal names (`overlayfs` in `<= 1.1x overlayfs`); `None` for an absolute goal.
fn goal_baseline(goal: &str) -> Option<&str> {
    let mut words = goal.split_whitespace().skip(1);
    let num = words.next()?;
    (num.ends_with('x') || num.ends_with('×'))
        .then(|| words.next())
        .flatten()
}

/// Checks `goal` against lamina's median (`value` in `unit`) and the ratio to the named baseline.
/// `None` when the goal cannot be read or needs a baseline that is absent.
pub fn goal_met(goal: &str, value: f64, unit: Unit, ratios: &[(String, f64)]) -> Option<bool> {
    let mut words = goal.split_whitespace();
    let op = words.next()?;
    let num_word = words.next()?;
    let rest: Vec<&str> = words.collect();
    let cmp = |a: f64, b: f64| match op {
        "<=" | "≤" => Some(a <= b),
        ">=" | "≥" => Some(a >= b),
        "<" => Some(a < b),
        ">" => Some(a > b),
        _ => None,
    };
    if let Some(x) = num_word.strip_suffix('x').or_else(|| num_word.strip_suffix('×')) {
        let limit: f64 = x.parse().ok()?;
        let base = rest.first()?;
        let (_, r) = ratios.iter().find(|(n, _)| n == base)?;
        return cmp(*r, limit);
    }
    let limit: f64 = num_word.parse().ok()?;
    let mult = goal_unit(rest.first().copied().unwrap_or(""))?;
    if value.is_nan() {
        return None;
    }
    cmp(unit.to_base(value), limit * mult)
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::NAN, f64::NAN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// One line of a results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Workload.
    pub workload: String,
    /// Case.
    pub case: String,
    /// Filesystem.
    pub fs: FsKind,
    /// Metric.
    pub metric: String,
    /// Unit of both medians.
    pub unit: Unit,
    /// lamina's median (NaN when lamina has no figure here).
    pub lamina: Option<f64>,
    /// Baseline subject and median.
    pub baseline: Option<(String, f64)>,
    /// lamina / baseline.
    pub ratio: Option<f64>,
    /// The floor's subject and median, where the workload measures one.
    pub floor: Option<(String, f64)>,
    /// The goal, when one was set.
    pub goal: Option<String>,
    /// Whether it was met (None: no goal or not checkable).
    pub met: Option<bool>,
    /// The lower bound's subject and median, where the workload gives one.
    pub bound: Option<(String, f64)>,
    /// Whether the goal, checked against the bound, would be met (None: no bound or not checkable). `Some(false)`
    /// means out of reach.
    pub reachable: Option<bool>,
    /// For a goal relative to a baseline (`<= 1.1x overlayfs`), the bound over that baseline.
    pub bound_ratio: Option<f64>,
    /// Samples behind the lamina median.
    pub runs: usize,
}

/// Pairs lamina's figures with their baselines.
pub fn rows(r: &WorkloadResult) -> Vec<Row> {
    // Keys in order of first appearance.
    let mut keys: Vec<(String, String)> = Vec::new();
    for f in &r.figures {
        let k = (f.case.clone(), f.metric.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out = Vec::new();
    for (case, metric) in keys {
        let figs: Vec<&Figure> = r
            .figures
            .iter()
            .filter(|f| f.case == case && f.metric == metric)
            .collect();
        let lam = figs.iter().find(|f| f.subject == "lamina");
        let bound_fig = figs.iter().find(|f| f.bound);
        let bases: Vec<&&Figure> = figs
            .iter()
            .filter(|f| f.subject != "lamina" && !f.bound)
            .collect();
        let Some(unit) = lam.or(bases.first().copied()).map(|f| f.unit) else {
            continue;
        };
        let lam_med = lam.map(|f| f.median());
        let ratios_of = |v: Option<f64>| -> Vec<(String, f64)> {
            bases
                .iter()
                .filter_map(|b| Some((b.subject.clone(), v? / convert(b.median(), b.unit, unit))))
                .collect()
        };
        let goal = lam
            .and_then(|f| f.goal.clone())
            .or_else(|| bases.iter().find_map(|b| b.goal.clone()));
        let met = goal
            .as_deref()
            .and_then(|g| goal_met(g, lam_med.unwrap_or(f64::NAN), unit, &ratios_of(lam_med)));
        let bound = bound_fig.map(|f| (f.subject.clone(), convert(f.median(), f.unit, unit)));
        let bound_ratios = ratios_of(bound.as_ref().map(|(_, b)| *b));
        let reachable = goal
            .as_deref()
            .zip(bound.as_ref())
            .and_then(|(g, (_, b))| goal_met(g, *b, unit, &bound_ratios));
        let bound_ratio = goal
            .as_deref()
            .and_then(goal_baseline)
            .and_then(|base| bound_ratios.iter().find(|(n, _)| n == base).map(|(_, r)| *r));
        let runs = lam.map_or(0, |f| f.samples.len());
        let floor = bases
            .iter()
            .find(|f| f.floor)
            .map(|f| (f.subject.clone(), convert(f.median(), f.unit, unit)));
        // A floor is a row's baseline only where nothing else is.
        let bases: Vec<&&Figure> = if bases.iter().any(|f| !f.floor) {
            bases.into_iter().filter(|f| !f.floor).collect()
        } else {
            bases
        };
        let row = |baseline: Option<(String, f64)>| Row {
            workload: r.name.to_owned(),
            case: case.clone(),
            fs: r.fs,
            metric: metric.clone(),
            unit,
            lamina: lam_med,
            ratio: baseline.as_ref().and_then(|(_, bm)| lam_med.map(|l| l / bm)),
            baseline,
            floor: floor.clone(),
            goal: goal.clone(),
            met,
            bound: bound.clone(),
            reachable,
            bound_ratio,
            runs,
        };
        if bases.is_empty() {
            out.push(row(None));
        }
        for b in bases {
            out.push(row(Some((b.subject.clone(), convert(b.median(), b.unit, unit)))));
        }
    }
    out
}

/// `v` in `from` expressed in `to` (same dimension assumed).
fn convert(v: f64, from: Unit, to: Unit) -> f64 {
    if from == to {
        return v;
    }
    from_base(from.to_base(v), to)
}

/// A value in base units (seconds, bytes) expressed in `to`.
fn from_base(base: f64, to: Unit) -> f64 {
    match to {
        Unit::Millis => base * 1e3,
        Unit::Micros => base * 1e6,
        Unit::MiB => base / 1_048_576.0,
        _ => base,
    }
}

/// Writes `results.json`, `results.md` and `<workload>.svg` into `out`.
pub fn write(out: &Path, info: &RunInfo, results: &[WorkloadResult]) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let all_rows: Vec<Row> = results.iter().flat_map(rows).collect();

    // JSON.
    let workloads: Vec<Value> = results
        .iter()
        .map(|r| {
            let figures: Vec<Value> = r
                .figures
                .iter()
                .map(|f| {
                    let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
                    let (lo, hi) = min_max(&f.samples);
                    if let Value::Object(m) = &mut v {
                        m.insert("median".into(), json!(finite(f.median())));
                        m.insert("min".into(), json!(finite(lo)));
                        m.insert("max".into(), json!(finite(hi)));
                    }
                    v
                })
                .collect();
            json!({
                "name": r.name, "about": r.about, "fs": r.fs, "ok": r.error.is_none(), "error": r.error,
                "seconds": r.seconds, "figures": figures,
            })
        })
        .collect();
    let comparisons: Vec<Value> = all_rows
        .iter()
        .map(|r| {
            json!({
                "workload": r.workload, "case": r.case, "fs": r.fs, "metric": r.metric, "unit": r.unit,
                "lamina_median": r.lamina.and_then(finite),
                "baseline": r.baseline.as_ref().map(|b| &b.0),
                "baseline_median": r.baseline.as_ref().and_then(|b| finite(b.1)),
                "ratio": r.ratio.and_then(finite), "goal": r.goal, "met": r.met,
                "floor": r.floor.as_ref().map(|b| &b.0),
                "floor_median": r.floor.as_ref().and_then(|b| finite(b.1)),
                "bound": r.bound.as_ref().map(|b| &b.0),
                "bound_median": r.bound.as_ref().and_then(|b| finite(b.1)),
                "reachable": r.reachable,
            })
        })
        .collect();
    let doc = json!({ "run": info, "workloads": workloads, "comparisons": comparisons });
    let path = out.join("results.json");
    fs::write(&path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;

    // Markdown.
    let path = out.join("results.md");
    fs::write(&path, markdown(info, results, &all_rows))
        .with_context(|| format!("writing {}", path.display()))?;

    // Plots.
    let mut names: Vec<&'static str> = Vec::new();
    for r in results {
        if !names.contains(&r.name) {
            names.push(r.name);
        }
    }
    for name in names {
        let mine: Vec<&WorkloadResult> = results.iter().filter(|r| r.name == name).collect();
        let path = out.join(format!("{name}.svg"));
        fs::write(&path, svg(name, &mine)).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn markdown(info: &RunInfo, results: &[WorkloadResult], rows: &[Row]) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# lamina bench results\n");
    let _ = writeln!(m, "- Date: {}", info.date);
    let _ = writeln!(
        m,
        "- lamina {} ({} build{})",
        info.lamina_version,
        info.build,
        if info.build == "release" {
            ""
        } else {
            " — not representative: build with --release for figures"
        }
    );
    let _ = writeln!(m, "- Machine: {}", info.machine.line());
    let _ = writeln!(
        m,
        "- Load average (1 min) at start / end: {:.2} / {:.2}{}",
        info.load_avg.0,
        info.load_avg.1,
        if info.load_avg.0.max(info.load_avg.1) > 0.5 * info.machine.cores as f64 {
            " — other work was running, figures are pessimistic"
        } else {
            ""
        }
    );
    for f in &info.filesystems {
        let _ = writeln!(m, "- Filesystem: {f}");
    }
    let _ = writeln!(
        m,
        "- Mode: {}, {} run(s) per timed case (medians; min–max in results.json), total {:.0} s",
        if info.quick {
            "--quick (correctness only: sizes cut, figures not meaningful)"
        } else {
            "full"
        },
        info.runs,
        info.duration_s
    );
    let failed: Vec<&WorkloadResult> = results.iter().filter(|r| r.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(m, "\n**{} workload run(s) failed:**\n", failed.len());
        for r in failed {
            let err = r.error.as_deref().unwrap_or_default().replace('\n', " ");
            let _ = writeln!(m, "- `{}` on {}: {}", r.name, r.fs.name(), truncate(&err, 600));
        }
    }
    let mut names: Vec<(&str, &str)> = Vec::new();
    for r in results {
        if !names.iter().any(|(n, _)| *n == r.name) {
            names.push((r.name, r.about));
        }
    }
    for (name, about) in names {
        let _ = writeln!(m, "\n## {name}\n\n{about}\n");
        let _ = writeln!(m, "![{name}]({name}.svg)\n");
        let mine: Vec<&Row> = rows.iter().filter(|r| r.workload == name).collect();
        if mine.is_empty() {
            let _ = writeln!(m, "(no figures)");
            continue;
        }
        let _ = writeln!(
            m,
            "| case | fs | metric | lamina | floor | baseline | baseline median | lamina / baseline | goal | met? |"
        );
        let _ = writeln!(m, "|---|---|---|---:|---:|---|---:|---:|---|---|");
        for r in mine {
            let u = r.unit.label();
            let lam = r.lamina.map_or("–".into(), |v| format!("{} {u}", fmt_num(v)));
            let (bn, bm) = r.baseline.as_ref().map_or(("–".into(), "–".into()), |(n, v)| {
                (n.clone(), format!("{} {u}", fmt_num(*v)))
            });
            let floor = r
                .floor
                .as_ref()
                .map_or("–".into(), |(n, v)| format!("{} {u} ({n})", fmt_num(*v)));
            let ratio = r.ratio.map_or("–".into(), |x| format!("{x:.2}×"));
            let met = verdict(r);
            let _ = writeln!(
                m,
                "| {} | {} | {} | {lam} | {floor} | {bn} | {bm} | {ratio} | {} | {met} |",
                r.case,
                r.fs.name(),
                r.metric,
                r.goal.as_deref().unwrap_or("–"),
            );
        }
    }
    m
}

/// The "met?" cell: `yes`, `**no**`, or, when the row's lower bound misses the goal too, `**no**, out of reach`
/// with the bound.
fn verdict(r: &Row) -> String {
    match (r.met, r.reachable, &r.bound) {
        (Some(true), _, _) => "yes".into(),
        (Some(false), Some(false), Some((subject, b))) => {
            let u = r.unit.label();
            let ratio = r.bound_ratio.map_or(String::new(), |x| format!(", {x:.2}×"));
            format!(
                "**no**, out of reach: bound {} {u}{ratio} ({subject})",
                fmt_num(*b)
            )
        }
        (Some(false), _, _) => "**no**".into(),
        (None, _, _) => "–".into(),
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(n).collect();
    t.push('…');
    t
}

// ------------------------------------------------------------------------------------------------------------
// SVG
// ------------------------------------------------------------------------------------------------------------

const PALETTE: [&str; 6] = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#c53030", "#718096"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2 or 5 × 10^k) for an axis up to `max` with about `n` ticks.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// One SVG for a workload: a panel per metric, groups of bars per (case, filesystem), one bar per subject
/// (median; the whisker spans min–max).
pub fn svg(name: &str, results: &[&WorkloadResult]) -> String {
    // A lower bound repeats a floor or adds floors up: the table gives it, the chart does not.
    let figs: Vec<&Figure> = results
        .iter()
        .flat_map(|r| r.figures.iter())
        .filter(|f| !f.bound)
        .collect();
    let mut subjects: Vec<String> = vec!["lamina".into()];
    let mut metrics: Vec<String> = Vec::new();
    for f in &figs {
        if !subjects.contains(&f.subject) {
            subjects.push(f.subject.clone());
        }
        if !metrics.contains(&f.metric) {
            metrics.push(f.metric.clone());
        }
    }
    let color = |s: &str| PALETTE[subjects.iter().position(|x| x == s).unwrap_or(0) % PALETTE.len()];

    // Panels: metric -> groups (case, fs) -> bars (subject, figure).
    type Groups<'a> = Vec<((String, String), Vec<&'a Figure>)>;
    let mut panels: Vec<(String, Groups<'_>)> = Vec::new();
    for metric in &metrics {
        let mut groups: Groups<'_> = Vec::new();
        for f in figs.iter().filter(|f| &f.metric == metric) {
            let fs = f.fs.map_or("", |k| k.name()).to_owned();
            let key = (f.case.clone(), fs);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(f),
                None => groups.push((key, vec![*f])),
            }
        }
        for (_, bars) in &mut groups {
            bars.sort_by_key(|f| subjects.iter().position(|s| *s == f.subject));
        }
        panels.push((metric.clone(), groups));
    }

    let bar_w = 26.0;
    let gap = 22.0;
    let left = 78.0;
    let panel_h = 260.0;
    let top = 70.0;
    let label_h = 48.0;
    // A group is as wide as its bars or its label (case on up to two lines), whichever is wider.
    let group_w = |case: &str, bars: usize| -> f64 {
        let longest = split_label(case)
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0);
        (bars as f64 * bar_w).max(longest as f64 * 6.4)
    };
    let max_group_w = panels
        .iter()
        .map(|(_, g)| g.iter().map(|((c, _), b)| group_w(c, b.len()) + gap).sum::<f64>())
        .fold(0.0, f64::max);
    let width = (left + max_group_w + 30.0).max(640.0);
    let height = top + panels.len().max(1) as f64 * (panel_h + label_h + 40.0) + 10.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let about = results.iter().map(|r| r.about).next().unwrap_or_default();
    let _ = writeln!(
        s,
        r##"<text x="10" y="20" font-size="14" font-weight="bold">{}</text><text x="{}" y="20" fill="#333">{}</text>"##,
        esc(name),
        18.0 + 9.0 * name.chars().count() as f64,
        esc(&truncate(
            about,
            ((width - 30.0 - 9.0 * name.chars().count() as f64) / 6.2) as usize
        ))
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="36" fill="#555">bars: median of the runs; whiskers: min–max; lower is better unless marked ↑</text>"##
    );
    // Legend.
    let mut lx = 10.0;
    for sub in &subjects {
        if !figs.iter().any(|f| &f.subject == sub) {
            continue;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="46" width="12" height="12" fill="{}"/><text x="{}" y="56">{}</text>"#,
            color(sub),
            lx + 16.0,
            esc(sub)
        );
        lx += 16.0 + 7.0 * sub.chars().count() as f64 + 18.0;
    }
    if figs.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="10" y="90">no figures (the workload failed before measuring)</text>"#
        );
    }

    let mut y0 = top;
    for (metric, groups) in &panels {
        let unit = groups
            .first()
            .and_then(|(_, b)| b.first())
            .map_or(Unit::Count, |f| f.unit);
        let lower = groups
            .first()
            .and_then(|(_, b)| b.first())
            .is_none_or(|f| f.lower_is_better);
        let vmax = groups
            .iter()
            .flat_map(|(_, b)| b.iter())
            .map(|f| {
                let (_, hi) = min_max(&f.samples);
                if hi.is_nan() {
                    0.0
                } else {
                    hi
                }
            })
            .fold(0.0, f64::max);
        let goal_line = goal_value(groups, unit);
        let vmax = vmax.max(goal_line.unwrap_or(0.0)).max(f64::MIN_POSITIVE);
        let step = nice_step(vmax, 5.0);
        let axis_max = (vmax / step).ceil() * step;
        let plot_top = y0 + 18.0;
        let plot_bottom = plot_top + panel_h - 18.0;
        let yv = |v: f64| plot_bottom - (v / axis_max) * (plot_bottom - plot_top);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}" font-size="12" font-weight="bold">{}{}</text>"#,
            y0 + 8.0,
            esc(metric),
            if lower { "" } else { " ↑ (higher is better)" }
        );
        // Y axis, grid and ticks.
        let _ = writeln!(
            s,
            r##"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle" fill="#333">{} ({})</text>"##,
            (plot_top + plot_bottom) / 2.0,
            esc(metric),
            unit.label()
        );
        let mut t = 0.0;
        while t <= axis_max + step * 1e-9 {
            let y = yv(t);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e2e8f0"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
                width - 20.0,
                left - 6.0,
                y + 4.0,
                fmt_tick(t, step)
            );
            t += step;
        }
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{plot_top:.1}" x2="{left}" y2="{plot_bottom:.1}" stroke="#333"/><line x1="{left}" y1="{plot_bottom:.1}" x2="{:.1}" y2="{plot_bottom:.1}" stroke="#333"/>"##,
            width - 20.0
        );
        if let Some(g) = goal_line {
            let y = yv(g);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#c53030" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#c53030">goal {} {}</text>"##,
                width - 20.0,
                width - 22.0,
                y - 3.0,
                fmt_num(g),
                unit.label()
            );
        }
        // Bars.
        let mut x = left + gap / 2.0;
        for ((case, fs), bars) in groups {
            let slot = group_w(case, bars.len());
            let gw = bars.len() as f64 * bar_w;
            let x_bars = x + (slot - gw) / 2.0;
            for (i, f) in bars.iter().enumerate() {
                let med = f.median();
                let bx = x_bars + i as f64 * bar_w + 2.0;
                if med.is_finite() {
                    let y = yv(med);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{bx:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {} {}</title></rect>"#,
                        bar_w - 4.0,
                        (plot_bottom - y).max(0.5),
                        color(&f.subject),
                        esc(&f.subject),
                        fmt_num(med),
                        unit.label()
                    );
                    let (lo, hi) = min_max(&f.samples);
                    if f.samples.len() > 1 && hi > lo {
                        let cx = bx + (bar_w - 4.0) / 2.0;
                        let _ = writeln!(
                            s,
                            r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#1a202c"/>"##,
                            yv(lo),
                            yv(hi)
                        );
                    }
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9" fill="#1a202c">{}</text>"##,
                        bx + (bar_w - 4.0) / 2.0,
                        yv(med.max(min_max(&f.samples).1)) - 3.0,
                        fmt_num(med)
                    );
                }
            }
            let cx = x + slot / 2.0;
            let mut ly = plot_bottom + 14.0;
            for line in split_label(case) {
                let _ = writeln!(
                    s,
                    r#"<text x="{cx:.1}" y="{ly:.1}" text-anchor="middle">{}</text>"#,
                    esc(&line)
                );
                ly += 13.0;
            }
            let _ = writeln!(
                s,
                r##"<text x="{cx:.1}" y="{ly:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                esc(fs)
            );
            x += slot + gap;
        }
        y0 += panel_h + label_h + 40.0;
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// A group label on one line, or two when longer than 16 characters (split at the space nearest the middle).
fn split_label(label: &str) -> Vec<String> {
    let n = label.chars().count();
    if n <= 16 {
        return vec![label.to_owned()];
    }
    let mid = n / 2;
    let best = label
        .char_indices()
        .filter(|(_, c)| *c == ' ')
        .map(|(i, _)| i)
        .min_by_key(|&i| label[..i].chars().count().abs_diff(mid));
    match best {
        Some(i) => vec![label[..i].to_owned(), label[i + 1..].to_owned()],
        None => vec![label.to_owned()],
    }
}

/// An axis tick with as many decimals as the step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// An absolute goal (`<= 0.3 ms`) common to a panel, in the panel's unit, to draw as a line.
fn goal_value(groups: &[((String, String), Vec<&Figure>)], unit: Unit) -> Option<f64> {
    let goals: BTreeMap<String, ()> = groups
        .iter()
        .flat_map(|(_, b)| b.iter())
        .filter_map(|f| f.goal.clone())
        .map(|g| (g, ()))
        .collect();
    if goals.len() != 1 {
        return None;
    }
    let g = goals.keys().next()?;
    let mut w = g.split_whitespace();
    let _op = w.next()?;
    let num: f64 = w.next()?.parse().ok()?;
    let mult = goal_unit(w.next().unwrap_or(""))?;
    match unit {
        Unit::Seconds | Unit::Millis | Unit::Micros | Unit::MiB | Unit::Bytes => {
            Some(from_base(num * mult, unit))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `getput` result on `fs` with `figures`.
    fn getput(about: &'static str, fs: FsKind, figures: Vec<Figure>) -> WorkloadResult {
        WorkloadResult {
            name: "getput",
            about,
            fs,
            error: None,
            seconds: 1.0,
            figures,
        }
    }

    /// lamina's Get p50 at depth 1, with its goal.
    fn lamina_get_p50() -> Figure {
        fig(
            "depth 1",
            "lamina",
            "Get p50",
            Unit::Micros,
            &[200.0, 300.0, 250.0],
        )
        .goal("<= 0.3 ms")
    }

    fn fig(case: &str, subject: &str, metric: &str, unit: Unit, samples: &[f64]) -> Figure {
        let mut f = Figure::new("getput", case, subject, metric, unit);
        f.samples = samples.to_vec();
        f.fs = Some(FsKind::Ext4);
        f
    }

    #[test]
    fn goals_are_checked_against_values_and_ratios() {
        let r = vec![("gnu-tar+syncfs".to_owned(), 1.05)];
        assert_eq!(
            goal_met("<= 1.1x gnu-tar+syncfs", 1.5, Unit::Seconds, &r),
            Some(true)
        );
        let r = vec![("gnu-tar+syncfs".to_owned(), 1.25)];
        assert_eq!(
            goal_met("<= 1.1x gnu-tar+syncfs", 1.5, Unit::Seconds, &r),
            Some(false)
        );
        assert_eq!(goal_met("<= 1.1x overlay2", 1.5, Unit::Seconds, &r), None);
        assert_eq!(goal_met("<= 0.3 ms", 250.0, Unit::Micros, &[]), Some(true));
        assert_eq!(goal_met("<= 0.3 ms", 301.0, Unit::Micros, &[]), Some(false));
        assert_eq!(goal_met("<= 64 MiB", 17.0, Unit::MiB, &[]), Some(true));
        assert_eq!(goal_met("<= 1 s", 1.2, Unit::Seconds, &[]), Some(false));
        assert_eq!(goal_met("fast", 1.2, Unit::Seconds, &[]), None);
    }

    #[test]
    fn rows_pair_lamina_with_each_baseline() {
        let r = getput(
            "x",
            FsKind::Ext4,
            vec![
                lamina_get_p50(),
                fig("depth 1", "overlay-syscalls", "Get p50", Unit::Micros, &[100.0]),
                fig("depth 1", "lamina", "start", Unit::Seconds, &[0.5]),
            ],
        );
        let rows = rows(&r);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].lamina, Some(250.0));
        assert_eq!(rows[0].ratio, Some(2.5));
        assert_eq!(rows[0].met, Some(true));
        assert!(rows[1].baseline.is_none());
    }

    #[test]
    fn floors_get_their_own_column() {
        let r = getput(
            "x",
            FsKind::Ext4,
            vec![
                lamina_get_p50(),
                fig("depth 1", "bare", "Get p50", Unit::Micros, &[50.0]).floor(),
                fig("depth 1", "overlay2", "Get p50", Unit::Micros, &[200.0]),
                fig("depth 2", "lamina", "Get p50", Unit::Micros, &[300.0]),
                fig("depth 2", "bare", "Get p50", Unit::Micros, &[100.0]).floor(),
            ],
        );
        let rows = rows(&r);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].baseline, Some(("overlay2".into(), 200.0)));
        assert_eq!(rows[0].floor, Some(("bare".into(), 50.0)));
        // Only a floor: it is the baseline too.
        assert_eq!(rows[1].baseline, Some(("bare".into(), 100.0)));
        assert_eq!(rows[1].ratio, Some(3.0));
        assert_eq!(rows[1].floor, Some(("bare".into(), 100.0)));
    }

    #[test]
    fn a_goal_its_lower_bound_misses_too_is_out_of_reach() {
        let r = getput(
            "x",
            FsKind::Ext4,
            vec![
                fig("depth 1", "lamina", "prepare", Unit::Millis, &[2.0]).goal("<= 1.1x overlayfs"),
                fig("depth 1", "overlayfs", "prepare", Unit::Millis, &[1.5]),
                fig("depth 1", "floor+record", "prepare", Unit::Millis, &[1.8]).bound(),
                fig("depth 2", "lamina", "prepare", Unit::Millis, &[2.0]).goal("<= 1.1x overlayfs"),
                fig("depth 2", "overlayfs", "prepare", Unit::Millis, &[1.5]),
                fig("depth 2", "floor+record", "prepare", Unit::Millis, &[1.6]).bound(),
                fig("depth 3", "lamina", "server", Unit::Millis, &[0.4]).goal("<= 0.3 ms"),
                fig("depth 3", "record", "server", Unit::Millis, &[0.31]).bound(),
            ],
        );
        let rows = rows(&r);
        // The bound is never a baseline row of its own.
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].met, Some(false));
        assert_eq!(rows[0].reachable, Some(false));
        assert_eq!(rows[0].bound, Some(("floor+record".into(), 1.8)));
        assert!((rows[0].bound_ratio.unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(
            verdict(&rows[0]),
            "**no**, out of reach: bound 1.80 ms, 1.20× (floor+record)"
        );
        // 1.6 ms is within 1.1 × 1.5 ms: missed, but not out of reach.
        assert_eq!(rows[1].reachable, Some(true));
        assert_eq!(verdict(&rows[1]), "**no**");
        assert_eq!(rows[2].reachable, Some(false));
        assert_eq!(rows[2].bound_ratio, None);
        assert_eq!(verdict(&rows[2]), "**no**, out of reach: bound 0.310 ms (record)");
        // Bounds are left out of the charts.
        assert!(!svg("getput", &[&r]).contains("floor+record"));
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let r = getput(
            "Create+Get, Get, Put, Put+Remove of a RW layer <at depth>",
            FsKind::Xfs,
            vec![
                lamina_get_p50(),
                fig(
                    "depth 1",
                    "overlay-syscalls",
                    "Get p50",
                    Unit::Micros,
                    &[100.0, 120.0],
                ),
                fig(
                    "docker load 250MB/42k files",
                    "lamina",
                    "Get p50",
                    Unit::Micros,
                    &[80.0],
                ),
                fig("depth 1", "lamina", "Put p99", Unit::Micros, &[900.0]),
            ],
        );
        let svg = svg("getput", &[&r]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("&lt;at depth&gt;"));
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        if let Some(p) = std::env::var_os("LAMINA_BENCH_SVG_SAMPLE") {
            fs::write(p, &svg).unwrap();
        }
    }

    #[test]
    fn utc_dates() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-11-30 20:14:30 UTC".len());
        assert!(d.starts_with("20"));
        assert_eq!(split_label("docker load 250MB/42k files").len(), 2);
        assert_eq!(fmt_tick(0.5, 0.1), "0.5");
        assert_eq!(fmt_tick(200.0, 100.0), "200");
    }
}
