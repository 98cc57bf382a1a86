//! The one mapping of the service's errors to gRPC statuses.

use crate::error::{Code, SnapshotError};

impl From<SnapshotError> for tonic::Status {
    fn from(e: SnapshotError) -> Self {
        let code = match e.code {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.message)
    }
}
