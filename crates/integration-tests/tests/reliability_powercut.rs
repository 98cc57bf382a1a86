//! Reliability tier, part 8 (issue 17): power cuts. A SIGKILL keeps everything the kernel accepted; a power cut
//! keeps only what reached the disk. The data root lives on a loop-backed ext4 and then xfs filesystem, which is
//! cut with the shutdown ioctl without log flush (`LoopFs::cut_power`) while lamina is in the middle of an
//! operation, either right at one of its fault points (armed to pause there, then cut) or at a random moment.
//! lamina is then killed, the filesystem unmounted and mounted again (journal or log replayed, as at the next
//! boot), and lamina started again without faults. After every cut:
//! - lamina starts by itself (a failure to start is the worst outcome and counted apart);
//! - an operation whose answer arrived before the cut kept its effect ([`acknowledged`]);
//! - the store passes the same checks as after a kill ([`check`]): nothing half-made visible, no leftovers,
//!   `gc --dry-run` and `verify --all` clean, mounts as counted;
//! - the interrupted operation, retried, succeeds.
//!
//! Size: per filesystem, one cut per (operation, point) pair per round, `LAMINA_RELIABILITY_POWERCUT_ROUNDS`
//! rounds (CI 1, full 15), plus `LAMINA_RELIABILITY_RANDOM_CUTS` random-moment cuts (CI 10, full 150). The full
//! run is (34 pairs × 15 + 150) × 2 filesystems = 1,320 cuts.

use std::collections::BTreeMap;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use lamina_testkit::crash::*;
use lamina_testkit::faults::*;
use lamina_testkit::reliability::{self, Rng};
use lamina_testkit::*;

/// Figures of one filesystem's run.
#[derive(Default)]
struct Tally {
    cuts: u64,
    acknowledged: u64,
    failed_starts: Vec<String>,
    inconsistencies: Vec<String>,
    not_reached: BTreeMap<String, u64>,
}

fn run_on(fs_type: &str, rounds: u64, randoms: u64, rng: &mut Rng) -> Tally {
    let mut d = Daemon::new(&unique_name(&format!("powercut-{fs_type}")));
    let disk = d.base.dir().join("disk");
    let lfs = LoopFs::create(
        &d.base.dir().join("disk.img"),
        &disk,
        fs_type,
        if fs_type == "xfs" {
            &["-q", "-f"]
        } else {
            &["-q", "-F"]
        },
        512 << 20,
    )
    .unwrap_or_else(|e| panic!("{fs_type} loop filesystem: {e}"));
    d.base.data_root = disk.join("data");
    let hits = d.base.dir().join("hits.log");
    let quiet = d.base.dir().join("hits-clean.log");
    assert!(
        d.start(None, &quiet),
        "lamina did not start:\n{}",
        d.base.log_tail()
    );
    let mut model = make_bases(&d, rng);
    // The bases must survive the cuts that come: they were acknowledged, like everything after them.
    lfs.cut_power().unwrap();
    d.kill9();
    lfs.remount().unwrap();
    assert!(d.start(None, &quiet), "first restart:\n{}", d.base.log_tail());
    let first = check(&d, &model);
    assert!(
        first.is_empty(),
        "{fs_type}: after a cut with only the bases: {first:#?}"
    );

    let plan = plan(rounds, randoms, rng);

    let mut t = Tally::default();
    for (i, (op, point)) in plan.iter().enumerate() {
        let case = new_case(rng, i, op, point.is_none() && *op == "apply");
        prepare(&d, &case, &mut model);
        d.stop();
        let _ = fs::remove_file(&hits);
        // At a point: lamina pauses there (long enough for the cut), and the cut comes once the point was hit.
        let armed = point.map(|p| format!("{p}=sleep(20000)"));
        if !d.start(armed.as_deref(), &hits) {
            // A point of the start-up itself; nothing to cut.
            d.gone();
            assert!(
                d.start(None, &quiet),
                "clean start failed:\n{}",
                d.base.log_tail()
            );
            continue;
        }
        let pid = d.pid();
        let (answer, cut) = thread::scope(|s| {
            let op_thread = s.spawn(|| run_op(&d, &case));
            let cut = match point {
                Some(p) => {
                    let reached = poll(Duration::from_secs(10), || {
                        fs::read_to_string(&hits)
                            .ok()
                            .filter(|h| h.lines().any(|l| l.contains(p)))
                            .map(|_| ())
                    });
                    reached.is_some()
                }
                None => {
                    thread::sleep(Duration::from_micros(rng.range(0, 80_000)));
                    true
                }
            };
            // Cut even when the point was not reached, so that the operation ends; lamina dies with the power.
            lfs.cut_power().unwrap();
            signal(pid, "KILL");
            (op_thread.join().unwrap(), cut)
        });
        d.kill9();
        if !cut {
            *t.not_reached
                .entry(format!("{op} @ {}", point.unwrap_or("-")))
                .or_default() += 1;
        }
        t.cuts += 1;
        lfs.remount()
            .unwrap_or_else(|e| panic!("{fs_type}: remount after a cut: {e}"));
        let label = format!("{fs_type}: {op} @ {}", point.unwrap_or("(random moment)"));
        if !d.start(None, &quiet) {
            t.failed_starts
                .push(format!("{label}: lamina did not start:\n{}", d.base.log_tail()));
            break;
        }
        if answer.is_ok() {
            t.acknowledged += 1;
            if let Err(e) = acknowledged(&d, &case) {
                t.inconsistencies.push(format!("{label}: {e}"));
            }
        }
        for v in check(&d, &model) {
            t.inconsistencies.push(format!("{label}: {v}"));
        }
        if let Err(e) = finish_op(&d, &case, &mut model) {
            t.inconsistencies.push(format!("{label}: retry failed: {e}"));
        }
        for v in check(&d, &model) {
            t.inconsistencies.push(format!("{label}, after its retry: {v}"));
        }
        if !t.inconsistencies.is_empty() {
            eprintln!("log tail:\n{}", d.base.log_tail());
            break;
        }
    }
    let panics = reliability::panics_in_log(&d.base.log);
    for p in panics {
        t.inconsistencies
            .push(format!("{fs_type}: panic in the log: {p}"));
    }
    d.stop();
    t
}

#[test]
fn power_cuts_at_points_and_random_moments() {
    let Some(_serial) = serial_if(
        require_root("power_cuts_at_points_and_random_moments")
            && require_bin("power_cuts_at_points_and_random_moments", "xfs_io")
            && require_bin("power_cuts_at_points_and_random_moments", "mkfs.xfs"),
    ) else {
        return;
    };
    let rounds = reliability::count("LAMINA_RELIABILITY_POWERCUT_ROUNDS", 1, 15);
    let randoms = reliability::count("LAMINA_RELIABILITY_RANDOM_CUTS", 10, 150);
    let mut rng = Rng::new(reliability::base_seed() ^ 0x9c07);
    let t0 = Instant::now();
    let mut all = Vec::new();
    for fs_type in ["ext4", "xfs"] {
        let started = Instant::now();
        let t = run_on(fs_type, rounds, randoms, &mut rng);
        eprintln!(
            "{fs_type}: {} cuts ({} after an acknowledged answer), {} failures to start, {} inconsistencies, \
             points not reached {:?}, {:.1} s",
            t.cuts,
            t.acknowledged,
            t.failed_starts.len(),
            t.inconsistencies.len(),
            t.not_reached,
            started.elapsed().as_secs_f64()
        );
        all.push((fs_type, t));
    }
    eprintln!("power cuts: total time {:.1} s", t0.elapsed().as_secs_f64());
    for (fs_type, t) in &all {
        assert!(t.failed_starts.is_empty(), "{fs_type}: {:#?}", t.failed_starts);
        assert!(
            t.inconsistencies.is_empty(),
            "{fs_type}: {:#?}",
            t.inconsistencies
        );
        assert!(
            t.not_reached.is_empty(),
            "{fs_type}: points never hit: {:?}",
            t.not_reached
        );
    }
}
