//! Node administration: the HTTP health/metrics endpoints ([`http`]) and the node admin
//! gRPC service ([`grpc`]).

pub mod grpc;
pub mod http;
