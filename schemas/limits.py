"""Bounds every producer and the worker agree on."""

import re
from typing import Final

__all__ = [
    "AGENT_ID_MAX_LENGTH",
    "AGENT_ID_PATTERN",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_RESERVATION_TTL_SECONDS",
    "DEFAULT_THRESHOLDS",
    "MAX_BALANCE",
    "MAX_RESERVATION_TTL_SECONDS",
    "MAX_THRESHOLDS",
    "MAX_TOKENS",
    "MESSAGE_ID_MAX_LENGTH",
    "RESERVATION_ID_PATTERN",
    "TIMEZONE_MAX_LENGTH",
    "TIMEZONE_PATTERN",
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

#: A hold lives at most a day: longer is a leak, not a reservation.
MAX_RESERVATION_TTL_SECONDS: Final = 86400
#: The worker's default (``BUDGET_RESERVATION_TTL``) when ``reserve`` names none.
DEFAULT_RESERVATION_TTL_SECONDS: Final = 300
RESERVATION_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"

#: Usage thresholds (percent of allocated tokens) of a budget nobody configured.
DEFAULT_THRESHOLDS: Final = (50, 80, 100)
#: Thresholds are whole percents 1..100, so at most 100 distinct ones.
MAX_THRESHOLDS: Final = 100

#: IANA time zone names: ``Area/Location[/Sub]``, ``UTC``, ``Etc/GMT+5``. No
#: dots, so no name can reach outside the time zone database.
TIMEZONE_PATTERN: Final = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9][A-Za-z0-9_+-]*)*$"
TIMEZONE_MAX_LENGTH: Final = 64

_AGENT_ID = re.compile(AGENT_ID_PATTERN)


def is_valid_agent_id(value: str) -> bool:
    return _AGENT_ID.fullmatch(value) is not None
