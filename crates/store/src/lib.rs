//! lamina layer store (work in progress).
#![forbid(unsafe_code)]
