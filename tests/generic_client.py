"""A generic gRPC client (Python grpcio, from PyPI) against a Tollgate gRPC address:
lists the services through server reflection and checks grpc.health.v1. With a second
argument (the cluster CA's PEM file) it connects over TLS.
Prints one JSON line: {"services": [...], "health": "SERVING"}."""
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

if len(sys.argv) > 2:
    # A secure cluster: verify the server with the cluster's CA, as any TLS client does.
    with open(sys.argv[2], "rb") as f:
        channel = grpc.secure_channel(sys.argv[1], grpc.ssl_channel_credentials(root_certificates=f.read()))
else:
    channel = grpc.insecure_channel(sys.argv[1])
services = sorted(ProtoReflectionDescriptorDatabase(channel).get_services())
health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
print(json.dumps({
    "services": services,
    "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
}))
