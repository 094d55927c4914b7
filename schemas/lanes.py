"""Tell, without asking the broker, which lane queue an ``x-modulus-hash`` exchange picks.

That exchange (plugin rabbitmq_sharding) sends a message to destination number
``erlang:phash2(RoutingKeys, 2^27) rem N`` of its N bound queues, so knowing the lane of a key
means computing ``phash2`` here. ``phash2`` is a port of erts' ``make_hash2`` for the one term
that exchange hashes, a list of binaries; its values are stable across OTP releases.
"""

import struct
from collections.abc import Sequence
from functools import lru_cache

from .topology import lane_queue_name

__all__ = ["PHASH2_RANGE", "LaneMap", "lane_of", "phash2"]

PHASH2_RANGE = 2**27
"""The range ``rabbit_sharding_exchange_type_modulus_hash`` passes to ``erlang:phash2/2``."""

_M = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # HCONST; HCONST_n below are (HCONST * n) mod 2^32
_HCONST_2 = 0x3C6EF372
_HCONST_13 = 0x08D12E65
_NIL_DEF = 0x2  # tag_val_def() of [] in erl_term.h, mixed in for the list's tail
_NIL_ALONE = 3468870702  # make_hash2([]): what [] hashes to when the hash so far is 0
_WORDS = struct.Struct("<3I")


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """Bob Jenkins' ``MIX(a, b, c)`` of three 32-bit words."""
    a = ((a - b - c) & _M) ^ (c >> 13)
    b = ((b - c - a) & _M) ^ ((a << 8) & _M)
    c = ((c - a - b) & _M) ^ (b >> 13)
    a = ((a - b - c) & _M) ^ (c >> 12)
    b = ((b - c - a) & _M) ^ ((a << 16) & _M)
    c = ((c - a - b) & _M) ^ (b >> 5)
    a = ((a - b - c) & _M) ^ (c >> 3)
    b = ((b - c - a) & _M) ^ ((a << 10) & _M)
    c = ((c - a - b) & _M) ^ (b >> 15)
    return a, b, c


def _block_hash(key: bytes, initval: int) -> int:
    """erts ``block_hash``: Jenkins' lookup2 over the bytes of ``key``, seeded with ``initval``."""
    length = len(key)
    a = b = _GOLDEN
    c = initval
    end = length - length % 12
    for offset in range(0, end, 12):
        x, y, z = _WORDS.unpack_from(key, offset)
        a, b, c = _mix((a + x) & _M, (b + y) & _M, (c + z) & _M)
    # The last 0..11 bytes go little-endian into a, b and the upper three bytes of c, whose
    # low byte takes the length.
    a += int.from_bytes(key[end : end + 4], "little")
    b += int.from_bytes(key[end + 4 : end + 8], "little")
    c += (int.from_bytes(key[end + 8 :], "little") << 8) + length
    return _mix(a & _M, b & _M, c & _M)[2]


def phash2(keys: Sequence[bytes], range_: int = 2**32) -> int:
    """``erlang:phash2(Keys, Range)`` for a list of binaries ``Keys``; in ``0 .. range_ - 1``.

    As in the BIF, ``range_`` must be in ``1 .. 2**32`` and is applied as ``hash rem Range``
    (for a power of two that is the same as masking the low bits).
    """
    if not 1 <= range_ <= 2**32:
        raise ValueError(f"phash2 range must be in 1..2**32, got {range_}")
    h = 0
    for key in keys:  # each cons cell's head, in order; the tail is hashed after the loop
        con = (_HCONST_13 + h) & _M  # a binary is seeded with the hash of what came before
        h = _block_hash(key, con) if key else con
    # The closing [] (NIL); the empty list itself, or a hash that happens to be 0, short-cuts.
    h = _NIL_ALONE if h == 0 else _mix(_HCONST_2 + _NIL_DEF, _HCONST_2, h)[2]
    return h % range_


def lane_of(routing_key: str, queue_names: Sequence[str]) -> str:
    """The queue an ``x-modulus-hash`` exchange routes ``routing_key`` to among ``queue_names``.

    RabbitMQ 3.10 lists an exchange's destinations in the term order of its route table: by binding
    key, then by the bytes of the queue name. So this holds when every lane is bound once, all with
    the same binding key (checked against a 3.10.8 broker, for any order of binding).
    """
    if not queue_names:
        raise ValueError("lane_of needs at least one queue name")
    ordered = sorted(queue_names)  # code-point order is UTF-8 byte order, and cheaper to sort
    return ordered[phash2([routing_key.encode()], PHASH2_RANGE) % len(ordered)]


class LaneMap:
    """Which lane each agent belongs to in a deployment of ``partitions`` lanes.

    The lane is a pure function of the agent id and the lane count: the one
    ``budget.lanes`` picks among ``budget.lane.000`` … bound with one key each.
    Answers are cached per agent, since hashing costs microseconds.
    """

    def __init__(self, partitions: int, *, cache_size: int = 1 << 16) -> None:
        if partitions < 1:
            raise ValueError("a deployment has at least one lane")
        self.partitions = partitions
        names = [lane_queue_name(index) for index in range(partitions)]
        #: Lane indexes in the order the exchange lists its destinations.
        self._by_position = sorted(range(partitions), key=names.__getitem__)
        self.index_of = lru_cache(maxsize=cache_size)(self._index_of)

    def _index_of(self, agent_id: str) -> int:
        hashed = phash2([agent_id.encode()], PHASH2_RANGE)
        return self._by_position[hashed % self.partitions]
