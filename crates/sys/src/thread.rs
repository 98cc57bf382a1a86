//! Scheduling of the calling thread.

use std::io;

/// The nice value of background work that must never delay a request: the lowest priority there is.
pub const BACKGROUND_NICE: i32 = 19;

/// Gives the calling thread (only it, not the process) the nice value [`BACKGROUND_NICE`]: it then runs
/// beside request threads without taking the CPU from them when they wake.
pub fn lower_priority() -> io::Result<()> {
    let tid = rustix::thread::gettid();
    rustix::process::setpriority_process(Some(tid), BACKGROUND_NICE).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let main = rustix::process::getpriority_process(None).unwrap();
        let child = std::thread::spawn(|| {
            lower_priority().unwrap();
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(child, BACKGROUND_NICE);
        assert_eq!(
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap(),
            main
        );
    }
}
