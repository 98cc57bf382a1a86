// The snapshotter's pure modules, compiled without the gRPC crate around them. `error` stands in for
// `src/error.rs` (whose only other item converts to `tonic::Status`); `filter` and `model` are the real files.

pub mod error {
    /// Same classes as the crate's `Code`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[allow(dead_code)]
    pub enum Code {
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unimplemented,
        ResourceExhausted,
        Unavailable,
        Internal,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SnapshotError {
        pub code: Code,
        pub message: String,
    }

    impl std::fmt::Display for SnapshotError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.message)
        }
    }

    #[allow(dead_code)]
    impl SnapshotError {
        pub fn new(code: Code, message: impl Into<String>) -> Self {
            SnapshotError { code, message: message.into() }
        }
        pub fn invalid(message: impl Into<String>) -> Self {
            Self::new(Code::InvalidArgument, message)
        }
        pub fn not_found(message: impl Into<String>) -> Self {
            Self::new(Code::NotFound, message)
        }
    }

    pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
}

#[path = "../../src/filter.rs"]
#[allow(dead_code)]
pub mod filter;

#[path = "../../src/model.rs"]
#[allow(dead_code)]
pub mod model;
