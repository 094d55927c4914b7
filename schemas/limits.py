"""Bounds every producer and the worker agree on."""

import re
from typing import Final

__all__ = [
    "AGENT_ID_MAX_LENGTH",
    "AGENT_ID_PATTERN",
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_BALANCE",
    "MAX_TOKENS",
    "MESSAGE_ID_MAX_LENGTH",
    "is_valid_agent_id",
]

#: Largest amount in one command. 2**53 is the largest integer every JSON
#: parser (JavaScript's Number, many others' float64) represents exactly, so an
#: amount accepted here means the same number to every client that reads it back.
MAX_TOKENS: Final = 2**53

#: Balances are 64-bit signed integers in the database.
MAX_BALANCE: Final = 2**63 - 1

AGENT_ID_MAX_LENGTH: Final = 128
#: Letters, digits and ``. _ : @ -``, starting with a letter or digit: safe in a
#: routing key, a log line, a URL path and a shell argument.
AGENT_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"

#: AMQP short strings hold at most 255 bytes.
MESSAGE_ID_MAX_LENGTH: Final = 255

DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024

_AGENT_ID = re.compile(AGENT_ID_PATTERN)


def is_valid_agent_id(value: str) -> bool:
    return _AGENT_ID.fullmatch(value) is not None
