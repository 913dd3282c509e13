"""Live configuration (the config centre): the settings that make sense to change while the
system runs live in a NATS KV bucket (`CONFIG`, `<NS>_CONFIG` with a namespace), and every role
applies a change within a moment, without a restart.

Precedence, per key: a value in the bucket, else the process's environment (`JETSOURCE_*`,
`.env`), else the default. Removing a key from the bucket (`jetsource config unset`) brings
every process back to its own environment's value.

How a role follows the bucket: a core-NATS subscription on the bucket's subjects tells it that
a key changed; it then reads the key's last value by Direct Get (which carries its revision),
so a late notification never applies an older value. Every `RECONCILE_S` it reads every key
again, which also covers changes made while it was disconnected. A value that does not
validate (written around `jetsource config set`, e.g. with `nats kv put`) is not applied: one
warning, and the process keeps what it has. Only the admin identity may write the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.errors import JetsourceError
from bus.eventstore import direct_last
from bus.outage import Outage
from bus.streams import config_bucket
from infra.settings import Settings

log = logging.getLogger(__name__)

RECONCILE_S = 10.0
RETRY_S = 1.0  # after a failed read
_DELETED = ("DEL", "PURGE")


@dataclass(frozen=True)
class LiveKey:
    """One setting that may change at run time: who applies it, and what it does."""

    name: str  # the Settings field (so also `JETSOURCE_<NAME>`)
    roles: str  # which processes apply it
    description: str


LIVE: dict[str, LiveKey] = {k.name: k for k in (
    LiveKey("log_level", "every role", "the level of every process's log lines"),
    LiveKey("worker_concurrency", "workers", "tasks one worker process runs at once (lowering it lets "
                                             "running tasks finish; no new ones start until below)"),
    LiveKey("rate_limit_per_s", "edge", "requests per second per client IP (0 = off)"),
    LiveKey("max_inflight", "edge", "requests in flight before the edge answers 503"),
    LiveKey("projection_busy_linger_s", "projector", "under load, how long a projector lets events gather "
                                                     "after a partial batch"),
    LiveKey("breaker_failures", "edge", "consecutive failures of a subject that open its circuit (0 = never)"),
    LiveKey("breaker_cooldown_s", "edge", "how long an open circuit refuses before it lets a probe through"),
)}


class BadValue(ValueError):
    """A value a live key may not take, or a key that is not live: the message says which."""


def parse(key: str, text: str) -> Any:
    """The value `text` (JSON, or a bare string) stands for, validated as the setting's field
    validates it (its type and bounds)."""
    if key not in LIVE:
        raise BadValue(f"{key!r} is not a live setting; live settings: {', '.join(LIVE)}")
    try:
        raw: Any = json.loads(text)
    except (ValueError, RecursionError):  # not JSON (or nested past reason): a bare string
        raw = text
    field = Settings.model_fields[key]
    kind: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(kind)
    try:
        return adapter.validate_python(raw, strict=True)  # JSON already typed it: 1.5 or true is no count
    except pydantic.ValidationError as exc:
        reasons = "; ".join(e["msg"] for e in exc.errors())
        raise BadValue(f"{key}: {text[:200]!r} is not a valid value: {reasons}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a stored value does to the validator, it is refused
        raise BadValue(f"{key}: {text[:200]!r} is not a valid value ({type(exc).__name__})") from None


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def base_value(settings: Settings, key: str) -> tuple[Any, str]:
    """What a process has without the bucket: its environment's value, or the default."""
    return getattr(settings, key), ("environment" if key in settings.model_fields_set else "default")


def effective(settings: Settings, key: str, data: bytes | None) -> tuple[Any, str]:
    """(value, source) of a key whose bucket entry is `data`: the stored value
    ("kv"), or, with none, the settings' ("environment" / "default"). Raises BadValue for a
    stored value that does not validate (a role keeps what it has; `config get` shows it)."""
    if data is None:
        return base_value(settings, key)
    return parse(key, data.decode(errors="replace")), "kv"


def key_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


async def read(nc: Client, bucket: str, key: str, *, timeout: float = 5.0) -> tuple[int, bytes | None]:
    """(revision, value) of a key: the value None when the key is unset or was removed (its
    revision then is the removal's, or 0)."""
    msg = await direct_last(nc, f"KV_{bucket}", key_subject(bucket, key), timeout=timeout)
    if msg is None:
        return 0, None
    headers = msg.headers or {}
    revision = int(headers.get("Nats-Sequence", "0"))
    if headers.get("KV-Operation") in _DELETED:
        return revision, None
    return revision, msg.data


class LiveConfig:
    """One process's view of the bucket: `on(key, apply)` for what this process applies, then
    run it (`running()`); `apply(value)` is called with the effective value whenever it changes
    (and once at start when the bucket overrides the environment)."""

    def __init__(self, nc: Client, settings: Settings, *, reconcile_s: float = RECONCILE_S) -> None:
        self._nc = nc
        self._settings = settings
        self.bucket = config_bucket(settings.namespace)
        self._reconcile_s = reconcile_s
        self._appliers: dict[str, list[Callable[[Any], None]]] = {}
        # key -> effective value now: the settings' until the bucket says otherwise
        self._applied: dict[str, Any] = {key: getattr(settings, key) for key in LIVE}
        self._revisions: dict[str, int] = {}
        self._refused: dict[str, int] = {}  # key -> revision of a value refused (warned once)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._outage = Outage(log, f"live configuration ({self.bucket})")
        self.changes = 0  # values applied since start (for tests and status)

    def on(self, key: str, apply: Callable[[Any], None]) -> None:
        """`apply` gets the key's effective value whenever it changes, and at once when the
        bucket (read when `running` began) overrides this process's settings: a role registers
        before it starts work, so it never works a moment on a value the bucket replaced."""
        if key not in LIVE:
            raise KeyError(f"{key!r} is not a live setting")
        self._appliers.setdefault(key, []).append(apply)
        current = self.value(key)
        if current != getattr(self._settings, key):
            try:
                apply(current)
            except Exception:  # noqa: BLE001 - as in `_set`: the role starts on its own value
                log.exception("live config: applying %s = %r failed", key, current)

    def value(self, key: str) -> Any:
        return self._applied[key]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LiveConfig]:
        sub = await self._nc.subscribe(f"$KV.{self.bucket}.>", cb=self._changed)
        try:
            await self.refresh(set(LIVE))
        except Exception:  # noqa: BLE001 - a role starts on its own settings rather than not at all
            log.exception("live config: reading the bucket failed; starting on this process's settings")
            self._dirty = set(LIVE)
        # A task of its own context: its log lines belong to no request's trace.
        loop = asyncio.get_running_loop().create_task(self._follow(), context=contextvars.Context())
        try:
            yield self
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _changed(self, msg: Msg) -> None:
        key = msg.subject.rsplit(".", 1)[-1]
        if key in LIVE:
            self._dirty.add(key)
            self._wake.set()

    async def _follow(self) -> None:
        while True:
            retry = bool(self._dirty) and self._outage.since is not None  # a read failed: again soon
            try:
                await asyncio.wait_for(self._wake.wait(), RETRY_S if retry else self._reconcile_s)
                keys = self._dirty
            except TimeoutError:
                keys = self._dirty if retry else set(LIVE)  # the reconcile: every key
            self._wake.clear()
            self._dirty = set()
            try:
                await self.refresh(keys)
            except Exception:  # noqa: BLE001 - following the bucket must outlive any one surprise
                log.exception("live config: reading the bucket failed; trying again")
                self._dirty |= keys

    async def refresh(self, keys: set[str]) -> None:
        """Read these keys and apply what changed (one at a time: nothing older overtakes)."""
        for key in sorted(keys):
            try:
                revision, data = await read(self._nc, self.bucket, key, timeout=self._settings.request_timeout_s)
            except JetsourceError as exc:
                self._outage.failed(exc.message)
                self._dirty.add(key)  # tried again within RETRY_S
                continue
            self._outage.ok()
            if revision < self._revisions.get(key, 0):
                continue
            self._revisions[key] = revision
            try:
                value, source = effective(self._settings, key, data)
            except BadValue as exc:
                if self._refused.get(key) != revision:
                    self._refused[key] = revision
                    log.warning("live config: not applying revision %d: %s", revision, exc)
                continue
            self._set(key, value, f"the config bucket (revision {revision})" if source == "kv" else source)

    def _set(self, key: str, value: Any, source: str) -> None:
        old = self._applied.get(key)
        if old == value:
            return
        for apply in self._appliers.get(key, ()):
            try:
                apply(value)
            except Exception:  # noqa: BLE001 - one applier's bug must not stop the others
                log.exception("live config: applying %s = %r failed", key, value)
        self._applied[key] = value
        self.changes += 1
        # A line for what this process applies; what it only follows is a debug line.
        log.log(logging.INFO if key in self._appliers else logging.DEBUG,
                "live config: %s = %r (was %r; from %s)", key, value, old, source)


def apply_log_level(value: str) -> None:
    logging.getLogger().setLevel(value)
