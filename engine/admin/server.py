"""The gRPC server: admin services plus health and reflection, so ``grpcurl`` needs no
proto files."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.admin.audit import AuditServicer
from engine.admin.auth import AuthInterceptor, TokenChecker
from engine.admin.backup import BackupServicer
from engine.admin.catalog import CatalogServicer
from engine.admin.config import ConfigServicer
from engine.admin.connections import ConnectionServicer
from engine.admin.dead_letters import DeadLetterServicer
from engine.admin.errors import DecodeGuard
from engine.admin.ingest import IngestServicer
from engine.admin.logs import LogServicer
from engine.admin.mappings import MappingServicer
from engine.admin.privacy import PrivacyServicer
from engine.admin.tokens import TokenServicer
from engine.delivery.erasure import CustomerEraser
from engine.ingest.auth import IngestVerifier
from engine.ingest.ingestor import Ingestor
from engine.ingest.settings import IngestSettings
from engine.metrics import IngestMetrics
from engine.outbound_log.store import LogStore
from engine.pb import (
    audit_pb2,
    audit_pb2_grpc,
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
    tokens_pb2,
    tokens_pb2_grpc,
)
from engine.plugins import Connectors
from engine.queue.lanes import DurableQueue
from engine.security import TlsFiles
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database

SERVICE_NAMES = (
    connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"].full_name,
    mappings_pb2.DESCRIPTOR.services_by_name["MappingService"].full_name,
    logs_pb2.DESCRIPTOR.services_by_name["LogService"].full_name,
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    dead_letters_pb2.DESCRIPTOR.services_by_name["DeadLetterService"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    config_pb2.DESCRIPTOR.services_by_name["ConfigService"].full_name,
    backup_pb2.DESCRIPTOR.services_by_name["BackupService"].full_name,
    tokens_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"].full_name,
)


async def start_grpc_server(
    host: str,
    port: int,
    registry: ConnectionRegistry,
    queue: DurableQueue,
    logs: LogStore,
    ingestor: Ingestor,
    connections: ConnectionServicer,
    dead_letters: DeadLetterServicer,
    connectors: Connectors,
    data_dir: Path,
    db: Database,
    eraser: CustomerEraser,
    ingest_metrics: IngestMetrics | None = None,
    tls: TlsFiles | None = None,
    ingest: IngestSettings | None = None,
    log_elsewhere: str | None = None,
) -> tuple[grpc.aio.Server, int, TokenChecker]:
    """Starts the server; returns it, the bound port (useful with port 0) and its token
    checker (close it after the server stops). ``IngestEvents`` counts its requests in
    ``ingest_metrics``. Every call but health and reflection needs a token of ``db``
    (``engine.admin.auth``). ``ingest``: the ingest settings; ``IngestEvents`` also admits
    their credential, when one is configured, and applies their limits. With
    ``tls`` the port speaks TLS only (mutual TLS when it names a client CA).
    ``log_elsewhere``: this process keeps no outbound log (a broker role without it);
    ``LogService`` refuses every call with this text."""
    credentials = None
    if tls is not None:
        cert, key, client_ca = tls.read()
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
    ingest = ingest or IngestSettings()
    # The ingest credential (what Antavo sends) also admits IngestEvents, as over HTTP.
    # Without one configured, IngestEvents needs an operator token.
    ingest_credential = IngestVerifier(ingest.auth).check if ingest.configured else None
    checker = TokenChecker(db)
    # Authentication first, so an anonymous request is never decoded; then requests
    # protobuf cannot decode reach the RPC as INVALID_ARGUMENT, not UNKNOWN.
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(checker, db, ingest_credential), DecodeGuard()]
    )
    tokens_pb2_grpc.add_TokenServiceServicer_to_server(TokenServicer(db, checker.forget), server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(db), server)
    backup_pb2_grpc.add_BackupServiceServicer_to_server(BackupServicer(data_dir, logs), server)
    connections_pb2_grpc.add_ConnectionServiceServicer_to_server(connections, server)
    mappings_pb2_grpc.add_MappingServiceServicer_to_server(MappingServicer(registry), server)
    privacy_pb2_grpc.add_PrivacyServiceServicer_to_server(PrivacyServicer(eraser), server)
    logs_pb2_grpc.add_LogServiceServicer_to_server(
        LogServicer(logs, lambda token: checker.check(token) is not None, log_elsewhere),
        server,
    )
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(
        IngestServicer(ingestor, ingest_metrics, ingest.limits), server
    )
    dead_letters_pb2_grpc.add_DeadLetterServiceServicer_to_server(dead_letters, server)
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
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        await checker.close()
        raise OSError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    return server, bound, checker
