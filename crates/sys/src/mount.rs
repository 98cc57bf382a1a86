//! Mounts (work in progress).
