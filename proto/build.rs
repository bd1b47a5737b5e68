//! Compile the protos without a system `protoc`: protox (a pure-Rust protobuf compiler)
//! produces the FileDescriptorSet, tonic-prost-build generates the code from it.
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "tollgate/node/v1/node_admin.proto",
    "tollgate/raft/v1/raft.proto",
    "tollgate/state/v1/state.proto",
    "tollgate/cp/v1/control_plane.proto",
    "tollgate/actor/v1/actor.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // protox does not emit rerun-if-changed lines itself.
    println!("cargo:rerun-if-changed=proto");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;

    // The encoded descriptor set is what gRPC server reflection serves.
    fs::write(
        out_dir.join("tollgate_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps where usage and prices are summed and re-encoded: the same bytes on
        // every node.
        .btree_map(".tollgate.state.v1.UsageCounts")
        .btree_map(".tollgate.state.v1.LatencyEntry")
        .btree_map(".tollgate.state.v1.PlanPrices")
        .btree_map(".tollgate.state.v1.MetricEvidence")
        .btree_map(".tollgate.actor.v1.VersionCounts")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
