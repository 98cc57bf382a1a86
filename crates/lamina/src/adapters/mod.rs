//! The only code that knows both a protocol and the store.

pub mod graphdriver;
pub mod snapshotter;
pub mod volumedriver;
