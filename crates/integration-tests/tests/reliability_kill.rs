//! Reliability tier, part 4 (issue 8): kill points. The daemon is SIGKILLed at every fault point
//! (`lamina_sys::fault`, compiled into test builds) of ApplyDiff, Create, Remove, Get/Put, the snapshotter's
//! Commit and the volume Create, and at random times during those operations; after each kill it is started
//! again without faults and the store is checked: the database opens, no layer is left `Applying`, every
//! applied layer holds exactly the content that was sent (and `lamina verify --all` finds no mismatch), no
//! directory under `layers/`, `staging/` or `trash/` belongs to no layer, `lamina gc --dry-run` finds nothing,
//! the kernel's mount table under the data root agrees with the store's mount counts, no temporary volume
//! record is left, and the interrupted operation, retried, succeeds.
//!
//! Size: one kill per (operation, point) pair per round; `LAMINA_RELIABILITY_KILL_ROUNDS` rounds (CI 1, full
//! 25) plus `LAMINA_RELIABILITY_RANDOM_KILLS` random-time kills (CI 20, full 250).

use std::collections::BTreeMap;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use lamina_testkit::crash::*;
use lamina_testkit::faults::*;
use lamina_testkit::reliability::{self, Rng};
use lamina_testkit::*;

#[test]
fn kill_points_and_random_kills() {
    let Some(_serial) = serial_if(require_root("kill_points_and_random_kills")) else {
        return;
    };
    let rounds = reliability::count("LAMINA_RELIABILITY_KILL_ROUNDS", 1, 25);
    let randoms = reliability::count("LAMINA_RELIABILITY_RANDOM_KILLS", 20, 250);
    let mut rng = Rng::new(reliability::base_seed() ^ 0x6b11);
    let t0 = Instant::now();

    let mut d = Daemon::new(&unique_name("faults-kill"));
    let hits = d.base.dir().join("hits.log");
    let quiet = d.base.dir().join("hits-clean.log");
    assert!(d.start(None, &quiet));
    if !lamina_sys::fault::ENABLED {
        // `cargo build --workspace --all-targets` builds the lamina binary with the faults feature.
        eprintln!("note: the test crate itself is built without the faults feature");
    }
    // The bases: a graph-driver layer and a committed snapshot.
    let mut model = make_bases(&d, &mut rng);
    let first = check(&d, &model);
    assert!(first.is_empty(), "before any kill: {first:#?}");

    // The plan: every (operation, point) pair per round, then random-time kills.
    let plan = plan(rounds, randoms, &mut rng);

    let mut kills = 0u64;
    let mut not_reached: BTreeMap<String, u64> = BTreeMap::new();
    let mut coverage: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut inconsistencies: Vec<String> = Vec::new();
    for (i, (op, point)) in plan.iter().enumerate() {
        let case = new_case(&mut rng, i, op, point.is_none() && *op == "apply");
        prepare(&d, &case, &mut model);
        d.stop();

        let _ = fs::remove_file(&hits);
        let armed = point.map(|p| format!("{p}=kill"));
        let killed = if d.start(armed.as_deref(), &hits) {
            match point {
                Some(_) => {
                    let _ = run_op(&d, &case);
                    // Background steps (manifests) may come after the answer.
                    if d.exited_within(Duration::from_secs(5)) {
                        d.gone();
                        true
                    } else {
                        d.kill9();
                        false
                    }
                }
                None => {
                    let pid = d.pid();
                    let delay = Duration::from_micros(rng.range(0, 60_000));
                    let killer = thread::spawn(move || {
                        thread::sleep(delay);
                        signal(pid, "KILL");
                    });
                    let _ = run_op(&d, &case);
                    killer.join().unwrap();
                    d.kill9();
                    true
                }
            }
        } else {
            // Killed while starting (a point hit by the start-up recovery).
            d.gone();
            true
        };
        if killed {
            kills += 1;
            let label = point.unwrap_or("(random time)").to_string();
            *coverage.entry((op.to_string(), label)).or_default() += 1;
        } else {
            *not_reached
                .entry(format!("{op} @ {}", point.unwrap_or("-")))
                .or_default() += 1;
        }

        assert!(
            d.start(None, &quiet),
            "clean start after {op} @ {point:?} failed; log:\n{}",
            d.base.log_tail()
        );
        for v in check(&d, &model) {
            inconsistencies.push(format!("after {op} @ {point:?}: {v}"));
        }
        if let Err(e) = finish_op(&d, &case, &mut model) {
            inconsistencies.push(format!("after {op} @ {point:?}: retry failed: {e}"));
        }
        for v in check(&d, &model) {
            inconsistencies.push(format!("after {op} @ {point:?} and its retry: {v}"));
        }
        if !inconsistencies.is_empty() {
            eprintln!("log tail:\n{}", d.base.log_tail());
            break;
        }
    }
    let panics = reliability::panics_in_log(&d.base.log);

    eprintln!("kill points: operation × point → kills");
    for ((op, p), n) in &coverage {
        eprintln!("  {op:<15} {p:<28} {n}");
    }
    let pairs = coverage.keys().filter(|(_, p)| !p.starts_with('(')).count();
    let total_pairs: usize = OPS.iter().map(|(_, p)| p.len()).sum();
    eprintln!(
        "kills: {kills}, inconsistencies: {}, coverage {pairs}/{total_pairs} (operation, point) pairs, \
         not reached: {not_reached:?}, panics: {}, time {:.1} s",
        inconsistencies.len(),
        panics.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(inconsistencies.is_empty(), "{inconsistencies:#?}");
    assert!(not_reached.is_empty(), "points never hit: {not_reached:?}");
    assert_eq!(pairs, total_pairs);
    assert!(kills >= 50 || rounds < 1, "only {kills} kills");
}
