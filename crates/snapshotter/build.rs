//! Generates the gRPC server and client from the protos in `proto/` (needs `protoc`: Debian's
//! `protobuf-compiler`, or set `PROTOC`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/snapshots.proto", "proto/mount.proto"], &["proto"])?;
    Ok(())
}
