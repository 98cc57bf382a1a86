//! The heartbeat thread.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tracing::{info, warn};

use crate::Lease;

/// How long [`Heartbeat::stop`] waits for a beat in progress.
pub const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A running heartbeat: beats every interval until stopped or dropped.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub(crate) fn start(lease: Lease) -> Heartbeat {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lamina-heartbeat".into())
            .spawn(move || {
                let interval = lease.config().heartbeat;
                let mut failing = false;
                loop {
                    match lease.beat() {
                        Ok(()) if failing => {
                            info!(host = %lease.host(), "heartbeat reaches the lease directory again");
                            failing = false;
                        }
                        Ok(()) => {}
                        Err(e) => {
                            if !failing || !lease.is_fresh() {
                                warn!(host = %lease.host(), error = %e, fresh = lease.is_fresh(), "heartbeat failed");
                            }
                            failing = true;
                        }
                    }
                    let (m, cv) = &*s;
                    let stopped = m.lock().unwrap_or_else(|e| e.into_inner());
                    let (stopped, _) = cv
                        .wait_timeout_while(stopped, interval, |stop| !*stop)
                        .unwrap_or_else(|e| e.into_inner());
                    if *stopped {
                        return;
                    }
                }
            })
            .ok();
        if thread.is_none() {
            warn!("cannot start the heartbeat thread");
        }
        Heartbeat { stop, thread }
    }

    /// Stops the thread and waits for it, at most [`STOP_WAIT`]: a beat blocked on an unreachable
    /// filesystem (a FUSE call on a mount whose server is gone can block for minutes) is left to finish on
    /// its own and beats no more. The last heartbeat stays: the host counts as alive until the lease runs out.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + STOP_WAIT;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!("the heartbeat thread is blocked on the lease directory; leaving it behind");
            }
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
