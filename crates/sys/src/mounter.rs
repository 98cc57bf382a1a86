//! The mount seam: [`Mounter`] is what the store mounts and unmounts through, and where it reads the mount
//! table. [`LinuxMounter`] makes the real syscalls; [`FakeMounter`] records the calls and keeps an in-memory
//! mount table, so that code above it (reference counting, crash recovery, garbage collection) is tested
//! without root.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::mount::{self, MountSpec};

/// Mounts, unmounts and the mount table.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Mounts `spec` on `target`.
    fn mount(&self, spec: &MountSpec, target: &Path) -> io::Result<()>;

    /// Unmounts `target`; with `detach` lazily (`MNT_DETACH`). A target that is not a mount point is not an
    /// error.
    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()>;

    /// Detaches `target` (lazily, as [`Mounter::unmount`] with `detach`) but leaves its teardown to the drop of
    /// the returned [`Held`]: for an overlay, the sync of its upper filesystem that the kernel runs when the
    /// last reference to the mount goes. None when nothing is left to tear down.
    fn detach_held(&self, target: &Path) -> io::Result<Option<Held>> {
        self.unmount(target, true).map(|()| None)
    }

    /// The mount table in the format of `/proc/self/mountinfo`.
    fn mount_table(&self) -> io::Result<String>;

    /// Mount points at or below `dir`, deepest first.
    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(mount::mount_points_in(&self.mount_table()?, dir))
    }

    /// Whether `path` is a mount point.
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        Ok(self.mounts_under(path)?.iter().any(|p| p == path))
    }
}

/// A detached mount whose teardown runs when this is dropped ([`Mounter::detach_held`]).
pub type Held = Box<dyn Send + Sync>;

/// The kernel's mounts.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxMounter;

impl Mounter for LinuxMounter {
    fn mount(&self, spec: &MountSpec, target: &Path) -> io::Result<()> {
        mount::mount(spec, target)
    }

    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()> {
        mount::unmount(target, detach)
    }

    fn detach_held(&self, target: &Path) -> io::Result<Option<Held>> {
        Ok(mount::detach_held(target)?.map(|fd| Box::new(fd) as Held))
    }

    fn mount_table(&self) -> io::Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
    }

    /// One `statx` of `path` (whether it is the root of a mount); the mount table where the kernel does not
    /// tell.
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        match mount::is_mount_root(path)? {
            Some(root) => Ok(root),
            None => Ok(self.mounts_under(path)?.iter().any(|p| p == path)),
        }
    }
}

/// One call a [`FakeMounter`] received.
#[derive(Debug, Clone)]
pub enum MountCall {
    /// [`Mounter::mount`].
    Mount {
        /// The target.
        target: PathBuf,
        /// What was mounted.
        spec: MountSpec,
    },
    /// [`Mounter::unmount`] of a target that was mounted.
    Unmount {
        /// The target.
        target: PathBuf,
        /// Lazily.
        detach: bool,
    },
    /// The drop of what [`Mounter::detach_held`] returned: the detached mount's teardown.
    TornDown {
        /// The target it was mounted on.
        target: PathBuf,
    },
}

#[derive(Debug, Default)]
struct FakeState {
    /// Mounts by target, stacked (the last one on top), as the kernel stacks them.
    table: BTreeMap<PathBuf, Vec<MountSpec>>,
    calls: Vec<MountCall>,
    fail_mounts: bool,
    /// Teardowns of mounts detached with [`Mounter::detach_held`] wait while this is set.
    hold_teardowns: bool,
}

/// A mounter that mounts nothing: it records every call and keeps a mount table in memory. Mount targets need
/// not exist.
#[derive(Debug, Default)]
pub struct FakeMounter {
    state: Arc<Mutex<FakeState>>,
    released: Arc<Condvar>,
}

/// A mount the fake detached with [`Mounter::detach_held`]; its drop is the teardown.
struct FakeHeld {
    state: Arc<Mutex<FakeState>>,
    released: Arc<Condvar>,
    target: PathBuf,
}

impl Drop for FakeHeld {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        while st.hold_teardowns {
            st = self.released.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.calls.push(MountCall::TornDown {
            target: self.target.clone(),
        });
    }
}

fn lock(state: &Mutex<FakeState>) -> std::sync::MutexGuard<'_, FakeState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeMounter {
    /// An empty mount table.
    pub fn new() -> FakeMounter {
        FakeMounter::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    /// The calls so far, in order (unmounts of targets that were not mounted are not recorded).
    pub fn calls(&self) -> Vec<MountCall> {
        self.state().calls.clone()
    }

    /// Number of mount calls that succeeded so far.
    pub fn mount_count(&self) -> usize {
        self.count(|c| matches!(c, MountCall::Mount { .. }))
    }

    /// Number of effective unmounts so far.
    pub fn unmount_count(&self) -> usize {
        self.count(|c| matches!(c, MountCall::Unmount { .. }))
    }

    fn count(&self, which: impl Fn(&MountCall) -> bool) -> usize {
        self.state().calls.iter().filter(|c| which(c)).count()
    }

    /// Targets mounted now, in path order.
    pub fn mounted(&self) -> Vec<PathBuf> {
        self.state().table.keys().cloned().collect()
    }

    /// Whether `target` is mounted now.
    pub fn is_mounted(&self, target: &Path) -> bool {
        self.state().table.contains_key(target)
    }

    /// What is mounted on top at `target`.
    pub fn spec_at(&self, target: &Path) -> Option<MountSpec> {
        self.state().table.get(target).and_then(|v| v.last().cloned())
    }

    /// Puts a mount into the table without recording a call (a mount left by an earlier process).
    pub fn preset(&self, target: &Path, spec: MountSpec) {
        self.state()
            .table
            .entry(target.to_path_buf())
            .or_default()
            .push(spec);
    }

    /// Makes every later mount fail with `EIO` (or succeed again).
    pub fn fail_mounts(&self, fail: bool) {
        self.state().fail_mounts = fail;
    }

    /// Makes the teardowns of mounts detached with [`Mounter::detach_held`] wait (`true`) until called again
    /// with `false`.
    pub fn hold_teardowns(&self, hold: bool) {
        self.state().hold_teardowns = hold;
        self.released.notify_all();
    }
}

fn escape(p: &Path) -> String {
    let mut out = String::new();
    for c in p.to_string_lossy().chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl Mounter for FakeMounter {
    fn mount(&self, spec: &MountSpec, target: &Path) -> io::Result<()> {
        let mut st = self.state();
        if st.fail_mounts {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        st.table
            .entry(target.to_path_buf())
            .or_default()
            .push(spec.clone());
        st.calls.push(MountCall::Mount {
            target: target.to_path_buf(),
            spec: spec.clone(),
        });
        Ok(())
    }

    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()> {
        let mut st = self.state();
        let Some(stack) = st.table.get_mut(target) else {
            return Ok(());
        };
        stack.pop();
        if stack.is_empty() {
            st.table.remove(target);
        }
        st.calls.push(MountCall::Unmount {
            target: target.to_path_buf(),
            detach,
        });
        Ok(())
    }

    fn detach_held(&self, target: &Path) -> io::Result<Option<Held>> {
        if !self.is_mounted(target) {
            return Ok(None);
        }
        self.unmount(target, true)?;
        Ok(Some(Box::new(FakeHeld {
            state: self.state.clone(),
            released: self.released.clone(),
            target: target.to_path_buf(),
        })))
    }

    fn mount_table(&self) -> io::Result<String> {
        let st = self.state();
        let mut out = String::new();
        let mut id = 100;
        for (target, stack) in &st.table {
            for spec in stack {
                id += 1;
                let source = escape(&spec.source());
                out.push_str(&format!(
                    "{id} 1 0:{id} / {} rw,relatime - {} {source} rw,{}\n",
                    escape(target),
                    spec.kind(),
                    spec.options().join(",")
                ));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::OverlaySpec;

    #[test]
    fn fake_keeps_a_table() {
        let m = FakeMounter::new();
        let spec = MountSpec::Overlay(OverlaySpec {
            lowers: vec!["/r/layers/1/diff".into()],
            upper: Some("/r/layers/2/diff".into()),
            work: Some("/r/layers/2/work".into()),
            ..OverlaySpec::default()
        });
        m.mount(&spec, Path::new("/r/layers/2/merged")).unwrap();
        m.preset(
            Path::new("/r/with space"),
            MountSpec::Bind {
                source: "/x".into(),
                read_only: true,
            },
        );
        assert_eq!(
            m.mounts_under(Path::new("/r")).unwrap(),
            vec![
                PathBuf::from("/r/layers/2/merged"),
                PathBuf::from("/r/with space")
            ]
        );
        assert!(m.mount_table().unwrap().contains("upperdir=/r/layers/2/diff"));
        assert!(m.is_mount_point(Path::new("/r/layers/2/merged")).unwrap());
        m.unmount(Path::new("/r/layers/2/merged"), true).unwrap();
        m.unmount(Path::new("/r/not-mounted"), false).unwrap();
        assert!(!m.is_mounted(Path::new("/r/layers/2/merged")));
        assert_eq!((m.mount_count(), m.unmount_count()), (1, 1));
        m.fail_mounts(true);
        assert!(m.mount(&spec, Path::new("/r/y")).is_err());
    }
}
