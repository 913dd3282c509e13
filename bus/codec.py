"""JSON codec for messages: encoders/decoders built once, errors mapped to codes."""

from __future__ import annotations

import itertools
import operator
import re
from typing import Any, Generic, TypeVar

import msgspec

from bus.errors import MalformedError, ValidationError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")

# Deepest nesting of arrays/objects a request body may have. msgspec itself recurses until
# Python's limit (~1000 levels, a RecursionError), and bodies hundreds deep decode but then
# break readers downstream (projections, `json` in the CLI). Real bodies are 2-5 deep.
MAX_DEPTH = 32
# A string runs to its closing quote or, unterminated, to the end of the body: without the end
# alternative a body of many escaped quotes made every quote start a scan to the end (64 KB took
# 8 s, quadratic; now linear). The body is invalid JSON anyway: the decoder then refuses it.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\Z)', re.DOTALL)
# Brackets to +1 (opening, as 2) and -1 (closing, as 0); every other byte dropped.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def check_depth(data: bytes) -> None:
    """Raise MalformedError when the JSON in data nests arrays/objects deeper than MAX_DEPTH."""
    # Hot path: a body with at most MAX_DEPTH opening brackets cannot be too deep, and counting
    # bytes is ~100x cheaper than the scan below (which must skip brackets inside strings).
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return
    # Outside strings: without escapes, every other piece between quotes (the regex handles
    # escaped quotes, and is ~10x slower: a batch of 100 tasks took 125 µs that way).
    structure = _STRING.sub(b"", data) if b"\\" in data else b"".join(data.split(b'"')[::2])
    steps = structure.translate(_BRACKET_STEPS, _NOT_BRACKETS)
    # depth after the i-th bracket = sum of its steps - i (each step is the bracket's +1/-1, plus 1)
    if steps and max(map(operator.sub, itertools.accumulate(steps), itertools.count(1))) > MAX_DEPTH:
        raise MalformedError(f"request body nests deeper than {MAX_DEPTH} levels")


def decode_json(data: bytes) -> Any:
    """Untyped JSON with the same depth bound and errors as `Decoder` (for the HTTP edge)."""
    check_depth(data)
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise MalformedError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedError(f"request body nests deeper than {MAX_DEPTH} levels") from None


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) as compact JSON."""
    return _encoder.encode(obj)


def _bounded(type_: Any) -> bool:
    """Whether every value of this type nests to a depth its schema fixes: no `Any`, no
    recursion, no Struct that skips unknown fields (a skipped value may nest at will). Bodies of
    such a type need no depth check — msgspec refuses a nested value where the schema has none."""
    ti = msgspec.inspect

    def walk(node: Any, path: frozenset[Any]) -> bool:
        if isinstance(node, ti.AnyType | ti.CustomType):
            return False
        if isinstance(node, ti.StructType | ti.DataclassType | ti.TypedDictType | ti.NamedTupleType):
            if node.cls in path:
                return False  # recursive
            if isinstance(node, ti.StructType) and not node.forbid_unknown_fields:
                return False
            return all(walk(f.type, path | {node.cls}) for f in node.fields)
        if isinstance(node, ti.UnionType):
            return all(walk(t, path) for t in node.types)
        if isinstance(node, ti.ListType | ti.SetType | ti.FrozenSetType | ti.VarTupleType):
            return walk(node.item_type, path)
        if isinstance(node, ti.TupleType):
            return all(walk(t, path) for t in node.item_types)
        if isinstance(node, ti.DictType):
            return walk(node.key_type, path) and walk(node.value_type, path)
        return True  # scalars, Raw (kept as bytes), enums, literals, metadata-wrapped scalars

    try:
        return walk(ti.type_info(type_), frozenset())
    except Exception:  # noqa: BLE001 - a type inspect cannot read: check every body
        return False


class Decoder(Generic[T]):
    """A reusable strict JSON decoder that raises coded errors naming the field. Bodies are
    checked for nesting depth first unless the type bounds it (`_bounded`): the check scans
    every byte of a large body (a worker's batch of a pull's claims)."""

    __slots__ = ("_decoder", "_check")

    def __init__(self, type_: type[T]) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)
        self._check = not _bounded(type_)

    def decode(self, data: bytes) -> T:
        if self._check:
            check_depth(data)
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise validation_error(exc) from None
        except msgspec.DecodeError as exc:
            raise MalformedError(f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # a guard, should check_depth ever disagree with msgspec's parser
            raise MalformedError(f"request body nests deeper than {MAX_DEPTH} levels") from None


def validation_error(exc: msgspec.ValidationError, within: str | None = None) -> ValidationError:
    """Turn msgspec's message (`... - at `$.lines[0].sku``) into a named-field error; `within`
    names the field that was validated on its own (e.g. a task's `payload`)."""
    text = str(exc)
    match = _PATH.search(text)
    if match:
        field = match.group("path") or None
        message = text[: match.start()]
    else:
        field, message = None, text
    if within:
        field = (within + ("" if field.startswith("[") else ".") + field) if field else within
    if message.startswith("Object missing required field"):
        missing = message.split("`")[1]
        field = f"{field}.{missing}" if field else missing
        message = "field is required"
    elif message.startswith("Object contains unknown field"):
        unknown = message.split("`")[1]
        field = f"{field}.{unknown}" if field else unknown
        message = "unknown field"
    return ValidationError(f"{field}: {message}" if field else message, field=field)
