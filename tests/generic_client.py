"""A generic gRPC client (Python grpcio, from PyPI) against a Tollgate gRPC address:
lists the services through server reflection and checks grpc.health.v1.
Prints one JSON line: {"services": [...], "health": "SERVING"}."""
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

channel = grpc.insecure_channel(sys.argv[1])
services = sorted(ProtoReflectionDescriptorDatabase(channel).get_services())
health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
print(json.dumps({
    "services": services,
    "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
}))
