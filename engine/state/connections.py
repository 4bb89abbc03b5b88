"""Connections and their mappings: validated on write, kept in SQLite, served from memory.

The registry holds a snapshot of every connection (with its decrypted API key and its
mappings) so ingest routing and delivery never query SQLite for configuration. Each
mapping change raises the connection's ``mapping_version``; log rows record it.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import orjson

from engine.connector.records import (
    Connection,
    CustomerIdMapping,
    EventMapping,
    ParameterMapping,
    ProfileMapping,
)
from engine.errors import InvalidInputError, NotFoundError, TidegateError, shown
from engine.plugins import Connectors, key_bound_changes
from engine.state.database import Database
from engine.state.secrets import SecretBox, hint

CONNECTION_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
"""Ids and the other patterns here are checked with ``fullmatch``: ``$`` also matches
before a trailing newline."""
MAPPING_ID_RE = CONNECTION_ID_RE
MAX_RETRY_WINDOW = 7 * 24 * 3600.0
MAX_API_KEY_LENGTH = 4096
STATE_ACTIVE = "active"
STATE_PAUSED = "paused"


@dataclass(frozen=True)
class ConnectionView:
    """A connection as the admin API shows it: no secret, only its hint."""

    id: str
    display_name: str
    connector: str
    settings: Mapping[str, str]
    api_key_hint: str
    customer_id_mapping: CustomerIdMapping
    state: str
    state_reason: str
    mapping_version: int
    create_time: float
    update_time: float
    retry_window_seconds: float = 0.0


@dataclass(frozen=True)
class ConnectionUpdate:
    """New values for UpdateConnection; ``None`` leaves a field unchanged."""

    display_name: str | None = None
    settings: Mapping[str, str] | None = None
    api_key: str | None = None
    customer_id_mapping: CustomerIdMapping | None = None
    retry_window_seconds: float | None = None


@dataclass(frozen=True)
class NewConnection:
    """A connection to create, already validated (``write_batch`` creates these)."""

    id: str
    display_name: str
    connector: str
    settings: Mapping[str, str]
    api_key: str
    customer_id_mapping: CustomerIdMapping
    retry_window_seconds: float = 0.0


@dataclass(frozen=True)
class ConfigBatch:
    """Changes to several connections that ``write_batch`` makes in one transaction, or
    not at all. Everything in it is validated already; it is written in this order:
    ``deletes``, ``removed_mappings`` ((``"profile"`` or ``"event"``, id)), ``updates``,
    ``creates``, then the mappings, each created or, when its id is already on that
    connection, replaced in place (it keeps its position). ``mappings_changed``: existing
    connections whose ``mapping_version`` rises by one.

    ``expected`` holds, for each existing connection the changes were worked out from,
    its ``update_time`` and ``mapping_version`` then: when another write changed one of
    them in between, nothing is written."""

    expected: Mapping[str, tuple[float, int]]
    deletes: tuple[str, ...] = ()
    removed_mappings: tuple[tuple[str, str], ...] = ()
    updates: tuple[tuple[str, ConnectionUpdate], ...] = ()
    creates: tuple[NewConnection, ...] = ()
    profile_mappings: tuple[tuple[str, ProfileMapping], ...] = ()
    event_mappings: tuple[tuple[str, EventMapping], ...] = ()
    mappings_changed: tuple[str, ...] = ()

    def connection_ids(self) -> list[str]:
        """Every connection the batch touches, each once."""
        ids = [*self.deletes, *(i for i, _ in self.updates), *(n.id for n in self.creates)]
        ids += [i for i, _ in self.profile_mappings] + [i for i, _ in self.event_mappings]
        ids += self.mappings_changed
        return list(dict.fromkeys(ids))


CONFIG_CHANGED = (
    "the configuration changed while this change was being written (another admin call "
    "or apply); nothing was changed: run it again"
)


def check_retry_window(seconds: float) -> float:
    if seconds < 0 or seconds > MAX_RETRY_WINDOW:
        raise InvalidInputError(
            "connection.retry_window_seconds",
            f"must be between 0 (the default, 6 hours) and {MAX_RETRY_WINDOW:.0f} (7 days)",
        )
    return seconds


def check_api_key(key: str, field: str = "connection.api_key") -> str:
    """Refuses a key that cannot go out in a request header: control characters (a
    trailing newline from a copy-paste), spaces, non-ASCII text, or more than
    ``MAX_API_KEY_LENGTH`` characters. The key itself is never in the message."""
    if len(key) > MAX_API_KEY_LENGTH:
        raise InvalidInputError(field, f"is longer than {MAX_API_KEY_LENGTH} characters")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in key):
        raise InvalidInputError(
            field,
            "must be printable ASCII without spaces, line breaks or other control "
            "characters (was a line break copied with it?)",
        )
    return key


def key_bound_rule(field: str, names: list[str]) -> InvalidInputError:
    """The refusal of a change to where the key goes without the key."""
    changed = ", ".join(f"settings.{n}" for n in names)
    how = "give the API key again in the same request"
    if field.endswith("api_key_env"):
        how = "name the variable that holds the API key in api_key_env"
    return InvalidInputError(
        field,
        f"required when {changed} changes: {how}, so a stored key never goes to a "
        "destination it was not given for",
    )


@contextlib.contextmanager
def field_prefix(prefix: str) -> Iterator[None]:
    """Connector validators name fields relative to what they check; the API names them
    from the request's root (``partner_name`` -> ``connection.settings.partner_name``)."""
    try:
        yield
    except InvalidInputError as exc:
        raise InvalidInputError(f"{prefix}.{exc.field}", exc.message) from None


class ConnectionRegistry:
    def __init__(self, db: Database, connectors: Connectors, secrets: SecretBox) -> None:
        self._db = db
        self._connectors = connectors
        self._secrets = secrets
        self._views: dict[str, ConnectionView] = {}
        self._runtime: dict[str, Connection] = {}
        self._listeners: list[Callable[[str], Awaitable[None] | None]] = []

    def on_change(self, listener: Callable[[str], Awaitable[None] | None]) -> None:
        """Call ``listener(connection_id)`` after any change to that connection. The
        write that made the change returns once every listener did, awaiting those that
        return an awaitable (the ingest worker reloading its copy of the connection)."""
        self._listeners.append(listener)

    async def _changed(self, connection_id: str) -> None:
        for listener in self._listeners:
            pending = listener(connection_id)
            if pending is not None:
                await pending

    # -- reads -------------------------------------------------------------------------

    async def load(self) -> None:
        ids = await self._db.read(lambda c: [r[0] for r in c.execute("SELECT id FROM connections")])
        for connection_id in ids:
            await self._reload(connection_id)

    def view(self, connection_id: str) -> ConnectionView:
        try:
            return self._views[connection_id]
        except KeyError:
            raise NotFoundError(f"connection {shown(connection_id)} does not exist") from None

    def views(self) -> list[ConnectionView]:
        return [self._views[k] for k in sorted(self._views)]

    def runtime(self, connection_id: str) -> Connection:
        """The connection as hooks see it, with decrypted key and current mappings."""
        try:
            return self._runtime[connection_id]
        except KeyError:
            raise NotFoundError(f"connection {shown(connection_id)} does not exist") from None

    def runtimes(self) -> list[Connection]:
        return list(self._runtime.values())

    def is_paused(self, connection_id: str) -> bool:
        view = self._views.get(connection_id)
        return view is not None and view.state == STATE_PAUSED

    # -- connection writes -------------------------------------------------------------

    async def create(
        self,
        *,
        connection_id: str,
        display_name: str,
        connector: str,
        settings: Mapping[str, str],
        api_key: str,
        customer_id_mapping: CustomerIdMapping | None,
        retry_window_seconds: float = 0.0,
    ) -> ConnectionView:
        connection_id = connection_id or f"conn-{uuid.uuid4().hex[:8]}"
        if not CONNECTION_ID_RE.fullmatch(connection_id):
            raise InvalidInputError(
                "connection.id",
                "use 1-63 lowercase letters, digits and dashes, starting with a letter or digit",
            )
        info = self._connectors.info(connector or self._connectors.only())
        with field_prefix("connection.settings"):
            info.validate_settings(settings)
            self._connectors.check_settings(info, settings)
        if info.secret_required and not api_key:
            raise InvalidInputError("connection.api_key", "required: the destination API key")
        check_api_key(api_key)
        id_mapping = customer_id_mapping or CustomerIdMapping()
        with field_prefix("connection.customer_id_mapping"):
            info.validate_customer_id_mapping(id_mapping)
        check_retry_window(retry_window_seconds)
        now = time.time()

        new = NewConnection(
            connection_id,
            display_name,
            info.name,
            settings,
            api_key,
            id_mapping,
            retry_window_seconds,
        )

        def insert(c: sqlite3.Connection) -> None:
            if c.execute("SELECT 1 FROM connections WHERE id=?", (connection_id,)).fetchone():
                raise InvalidInputError(
                    "connection.id", f"connection {connection_id!r} already exists"
                )
            self._insert_row(c, new, now)

        await self._db.write(insert)
        await self._reload(connection_id)
        await self._changed(connection_id)
        return self.view(connection_id)

    async def update(self, connection_id: str, update: ConnectionUpdate) -> ConnectionView:
        current = self.view(connection_id)
        info = self._connectors.info(current.connector)
        settings = current.settings if update.settings is None else update.settings
        id_mapping = update.customer_id_mapping or current.customer_id_mapping
        with field_prefix("connection.settings"):
            info.validate_settings(settings)
            self._connectors.check_settings(info, settings)
        with field_prefix("connection.customer_id_mapping"):
            info.validate_customer_id_mapping(id_mapping)
        if update.api_key is not None and info.secret_required and not update.api_key:
            raise InvalidInputError("connection.api_key", "must not be empty")
        if update.api_key is not None:
            check_api_key(update.api_key)
        redirected = key_bound_changes(info, current.settings, settings)
        if redirected and update.api_key is None and info.secret_required:
            raise key_bound_rule("connection.api_key", redirected)
        if update.retry_window_seconds is not None:
            check_retry_window(update.retry_window_seconds)
        now = time.time()
        await self._db.write(lambda c: self._update_row(c, current, update, now))
        await self._reload(connection_id)
        await self._changed(connection_id)
        return self.view(connection_id)

    async def delete(self, connection_id: str) -> None:
        self.view(connection_id)

        def remove(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM queue WHERE connection_id=?", (connection_id,))
            c.execute("DELETE FROM connections WHERE id=?", (connection_id,))

        await self._db.write(remove)
        self._views.pop(connection_id, None)
        self._runtime.pop(connection_id, None)
        await self._changed(connection_id)

    async def write_batch(self, batch: ConfigBatch) -> None:
        """Writes ``batch`` in one transaction, then reloads every connection it touched
        and tells the listeners (the ingest worker reloads each). Raises ``TidegateError``
        and writes nothing when another write changed those connections in between."""
        now = time.time()
        updates = [(self.view(connection_id), update) for connection_id, update in batch.updates]

        def apply(c: sqlite3.Connection) -> None:
            for connection_id, expected in batch.expected.items():
                row = c.execute(
                    "SELECT update_time, mapping_version FROM connections WHERE id=?",
                    (connection_id,),
                ).fetchone()
                if row is None or (float(row[0]), int(row[1])) != expected:
                    raise TidegateError(CONFIG_CHANGED)
            for connection_id in batch.deletes:
                c.execute("DELETE FROM queue WHERE connection_id=?", (connection_id,))
                c.execute("DELETE FROM connections WHERE id=?", (connection_id,))
            for kind, mapping_id in batch.removed_mappings:
                table = "profile_mappings" if kind == "profile" else "event_mappings"
                c.execute(f"DELETE FROM {table} WHERE id=?", (mapping_id,))
            for current, update in updates:
                self._update_row(c, current, update, now)
            for new in batch.creates:
                self._insert_row(c, new, now)
            for connection_id, profile in batch.profile_mappings:
                values = (
                    profile.source_attribute,
                    profile.target_attribute,
                    int(profile.custom),
                    profile.array_mode,
                )
                if not c.execute(
                    "UPDATE profile_mappings SET source_attribute=?, target_attribute=?,"
                    " custom=?, array_mode=? WHERE id=? AND connection_id=?",
                    (*values, profile.id, connection_id),
                ).rowcount:
                    c.execute(
                        "INSERT INTO profile_mappings (source_attribute, target_attribute,"
                        " custom, array_mode, id, connection_id) VALUES (?,?,?,?,?,?)",
                        (*values, profile.id, connection_id),
                    )
            for connection_id, event in batch.event_mappings:
                params = (event.source_event, event.target_event, _params_json(event.parameters))
                if not c.execute(
                    "UPDATE event_mappings SET source_event=?, target_event=?, parameters=?"
                    " WHERE id=? AND connection_id=?",
                    (*params, event.id, connection_id),
                ).rowcount:
                    c.execute(
                        "INSERT INTO event_mappings (source_event, target_event, parameters,"
                        " id, connection_id) VALUES (?,?,?,?,?)",
                        (*params, event.id, connection_id),
                    )
            for connection_id in batch.mappings_changed:
                c.execute(
                    "UPDATE connections SET mapping_version = mapping_version + 1,"
                    " update_time=? WHERE id=?",
                    (now, connection_id),
                )

        try:
            await self._db.write(apply)
        except sqlite3.IntegrityError:  # an id another write took in between
            raise TidegateError(CONFIG_CHANGED) from None
        touched = batch.connection_ids()
        for connection_id in touched:
            await self._reload(connection_id)
        for connection_id in touched:
            await self._changed(connection_id)

    def _insert_row(self, c: sqlite3.Connection, new: NewConnection, now: float) -> None:
        id_mapping = new.customer_id_mapping
        c.execute(
            "INSERT INTO connections (id, display_name, connector, settings, api_key_encrypted,"
            " api_key_hint, id_source_attribute, id_target_identifier, id_custom,"
            " create_time, update_time, retry_window_seconds)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                new.id,
                new.display_name,
                new.connector,
                orjson.dumps(dict(new.settings)).decode(),
                self._secrets.encrypt(new.api_key),
                hint(new.api_key),
                id_mapping.source_attribute,
                id_mapping.target_identifier,
                int(id_mapping.custom),
                now,
                now,
                new.retry_window_seconds,
            ),
        )

    def _update_row(
        self, c: sqlite3.Connection, current: ConnectionView, update: ConnectionUpdate, now: float
    ) -> None:
        settings = current.settings if update.settings is None else update.settings
        id_mapping = update.customer_id_mapping or current.customer_id_mapping
        retry_window = current.retry_window_seconds
        if update.retry_window_seconds is not None:
            retry_window = update.retry_window_seconds
        c.execute(
            "UPDATE connections SET display_name=?, settings=?, id_source_attribute=?,"
            " id_target_identifier=?, id_custom=?, retry_window_seconds=?, update_time=?"
            " WHERE id=?",
            (
                current.display_name if update.display_name is None else update.display_name,
                orjson.dumps(dict(settings)).decode(),
                id_mapping.source_attribute,
                id_mapping.target_identifier,
                int(id_mapping.custom),
                retry_window,
                now,
                current.id,
            ),
        )
        if update.api_key is not None:
            c.execute(
                "UPDATE connections SET api_key_encrypted=?, api_key_hint=? WHERE id=?",
                (self._secrets.encrypt(update.api_key), hint(update.api_key), current.id),
            )
        if update.api_key is not None or update.settings is not None:
            # New credentials deserve a new try: delivery resumes and probes with one
            # request. Decided here, inside the write, not on the view read before: a
            # pause may have landed in between.
            c.execute(
                "UPDATE connections SET credentials_version = credentials_version + 1,"
                " state = ?, state_reason = '' WHERE id = ?",
                (STATE_ACTIVE, current.id),
            )

    async def pause(self, connection: Connection, reason: str) -> bool:
        """Pauses ``connection`` unless its credentials changed since that snapshot was
        taken (a refusal of the old key says nothing about the new one)."""
        paused = await self._db.write(
            lambda c: (
                c.execute(
                    "UPDATE connections SET state=?, state_reason=?, update_time=?"
                    " WHERE id=? AND credentials_version=?",
                    (
                        STATE_PAUSED,
                        reason,
                        time.time(),
                        connection.id,
                        connection.credentials_version,
                    ),
                ).rowcount
            )
        )
        await self._reload(connection.id)
        await self._changed(connection.id)
        return bool(paused)

    async def set_state(self, connection_id: str, state: str, reason: str) -> None:
        await self._db.write(
            lambda c: c.execute(
                "UPDATE connections SET state=?, state_reason=?, update_time=? WHERE id=?",
                (state, reason, time.time(), connection_id),
            )
        )
        await self._reload(connection_id)
        await self._changed(connection_id)

    # -- mapping writes ----------------------------------------------------------------

    async def add_profile_mapping(
        self,
        connection_id: str,
        source: str,
        target: str,
        custom: bool,
        mapping_id: str = "",
        array_mode: str = "",
    ) -> tuple[ProfileMapping, int]:
        mapping = ProfileMapping(
            self._new_mapping_id(mapping_id, "pm"), source, target, custom, array_mode
        )
        self._validate_profile(connection_id, mapping)
        await self._mapping_write(
            connection_id,
            "INSERT INTO profile_mappings (id, connection_id, source_attribute, target_attribute,"
            " custom, array_mode) VALUES (?,?,?,?,?,?)",
            (mapping.id, connection_id, source, target, int(custom), array_mode),
        )
        return mapping, self.view(connection_id).mapping_version

    async def update_profile_mapping(
        self, mapping_id: str, source: str, target: str, custom: bool, array_mode: str = ""
    ) -> tuple[ProfileMapping, str, int]:
        connection_id = self._owner_of(mapping_id, "profile")
        mapping = ProfileMapping(mapping_id, source, target, custom, array_mode)
        self._validate_profile(connection_id, mapping)
        await self._mapping_write(
            connection_id,
            "UPDATE profile_mappings SET source_attribute=?, target_attribute=?, custom=?,"
            " array_mode=? WHERE id=?",
            (source, target, int(custom), array_mode, mapping_id),
        )
        return mapping, connection_id, self.view(connection_id).mapping_version

    async def remove_mapping(self, mapping_id: str, kind: str) -> int:
        """Removes a "profile" or "event" mapping; returns the new mapping version."""
        connection_id = self._owner_of(mapping_id, kind)
        table = "profile_mappings" if kind == "profile" else "event_mappings"
        await self._mapping_write(connection_id, f"DELETE FROM {table} WHERE id=?", (mapping_id,))
        return self.view(connection_id).mapping_version

    async def add_event_mapping(
        self,
        connection_id: str,
        source: str,
        target: str,
        parameters: tuple[ParameterMapping, ...],
        mapping_id: str = "",
    ) -> tuple[EventMapping, int]:
        mapping = EventMapping(self._new_mapping_id(mapping_id, "em"), source, target, parameters)
        self._validate_event(connection_id, mapping)
        await self._mapping_write(
            connection_id,
            "INSERT INTO event_mappings (id, connection_id, source_event, target_event, parameters)"
            " VALUES (?,?,?,?,?)",
            (mapping.id, connection_id, source, target, _params_json(parameters)),
        )
        return mapping, self.view(connection_id).mapping_version

    async def update_event_mapping(
        self, mapping_id: str, source: str, target: str, parameters: tuple[ParameterMapping, ...]
    ) -> tuple[EventMapping, str, int]:
        connection_id = self._owner_of(mapping_id, "event")
        mapping = EventMapping(mapping_id, source, target, parameters)
        self._validate_event(connection_id, mapping)
        await self._mapping_write(
            connection_id,
            "UPDATE event_mappings SET source_event=?, target_event=?, parameters=? WHERE id=?",
            (source, target, _params_json(parameters), mapping_id),
        )
        return mapping, connection_id, self.view(connection_id).mapping_version

    def _validate_profile(self, connection_id: str, mapping: ProfileMapping) -> None:
        connection = self.runtime(connection_id)
        with field_prefix("mapping"):
            self._connectors.info(connection.connector).validate_profile_mapping(mapping)
        for other in connection.profile_mappings:
            if other.id != mapping.id and other.source_attribute == mapping.source_attribute:
                raise InvalidInputError(
                    "mapping.source_attribute",
                    f"{mapping.source_attribute!r} is already mapped (mapping {other.id})",
                )

    def _validate_event(self, connection_id: str, mapping: EventMapping) -> None:
        connection = self.runtime(connection_id)
        if not mapping.source_event:
            raise InvalidInputError("mapping.source_event", "required: the Antavo event action")
        with field_prefix("mapping"):
            self._connectors.info(connection.connector).validate_event_mapping(mapping)
        for other in connection.event_mappings:
            if other.id != mapping.id and other.source_event == mapping.source_event:
                raise InvalidInputError(
                    "mapping.source_event",
                    f"{mapping.source_event!r} is already mapped (mapping {other.id})",
                )

    def _new_mapping_id(self, requested: str, prefix: str) -> str:
        if not requested:
            return f"{prefix}-{uuid.uuid4().hex[:10]}"
        if not MAPPING_ID_RE.fullmatch(requested):
            raise InvalidInputError(
                "mapping.id",
                "use 1-63 lowercase letters, digits and dashes, starting with a letter or digit",
            )
        for connection in self._runtime.values():
            ids = [m.id for m in connection.profile_mappings]
            ids += [m.id for m in connection.event_mappings]
            if requested in ids:
                raise InvalidInputError("mapping.id", f"mapping {shown(requested)} already exists")
        return requested

    def _owner_of(self, mapping_id: str, kind: str) -> str:
        for connection in self._runtime.values():
            mappings = (
                connection.profile_mappings if kind == "profile" else connection.event_mappings
            )
            if any(m.id == mapping_id for m in mappings):
                return connection.id
        raise NotFoundError(f"{kind} mapping {shown(mapping_id)} does not exist")

    async def _mapping_write(
        self, connection_id: str, sql: str, params: tuple[object, ...]
    ) -> None:
        def apply(c: sqlite3.Connection) -> None:
            c.execute(sql, params)
            c.execute(
                "UPDATE connections SET mapping_version = mapping_version + 1, update_time=?"
                " WHERE id=?",
                (time.time(), connection_id),
            )

        await self._db.write(apply)
        await self._reload(connection_id)
        await self._changed(connection_id)

    # -- rows as a document (engine.broker.config_sync) ------------------------------------

    @property
    def secrets(self) -> SecretBox:
        """The box that encrypts the stored API keys (the broker checks that every
        process of a cluster has the same key)."""
        return self._secrets

    async def document(self, connection_id: str) -> dict[str, object] | None:
        """The connection's rows as stored in SQLite (the API key still encrypted), as a
        plain document; None when there is no such connection."""
        return await self._db.read(lambda c: _document(c, connection_id))

    async def replace_from_document(
        self, connection_id: str, document: Mapping[str, object] | None, notify: bool = True
    ) -> None:
        """Replaces the connection's rows with ``document`` (as ``document`` gives it; None
        deletes the connection and its queued items) in one transaction, reloads it, and
        tells the listeners unless ``notify`` is False. The rows were validated where they
        were written; a connector that is not installed here is refused
        (``InvalidInputError``) and nothing is written."""
        if document is not None:
            row = document["connection"]
            assert isinstance(row, dict)
            self._connectors.get(str(row["connector"]))

        def replace(c: sqlite3.Connection) -> None:
            if document is None:
                c.execute("DELETE FROM queue WHERE connection_id=?", (connection_id,))
                c.execute("DELETE FROM connections WHERE id=?", (connection_id,))
                return
            _replace_rows(c, connection_id, document)

        await self._db.write(replace)
        await self._reload(connection_id)
        if notify:
            await self._changed(connection_id)

    # -- loading -----------------------------------------------------------------------

    async def refresh(self, connection_id: str) -> None:
        """Reloads one connection from the database, after another process changed it."""
        await self._reload(connection_id)

    async def _reload(self, connection_id: str) -> None:
        def fetch(
            c: sqlite3.Connection,
        ) -> tuple[tuple[object, ...], list[tuple[object, ...]], list[tuple[object, ...]]]:
            row = c.execute(
                "SELECT id, display_name, connector, settings, api_key_encrypted, api_key_hint,"
                " id_source_attribute, id_target_identifier, id_custom, state, state_reason,"
                " mapping_version, create_time, update_time, retry_window_seconds,"
                " credentials_version FROM connections WHERE id=?",
                (connection_id,),
            ).fetchone()
            profiles = c.execute(
                "SELECT id, source_attribute, target_attribute, custom, array_mode"
                " FROM profile_mappings"
                " WHERE connection_id=? ORDER BY rowid",
                (connection_id,),
            ).fetchall()
            events = c.execute(
                "SELECT id, source_event, target_event, parameters FROM event_mappings"
                " WHERE connection_id=? ORDER BY rowid",
                (connection_id,),
            ).fetchall()
            return row, profiles, events

        row, profiles, events = await self._db.read(fetch)
        if row is None:
            self._views.pop(connection_id, None)
            self._runtime.pop(connection_id, None)
            return
        (
            cid,
            display_name,
            connector,
            settings_json,
            key_enc,
            key_hint,
            id_src,
            id_tgt,
            id_custom,
            state,
            reason,
            version,
            created,
            updated,
            retry_window,
            credentials_version,
        ) = row
        settings = orjson.loads(str(settings_json))
        id_mapping = CustomerIdMapping(str(id_src), str(id_tgt), bool(id_custom))
        view = ConnectionView(
            id=str(cid),
            display_name=str(display_name),
            connector=str(connector),
            settings=settings,
            api_key_hint=str(key_hint),
            customer_id_mapping=id_mapping,
            state=str(state),
            state_reason=str(reason),
            mapping_version=int(str(version)),
            create_time=float(str(created)),
            update_time=float(str(updated)),
            retry_window_seconds=float(str(retry_window)),
        )
        runtime = Connection(
            id=view.id,
            connector=view.connector,
            settings=settings,
            api_key=self._secrets.decrypt(bytes(key_enc)),  # type: ignore[call-overload]
            customer_id_mapping=id_mapping,
            profile_mappings=tuple(
                ProfileMapping(str(i), str(s), str(t), bool(cu), str(am))
                for i, s, t, cu, am in profiles
            ),
            event_mappings=tuple(
                EventMapping(str(i), str(s), str(t), _params_from_json(str(p)))
                for i, s, t, p in events
            ),
            mapping_version=view.mapping_version,
            display_name=view.display_name,
            retry_window_seconds=view.retry_window_seconds,
            credentials_version=int(str(credentials_version)),
        )
        self._views[view.id] = view
        self._runtime[view.id] = runtime


def _params_json(parameters: tuple[ParameterMapping, ...]) -> str:
    return orjson.dumps(
        [
            {"source": p.source_parameter, "target": p.target_parameter, "custom": p.custom}
            for p in parameters
        ]
    ).decode()


def _params_from_json(text: str) -> tuple[ParameterMapping, ...]:
    return tuple(
        ParameterMapping(p["source"], p["target"], bool(p["custom"])) for p in orjson.loads(text)
    )


CONNECTION_COLUMNS = (
    "id",
    "display_name",
    "connector",
    "settings",
    "api_key_encrypted",
    "api_key_hint",
    "id_source_attribute",
    "id_target_identifier",
    "id_custom",
    "state",
    "state_reason",
    "retry_window_seconds",
    "credentials_version",
    "mapping_version",
    "create_time",
    "update_time",
)
PROFILE_MAPPING_COLUMNS = ("id", "source_attribute", "target_attribute", "custom", "array_mode")
EVENT_MAPPING_COLUMNS = ("id", "source_event", "target_event", "parameters")
DOCUMENT_VERSION = 1


def _document(c: sqlite3.Connection, connection_id: str) -> dict[str, object] | None:
    row = c.execute(
        f"SELECT {', '.join(CONNECTION_COLUMNS)} FROM connections WHERE id=?", (connection_id,)
    ).fetchone()
    if row is None:
        return None
    connection = dict(zip(CONNECTION_COLUMNS, row, strict=True))
    connection["api_key_encrypted"] = bytes(connection["api_key_encrypted"]).decode("ascii")
    profiles = c.execute(
        f"SELECT {', '.join(PROFILE_MAPPING_COLUMNS)} FROM profile_mappings"
        " WHERE connection_id=? ORDER BY rowid",
        (connection_id,),
    ).fetchall()
    events = c.execute(
        f"SELECT {', '.join(EVENT_MAPPING_COLUMNS)} FROM event_mappings"
        " WHERE connection_id=? ORDER BY rowid",
        (connection_id,),
    ).fetchall()
    return {
        "version": DOCUMENT_VERSION,
        "connection": connection,
        "profile_mappings": [dict(zip(PROFILE_MAPPING_COLUMNS, r, strict=True)) for r in profiles],
        "event_mappings": [dict(zip(EVENT_MAPPING_COLUMNS, r, strict=True)) for r in events],
    }


def _replace_rows(
    c: sqlite3.Connection, connection_id: str, document: Mapping[str, object]
) -> None:
    row = document["connection"]
    profiles = document["profile_mappings"]
    events = document["event_mappings"]
    assert isinstance(row, dict) and isinstance(profiles, list) and isinstance(events, list)
    if row["id"] != connection_id:
        raise TidegateError("a configuration document names another connection than its key")
    values = [row[name] for name in CONNECTION_COLUMNS]
    values[CONNECTION_COLUMNS.index("api_key_encrypted")] = str(row["api_key_encrypted"]).encode()
    updates = ", ".join(f"{name}=excluded.{name}" for name in CONNECTION_COLUMNS[1:])
    c.execute(
        f"INSERT INTO connections ({', '.join(CONNECTION_COLUMNS)})"
        f" VALUES ({', '.join('?' * len(CONNECTION_COLUMNS))})"
        f" ON CONFLICT(id) DO UPDATE SET {updates}",
        values,
    )
    c.execute("DELETE FROM profile_mappings WHERE connection_id=?", (connection_id,))
    c.execute("DELETE FROM event_mappings WHERE connection_id=?", (connection_id,))
    for table, columns, mappings in (
        ("profile_mappings", PROFILE_MAPPING_COLUMNS, profiles),
        ("event_mappings", EVENT_MAPPING_COLUMNS, events),
    ):
        for mapping in mappings:
            c.execute(
                f"INSERT OR REPLACE INTO {table} (connection_id, {', '.join(columns)})"
                f" VALUES (?, {', '.join('?' * len(columns))})",
                (connection_id, *(mapping[name] for name in columns)),
            )
