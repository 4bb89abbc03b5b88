"""A typed asyncio client for the admin API. Thin on purpose: it returns the generated
protobuf messages, so everything the API offers is reachable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import struct_pb2

from engine.pb import (
    backup_pb2,
    backup_pb2_grpc,
    config_pb2,
    config_pb2_grpc,
    connections_pb2,
    connections_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    logs_pb2,
    logs_pb2_grpc,
    mappings_pb2,
    mappings_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)
from engine.state.tokens import ADMIN_TOKEN_FILE


def read_token(data_dir: Path) -> str:
    """The admin token the engine's first start wrote to ``<data-dir>/admin-token``;
    "" when there is none."""
    try:
        return (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", f"Bearer {token}")
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _BearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every unary call on the channel, stubs
    made from ``client.channel`` included. (grpc.aio files an interceptor under one kind
    of call only, so each kind has a class of its own.)"""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _BearerStream(grpc.aio.UnaryStreamClientInterceptor):
    """The same for server-streaming calls (StreamLogs)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_token(details, self._token), request)


class TidegateClient:
    """``token``: the admin API token sent with every call (``authorization: Bearer``).
    ``root_certificates``: PEM of the CA that signed the engine's TLS certificate; with
    it the channel uses TLS, and ``client_cert``/``client_key`` (PEM) present a client
    certificate when the engine requires one."""

    def __init__(
        self,
        target: str,
        token: str = "",
        *,
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
    ) -> None:
        interceptors: list[grpc.aio.ClientInterceptor] = (
            [_BearerUnary(token), _BearerStream(token)] if token else []
        )
        if root_certificates is None:
            self.channel = grpc.aio.insecure_channel(target, interceptors=interceptors)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=client_key,
                certificate_chain=client_cert,
            )
            self.channel = grpc.aio.secure_channel(target, credentials, interceptors=interceptors)
        self.connections = connections_pb2_grpc.ConnectionServiceStub(self.channel)
        self.mappings = mappings_pb2_grpc.MappingServiceStub(self.channel)
        self.logs = logs_pb2_grpc.LogServiceStub(self.channel)
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self.channel)
        self.backups = backup_pb2_grpc.BackupServiceStub(self.channel)
        self.config = config_pb2_grpc.ConfigServiceStub(self.channel)
        self.privacy = privacy_pb2_grpc.PrivacyServiceStub(self.channel)

    async def __aenter__(self) -> TidegateClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.channel.close()

    async def create_connection(
        self,
        connection_id: str,
        *,
        api_key: str,
        settings: Mapping[str, str],
        connector: str = "insider",
        display_name: str = "",
        source_attribute: str = "customer_id",
        target_identifier: str = "uuid",
        custom_identifier: bool = False,
    ) -> connections_pb2.Connection:
        response = await self.connections.CreateConnection(
            connections_pb2.CreateConnectionRequest(
                connection=connections_pb2.Connection(
                    id=connection_id,
                    display_name=display_name,
                    connector=connector,
                    settings=dict(settings),
                    api_key=api_key,
                    customer_id_mapping=connections_pb2.CustomerIdMapping(
                        source_attribute=source_attribute,
                        target_identifier=target_identifier,
                        custom=custom_identifier,
                    ),
                )
            )
        )
        return response.connection

    async def get_connection(self, connection_id: str) -> connections_pb2.Connection:
        response = await self.connections.GetConnection(
            connections_pb2.GetConnectionRequest(id=connection_id)
        )
        return response.connection

    async def list_connections(
        self, page_size: int = 0, page_token: str = ""
    ) -> connections_pb2.ListConnectionsResponse:
        """One page of connections; pass its ``next_page_token`` back for the next."""
        return await self.connections.ListConnections(
            connections_pb2.ListConnectionsRequest(page_size=page_size, page_token=page_token)
        )

    async def create_profile_mapping(
        self, connection_id: str, source: str, target: str, *, custom: bool = False
    ) -> mappings_pb2.ProfileMapping:
        response = await self.mappings.CreateProfileMapping(
            mappings_pb2.CreateProfileMappingRequest(
                mapping=mappings_pb2.ProfileMapping(
                    connection_id=connection_id,
                    source_attribute=source,
                    target_attribute=target,
                    custom=custom,
                )
            )
        )
        return response.mapping

    async def create_event_mapping(
        self,
        connection_id: str,
        source: str,
        target: str,
        parameters: Sequence[tuple[str, str, bool]] = (),
    ) -> mappings_pb2.EventMapping:
        """``parameters``: (antavo parameter, destination parameter, custom) triples."""
        response = await self.mappings.CreateEventMapping(
            mappings_pb2.CreateEventMappingRequest(
                mapping=mappings_pb2.EventMapping(
                    connection_id=connection_id,
                    source_event=source,
                    target_event=target,
                    parameters=[
                        mappings_pb2.ParameterMapping(
                            source_parameter=s, target_parameter=t, custom=c
                        )
                        for s, t, c in parameters
                    ],
                )
            )
        )
        return response.mapping

    async def list_profile_mappings(
        self, connection_id: str, page_size: int = 0, page_token: str = ""
    ) -> mappings_pb2.ListProfileMappingsResponse:
        """One page of a connection's profile mappings."""
        return await self.mappings.ListProfileMappings(
            mappings_pb2.ListProfileMappingsRequest(
                connection_id=connection_id, page_size=page_size, page_token=page_token
            )
        )

    async def list_event_mappings(
        self, connection_id: str, page_size: int = 0, page_token: str = ""
    ) -> mappings_pb2.ListEventMappingsResponse:
        """One page of a connection's event mappings."""
        return await self.mappings.ListEventMappings(
            mappings_pb2.ListEventMappingsRequest(
                connection_id=connection_id, page_size=page_size, page_token=page_token
            )
        )

    async def export_config(self) -> str:
        """The whole configuration as one YAML document (without API keys)."""
        response = await self.config.ExportConfig(config_pb2.ExportConfigRequest())
        return response.document

    async def apply_config(
        self,
        document: str,
        *,
        api_keys: Mapping[str, str] | None = None,
        dry_run: bool = False,
        prune: bool = False,
    ) -> config_pb2.ApplyConfigResponse:
        """Applies a YAML document, all of it or nothing; ``api_keys`` holds the values of
        the environment variables it names (by name). ``dry_run`` changes nothing;
        ``prune`` deletes what the document does not mention."""
        return await self.config.ApplyConfig(
            config_pb2.ApplyConfigRequest(
                document=document, dry_run=dry_run, prune=prune, api_keys=dict(api_keys or {})
            )
        )

    async def send_events(
        self, events: Sequence[Mapping[str, Any]]
    ) -> ingest_pb2.IngestEventsResponse:
        messages = []
        for e in events:
            data = struct_pb2.Struct()
            data.update(dict(e.get("data", {})))
            messages.append(
                ingest_pb2.AntavoEvent(
                    customer=e["customer"],
                    action=e["action"],
                    data=data,
                    external_id=e.get("external_id", ""),
                    account=e.get("account", ""),
                    id=e.get("id", ""),
                )
            )
        return await self.ingest.IngestEvents(ingest_pb2.IngestEventsRequest(events=messages))

    async def list_logs(
        self, page_size: int = 0, page_token: str = "", **filters: Any
    ) -> logs_pb2.ListLogsResponse:
        """One page of the outbound log, newest first; ``filters`` are ``LogFilter``
        fields. ``page_size`` 0 is the server's default (50), at most 1000."""
        return await self.logs.ListLogs(
            logs_pb2.ListLogsRequest(
                filter=logs_pb2.LogFilter(**filters), page_size=page_size, page_token=page_token
            )
        )

    async def get_log(self, log_id: str) -> logs_pb2.LogEntry:
        return (await self.logs.GetLog(logs_pb2.GetLogRequest(id=log_id))).log

    async def stream_logs(self, **filters: Any) -> AsyncIterator[logs_pb2.LogEntry]:
        """Yields new log entries as they are written, until the caller stops iterating."""
        call = self.logs.StreamLogs(
            logs_pb2.StreamLogsRequest(filter=logs_pb2.LogFilter(**filters))
        )
        try:
            async for response in call:
                for entry in response.logs:
                    yield entry
        finally:
            call.cancel()

    async def create_backup(self, destination: str) -> backup_pb2.CreateBackupResponse:
        """A consistent copy of the engine's data folder at ``destination`` (an absolute
        path on the engine's machine)."""
        return await self.backups.CreateBackup(
            backup_pb2.CreateBackupRequest(destination=destination)
        )

    async def erase_customer(
        self, customer_id: str, at_destinations: bool = False
    ) -> privacy_pb2.EraseCustomerResponse:
        """Forgets one Antavo customer everywhere the engine keeps them (and, with
        ``at_destinations``, at the destinations whose connectors can delete); returns
        what went."""
        return await self.privacy.EraseCustomer(
            privacy_pb2.EraseCustomerRequest(
                customer_id=customer_id, at_destinations=at_destinations
            )
        )
