//! Lock files (work in progress).
