"""TokenService: make, list and revoke admin API tokens (``engine.state.tokens``)."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from engine.admin.errors import Context, rpc
from engine.admin.paging import Pager, offset_page, page_size
from engine.errors import InvalidInputError
from engine.pb import tokens_pb2 as pb
from engine.pb import tokens_pb2_grpc
from engine.state import tokens
from engine.state.database import Database
from engine.state.tokens import Role, TokenInfo

PAGES = Pager[tuple[int]]("ListTokens", (int,))
"""ListTokens tokens: an offset (tokens are only added at the end; revoking keeps them)."""
ROLES = {
    pb.TOKEN_ROLE_VIEWER: Role.VIEWER,
    pb.TOKEN_ROLE_OPERATOR: Role.OPERATOR,
    pb.TOKEN_ROLE_ADMIN: Role.ADMIN,
}
ROLE_PB = {role: value for value, role in ROLES.items()}
MAX_EXPIRES_IN = 100 * 365 * 86400


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def token_pb(info: TokenInfo) -> pb.TokenInfo:
    message = pb.TokenInfo(
        id=info.id,
        name=info.name,
        role=ROLE_PB[info.role],
        create_time=timestamp(info.create_time),
    )
    if info.expire_time is not None:
        message.expire_time.CopyFrom(timestamp(info.expire_time))
    if info.last_used_time is not None:
        message.last_used_time.CopyFrom(timestamp(info.last_used_time))
    if info.revoke_time is not None:
        message.revoke_time.CopyFrom(timestamp(info.revoke_time))
    return message


class TokenServicer(tokens_pb2_grpc.TokenServiceServicer):
    """``on_revoked`` is called after each revocation (the token checker forgets the
    tokens it remembers)."""

    def __init__(self, db: Database, on_revoked: Callable[[], None] = lambda: None) -> None:
        self._db = db
        self._on_revoked = on_revoked

    @rpc
    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Context
    ) -> pb.CreateTokenResponse:
        role = ROLES.get(request.role)
        if role is None:
            raise InvalidInputError(
                "role", "required: TOKEN_ROLE_VIEWER, TOKEN_ROLE_OPERATOR or TOKEN_ROLE_ADMIN"
            )
        if not 0 <= request.expires_in_seconds <= MAX_EXPIRES_IN:
            raise InvalidInputError(
                "expires_in_seconds",
                f"must be 0 (no expiry) to {MAX_EXPIRES_IN} seconds (100 years)",
            )
        expires_in = float(request.expires_in_seconds) or None
        token, info = await self._db.write(
            lambda c: tokens.create_token(c, request.name, role, expires_in)
        )
        return pb.CreateTokenResponse(token=token, info=token_pb(info))

    @rpc
    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Context
    ) -> pb.ListTokensResponse:
        size = page_size(request.page_size)
        after = PAGES.cursor(request.page_token)
        every = await self._db.read(tokens.list_tokens)
        page, cursor = offset_page(every, size, after)
        return pb.ListTokensResponse(
            tokens=[token_pb(t) for t in page], next_page_token=PAGES.token(cursor)
        )

    @rpc
    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Context
    ) -> pb.RevokeTokenResponse:
        info = await self._db.write(lambda c: tokens.revoke_token(c, request.name))
        self._on_revoked()
        return pb.RevokeTokenResponse(info=token_pb(info))
