//! Compiles the gRPC API (`proto/fencelog.proto`) with tonic; needs `protoc`, as etcd-client does.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::compile_protos("proto/fencelog.proto")?;
    Ok(())
}
