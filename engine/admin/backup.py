"""BackupService: a consistent copy of the data folder, taken while the engine serves."""

from __future__ import annotations

from pathlib import Path

from engine.admin.errors import Context, rpc
from engine.backup import back_up_running
from engine.errors import InvalidInputError, TidegateError, shown
from engine.outbound_log.store import LogStore
from engine.pb import backup_pb2 as pb
from engine.pb import backup_pb2_grpc


class BackupServicer(backup_pb2_grpc.BackupServiceServicer):
    def __init__(self, data_dir: Path, logs: LogStore) -> None:
        self._data_dir = data_dir
        self._logs = logs

    @rpc
    async def CreateBackup(
        self, request: pb.CreateBackupRequest, context: Context
    ) -> pb.CreateBackupResponse:
        if not request.destination:
            raise InvalidInputError("destination", "required: an absolute path")
        if "\0" in request.destination:
            raise InvalidInputError("destination", "must not contain a NUL character")
        try:
            result = await back_up_running(self._data_dir, self._logs, Path(request.destination))
        except OSError as exc:  # a name too long, no permission, a full disk
            raise TidegateError(
                f"cannot write the backup to {shown(request.destination)}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        return pb.CreateBackupResponse(
            destination=str(result.destination),
            state_bytes=result.state_bytes,
            log_partitions=result.log_partitions,
            log_bytes=result.log_bytes,
            secret_key_copied=result.secret_key_copied,
            seconds=result.seconds,
        )
