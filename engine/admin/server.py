"""The gRPC server: admin services plus health and reflection, so ``grpcurl`` needs no
proto files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.admin.backup import BackupServicer
from engine.admin.catalog import CatalogServicer
from engine.admin.config import ConfigServicer
from engine.admin.connections import ConnectionServicer
from engine.admin.dead_letters import DeadLetterServicer
from engine.admin.ingest import IngestServicer
from engine.admin.logs import LogServicer
from engine.admin.mappings import MappingServicer
from engine.admin.privacy import PrivacyServicer
from engine.delivery.erasure import CustomerEraser
from engine.ingest.ingestor import Ingestor
from engine.metrics import IngestMetrics
from engine.outbound_log.store import LogStore
from engine.pb import (
    backup_pb2,
    backup_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    config_pb2,
    config_pb2_grpc,
    connections_pb2,
    connections_pb2_grpc,
    dead_letters_pb2,
    dead_letters_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    logs_pb2,
    logs_pb2_grpc,
    mappings_pb2,
    mappings_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)
from engine.plugins import Connectors
from engine.queue.lanes import DurableQueue
from engine.state.connections import ConnectionRegistry

SERVICE_NAMES = (
    connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"].full_name,
    mappings_pb2.DESCRIPTOR.services_by_name["MappingService"].full_name,
    logs_pb2.DESCRIPTOR.services_by_name["LogService"].full_name,
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    dead_letters_pb2.DESCRIPTOR.services_by_name["DeadLetterService"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    config_pb2.DESCRIPTOR.services_by_name["ConfigService"].full_name,
    backup_pb2.DESCRIPTOR.services_by_name["BackupService"].full_name,
    privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"].full_name,
)


async def start_grpc_server(
    host: str,
    port: int,
    registry: ConnectionRegistry,
    queue: DurableQueue,
    logs: LogStore,
    ingestor: Ingestor,
    on_replayed: Callable[[set[str]], None],
    connectors: Connectors,
    data_dir: Path,
    eraser: CustomerEraser,
    ingest_metrics: IngestMetrics | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Starts the server; returns it and the bound port (useful with port 0).
    ``IngestEvents`` counts its requests in ``ingest_metrics``."""
    server = grpc.aio.server()
    backup_pb2_grpc.add_BackupServiceServicer_to_server(BackupServicer(data_dir, logs), server)
    connections_pb2_grpc.add_ConnectionServiceServicer_to_server(
        ConnectionServicer(registry, queue), server
    )
    mappings_pb2_grpc.add_MappingServiceServicer_to_server(MappingServicer(registry), server)
    privacy_pb2_grpc.add_PrivacyServiceServicer_to_server(PrivacyServicer(eraser), server)
    logs_pb2_grpc.add_LogServiceServicer_to_server(LogServicer(logs), server)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(
        IngestServicer(ingestor, ingest_metrics), server
    )
    dead_letters_pb2_grpc.add_DeadLetterServiceServicer_to_server(
        DeadLetterServicer(queue, on_replayed), server
    )
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(
        CatalogServicer(registry, connectors, ingestor), server
    )
    config_pb2_grpc.add_ConfigServiceServicer_to_server(
        ConfigServicer(registry, connectors, queue), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    return server, bound
