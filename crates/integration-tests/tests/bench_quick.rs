//! `lamina-bench --quick` end to end, for correctness only (no timing is asserted): it runs every workload on a
//! fresh loop-backed ext4, writes results.md, results.json and one SVG per workload, measures lamina and a
//! baseline in each, and leaves no loop device, mount or process behind.
//!
//! Needs root (SKIPPED otherwise; under CI=true it fails instead).

use std::fs;
use std::process::Command;
use std::time::Instant;

use lamina_testkit::ceph::loops_under;
use lamina_testkit::*;

#[test]
fn bench_quick_runs_every_workload_and_writes_the_report() {
    let Some(_serial) = serial_if(require_root(
        "bench_quick_runs_every_workload_and_writes_the_report",
    )) else {
        return;
    };
    let dir = TestDir::new(&unique_name("bench"));
    let out = dir.join("out");
    // The work dir (loop backing files, mount points) must not be under --out; it gets its own name so the
    // leftover checks below see only this run.
    let work = dir.join("work");

    let list = Command::new(lamina_bench_bin())
        .arg("--list")
        .output()
        .expect("lamina-bench --list");
    assert!(list.status.success(), "lamina-bench --list failed");
    let names: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for expected in ["applydiff", "getput", "start10k", "rss"] {
        assert!(
            names.iter().any(|n| n == expected),
            "--list lacks {expected}: {names:?}"
        );
    }

    let t0 = Instant::now();
    let child = Command::new(lamina_bench_bin())
        .env("LAMINA_BIN", lamina_bin())
        .args(["--quick", "--fs", "ext4", "--out"])
        .arg(&out)
        .arg("--work")
        .arg(&work)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start lamina-bench");
    let bench_pid = child.id();
    let run = child.wait_with_output().expect("run lamina-bench");
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!(
        "lamina-bench --quick took {took:.1?}; stderr tail:\n{}",
        truncate_tail(&stderr, 3000)
    );

    // Nothing left behind, whatever the outcome.
    assert!(
        loops_under(&work).is_empty(),
        "loop devices left: {:?}",
        loops_under(&work)
    );
    assert!(
        mounts_under(&work).is_empty(),
        "mounts left: {:?}",
        mounts_under(&work)
    );
    assert!(
        pids_referencing(&work).is_empty(),
        "processes left: {:?}",
        pids_referencing(&work)
    );
    // dockerds' exec roots: /run/lamina-bench/<pid of the bench>-<n>.
    let leftover: Vec<_> = fs::read_dir("/run/lamina-bench")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{bench_pid}-")))
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(leftover.is_empty(), "dockerd runtime dirs left: {leftover:?}");
    let left_in_work: Vec<_> = fs::read_dir(&work)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left_in_work.is_empty(), "files left in --work: {left_in_work:?}");

    assert!(
        run.status.success(),
        "lamina-bench --quick failed ({}):\n{stderr}",
        run.status
    );

    let md = fs::read_to_string(out.join("results.md")).expect("results.md");
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("results.json")).expect("results.json")).expect("JSON");
    let workloads = json["workloads"].as_array().expect("workloads array");
    assert_eq!(workloads.len(), names.len(), "one result per workload on ext4");
    for w in workloads {
        let name = w["name"].as_str().unwrap();
        assert_eq!(w["ok"], true, "{name} failed: {}", w["error"]);
        let figures = w["figures"].as_array().unwrap();
        let subjects: Vec<&str> = figures.iter().filter_map(|f| f["subject"].as_str()).collect();
        assert!(subjects.contains(&"lamina"), "{name} has no lamina figure");
        assert!(
            subjects.iter().any(|s| *s != "lamina"),
            "{name} has no baseline figure"
        );
        for f in figures {
            let samples = f["samples"].as_array().unwrap();
            assert!(!samples.is_empty(), "{name}: a figure without samples: {f}");
            assert!(f["median"].is_number(), "{name}: no median: {f}");
        }
        assert!(
            md.contains(&format!("## {name}")),
            "results.md lacks a section for {name}"
        );
        let svg =
            fs::read_to_string(out.join(format!("{name}.svg"))).unwrap_or_else(|e| panic!("{name}.svg: {e}"));
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}.svg is not an SVG"
        );
    }
    assert!(json["run"]["machine"]["cores"].as_u64().unwrap_or(0) > 0);
    let comparisons = json["comparisons"].as_array().expect("comparisons array");
    assert!(!comparisons.is_empty());
    // The goals with a lower bound from the run's floors carry it, so that the report can call them out of reach.
    for (workload, metric) in [
        ("containers100", "storage share"),
        ("getput", "Get p50 own part"),
        ("snapshotter", "prepare+mounts p50"),
        ("snapshotter", "commit p50"),
        ("snapshotter", "Prepare server-side p50"),
        ("snapshotter", "Commit server-side p50"),
    ] {
        let rows: Vec<&serde_json::Value> = comparisons
            .iter()
            .filter(|c| c["workload"] == workload && c["metric"] == metric)
            .collect();
        assert!(!rows.is_empty(), "no {workload} {metric} row");
        for row in rows {
            assert!(
                row["bound_median"].is_number() && row["reachable"].is_boolean(),
                "{workload} {metric}: no lower bound: {row}"
            );
        }
    }
}

/// The last `n` bytes of `s` (on a char boundary).
fn truncate_tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
