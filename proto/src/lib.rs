//! Tollgate's protobuf messages and gRPC services.
//!
//! Generated code only (plus the encoded descriptor set for server reflection); consumers
//! convert to their own domain types. Protos are compiled by protox in `build.rs`, so no
//! system `protoc` is needed.

pub mod node {
    pub mod v1 {
        tonic::include_proto!("tollgate.node.v1");
    }
}

pub mod raft {
    pub mod v1 {
        tonic::include_proto!("tollgate.raft.v1");
    }
}

pub mod cp {
    pub mod v1 {
        tonic::include_proto!("tollgate.cp.v1");
    }
}

pub mod actor {
    pub mod v1 {
        tonic::include_proto!("tollgate.actor.v1");
    }
}

pub mod state {
    pub mod v1 {
        tonic::include_proto!("tollgate.state.v1");
    }
}

/// The encoded `FileDescriptorSet` of every proto in this crate, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));
