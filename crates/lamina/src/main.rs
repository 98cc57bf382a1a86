//! lamina binary (work in progress).
#![forbid(unsafe_code)]

fn main() {}
