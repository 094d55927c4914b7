"""Survive AMQP property strings that are not UTF-8.

AMQP lets any client (Go, Java, C) send arbitrary bytes in a short-string
property or a header name. pamqp decodes them strictly, so one such delivery
raises inside aiormq's frame reader and drops the whole connection; on
redelivery it drops it again, until the broker's delivery limit dead-letters
it together with the innocent messages behind it on the lane. ``install``
makes pamqp decode those bytes with ``surrogateescape`` so the delivery
reaches the lane, whose decoder refuses it like any other bad message
(``has_invalid_text``), and ``clean_text`` makes such text publishable again
for the dead letter.
"""

import struct
from typing import Any

from pamqp import common, decode

__all__ = ["clean_text", "has_invalid_text", "install"]

_installed = False


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
        return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err


def _field_table(value: bytes) -> tuple[int, common.FieldTable]:
    # pamqp's field_table, but with tolerant key decoding.
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, Any] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "surrogateescape")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install() -> None:
    """Patch pamqp's decoders once per process (idempotent)."""
    global _installed
    if _installed:
        return
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["table"] = _field_table
    decode.TABLE_MAPPING[b"F"] = _field_table
    _installed = True


def has_invalid_text(value: object) -> bool:
    """True if ``value`` (a str, or a header table) holds bytes that were not UTF-8."""
    if isinstance(value, str):
        if value.isascii():  # the common case, and the cheap one
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_invalid_text(k) or has_invalid_text(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_invalid_text(v) for v in value)
    return False


def clean_text(value: Any) -> Any:
    """``value`` as it can be sent again: undecodable bytes in text shown as
    ``\\xNN`` escapes, and ``bytes`` (pamqp's decoding of a long-string header
    that is not UTF-8, which it cannot encode back) as a byte array, every
    byte kept."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, str):
        if not has_invalid_text(value):
            return value
        raw = value.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {clean_text(k): clean_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_text(v) for v in value]
    return value
