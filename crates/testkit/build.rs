//! Generates the client of the few CRI calls the tests make (`proto/cri.proto`; needs `protoc`: Debian's
//! `protobuf-compiler`, or set `PROTOC`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(&["proto/cri.proto"], &["proto"])?;
    Ok(())
}
