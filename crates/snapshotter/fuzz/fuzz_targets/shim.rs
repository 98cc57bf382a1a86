// The snapshotter's pure modules, compiled without the gRPC crate around them (its mapping to gRPC statuses is in
// `src/status.rs`, which is not compiled here).

#[path = "../../src/error.rs"]
#[allow(dead_code)]
pub mod error;

#[path = "../../src/filter.rs"]
#[allow(dead_code)]
pub mod filter;

#[path = "../../src/model.rs"]
#[allow(dead_code)]
pub mod model;
