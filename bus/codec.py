"""JSON codec for messages: encoders/decoders built once, errors mapped to codes."""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

import msgspec

from bus.errors import MalformedError, ValidationError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) as compact JSON."""
    return _encoder.encode(obj)


class Decoder(Generic[T]):
    """A reusable strict JSON decoder that raises coded errors naming the field."""

    __slots__ = ("_decoder",)

    def __init__(self, type_: type[T]) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise validation_error(exc) from None
        except msgspec.DecodeError as exc:
            raise MalformedError(f"request body is not valid JSON: {exc}") from None


def validation_error(exc: msgspec.ValidationError) -> ValidationError:
    """Turn msgspec's message (`... - at `$.lines[0].sku``) into a named-field error."""
    text = str(exc)
    match = _PATH.search(text)
    if match:
        field = match.group("path") or None
        message = text[: match.start()]
    else:
        field, message = None, text
    if message.startswith("Object missing required field"):
        missing = message.split("`")[1]
        field = f"{field}.{missing}" if field else missing
        message = "field is required"
    elif message.startswith("Object contains unknown field"):
        unknown = message.split("`")[1]
        field = f"{field}.{unknown}" if field else unknown
        message = "unknown field"
    return ValidationError(f"{field}: {message}" if field else message, field=field)
