//! Directory-fd based file operations (work in progress).
