"""Versioned events: stored events are read in their current shape, whatever version stored them.

Each event type's schema version is the default of its `v` field (`v: int = 2`): what this code
writes. An upcaster, registered per (type tag, version), turns an event's JSON object at that
version into the object at the next one; a chain of them brings any stored version to the
current one. Stored events are never rewritten: every reader (the actor's fold, projections,
process managers, replay, history, time travel) decodes through the context's `EventCodec`.

    def shipped_v1(event):          # one tracking number -> a parcel's worth of them
        tracking = event.pop("tracking", None)
        event["tracking_numbers"] = [tracking] if tracking else []
        return event

    ORDER_EVENTS = EventCodec(OrderEvent, {("order.shipped", 1): shipped_v1})

Cost: an event stored at its current version is decoded straight into its Struct, as before
(one attribute read more); only an older one is decoded to a dict, upcast and converted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import msgspec
import msgspec.inspect as ti

E = TypeVar("E")

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class EventVersionError(msgspec.ValidationError):
    """A stored event this code cannot bring to its current shape: a version newer than it knows
    (a newer writer stored it) or one with no upcaster. A decode error, so readers park it."""


class EventCodec(Generic[E]):
    """Decodes the stored events of one context (a tagged union of Structs) to their current
    version, through the upcasters registered per (tag, from-version)."""

    def __init__(self, event_type: Any, upcasters: Mapping[tuple[str, int], Upcaster] | None = None) -> None:
        self.event_type = event_type
        self._decoder: msgspec.json.Decoder[E] = msgspec.json.Decoder(event_type)
        self._upcasters = dict(upcasters or {})
        info = ti.type_info(event_type)
        structs = info.types if isinstance(info, ti.UnionType) else (info,)
        self.tag_field = "type"
        self.current: dict[str, int] = {}  # tag -> the version this code writes
        self._by_class: dict[type, int] = {}
        for st in structs:
            if not isinstance(st, ti.StructType) or st.tag is None:
                raise TypeError(f"{event_type!r}: events must be tagged Structs")
            self.tag_field = st.tag_field or "type"
            if st.cls.__struct_config__.omit_defaults:
                raise TypeError(f"{st.cls.__name__}: events are stored with their `v` (no omit_defaults)")
            defaults = {f.name: f.default for f in st.fields}
            version = defaults.get("v")
            if not isinstance(version, int):
                raise TypeError(f"{st.cls.__name__}: an event needs a schema version, a field `v: int = N`")
            self.current[str(st.tag)] = self._by_class[st.cls] = version
        for tag, version in self._upcasters:
            if tag not in self.current:
                raise ValueError(f"an upcaster for {tag!r}, which is not one of these events")
            if not 1 <= version < self.current[tag]:
                raise ValueError(f"an upcaster for {tag!r} from version {version}: the current one is "
                                 f"{self.current[tag]}")
            missing = [v for v in range(version + 1, self.current[tag]) if (tag, v) not in self._upcasters]
            if missing:
                raise ValueError(f"{tag!r} upcasts from {version} but not from {missing}: the chain is broken")
        # Nothing ever changed shape: every event decodes straight into its Struct.
        self._versioned = any(v != 1 for v in self.current.values())

    @classmethod
    def of(cls, event_type: Any) -> EventCodec[Any]:
        """`event_type` itself when it is a codec, else one without upcasters."""
        return event_type if isinstance(event_type, EventCodec) else cls(event_type)

    def decode(self, data: bytes) -> E:
        """The event in its current shape; a msgspec.DecodeError (EventVersionError among them)
        for bytes this code cannot read."""
        try:
            event = self._decoder.decode(data)
        except msgspec.ValidationError:
            if not self._upcasters or not self._older(data):
                raise  # not an older shape: the current schema's own complaint
            return self._upcast(data)  # an older shape the current schema refuses
        version = event.v  # type: ignore[attr-defined]
        if version == 1 and not self._versioned:
            return event
        current = self._by_class[type(event)]
        if version == current:
            return event
        return self._upcast(data)

    def upcast(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A stored event's JSON object brought to its type's current version."""
        tag = raw.get(self.tag_field)
        current = self.current.get(tag) if isinstance(tag, str) else None
        if current is None or not isinstance(tag, str):
            raise EventVersionError(f"unknown event type {tag!r}")
        version = raw.get("v", 1)
        if not isinstance(version, int) or version < 1:
            raise EventVersionError(f"{tag}: schema version {version!r} is not a positive integer")
        if version > current:
            raise EventVersionError(f"{tag}: schema version {version} is newer than this code knows ({current})")
        while version < current:
            step = self._upcasters.get((tag, version))
            if step is None:
                raise EventVersionError(f"{tag}: no upcaster from schema version {version} (current: {current})")
            raw = step(dict(raw))
            version += 1
            raw["v"] = version
            raw[self.tag_field] = tag
        return raw

    def _older(self, data: bytes) -> bool:
        """Whether these bytes hold an event of a known type at a version before its current one."""
        try:
            head = msgspec.json.decode(data, type=dict[str, Any])
        except msgspec.DecodeError:
            return False
        version, tag = head.get("v", 1), head.get(self.tag_field)
        return isinstance(tag, str) and isinstance(version, int) and version < self.current.get(tag, 0)

    def _upcast(self, data: bytes) -> E:
        raw = msgspec.json.decode(data)
        if not isinstance(raw, dict):
            raise EventVersionError("an event is a JSON object")
        return msgspec.convert(self.upcast(raw), self.event_type)

    def current_bytes(self, data: bytes) -> bytes:
        """The stored bytes when the event is at its current version, else the upcast event
        encoded (what history and replay show by default)."""
        event = self.decode(data)
        if not self._versioned or msgspec.json.decode(data, type=_Version).v == event.v:  # type: ignore[attr-defined]
            return data
        return msgspec.json.encode(event)


class _Version(msgspec.Struct):
    v: int = 1
