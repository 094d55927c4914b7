"""schemas.lanes against erlang:phash2/2 of a real erl (OTP 25), and lane_of's pick of a lane.

Every table below was produced once by ``erl -noshell`` on the development machine, so these
tests need no Erlang; the property test at the end asks erl afresh, in one call, when it is on
PATH.
"""

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from token_budget.schemas.lanes import PHASH2_RANGE, lane_of, phash2

#: erlang:phash2(Keys, R) for each R here, in this order, is what the tables hold.
RANGES = (2**27, 2**32, 16, 1000)
Hashes = tuple[int, int, int, int]

ASCII = b"abcdefghijklmnopqrstuvwxyz0123456789ABCD"
HIGH = bytes(range(255, 215, -1))


def long_key(length: int) -> bytes:
    """``<< <<(I rem 251)>> || I <- lists:seq(0, Length - 1) >>``."""
    return bytes(i % 251 for i in range(length))


def hashes(keys: Sequence[bytes]) -> Hashes:
    a, b, c, d = (phash2(keys, r) for r in RANGES)
    return a, b, c, d


#: erlang:phash2([], R) for R in RANGES.
EMPTY_LIST = (113427502, 3468870702, 14, 702)

#: erlang:phash2([ASCII[:n]], R): one key of every length 0..40, around the 12-byte blocks.
ONE_ASCII_KEY_BY_LENGTH: dict[int, Hashes] = {
    0: (38220213, 440873397, 5, 397),
    1: (53691870, 3543352798, 14, 798),
    2: (84176382, 3573837310, 14, 310),
    3: (63525141, 3553186069, 5, 69),
    4: (79744603, 885050971, 11, 971),
    5: (21448453, 1497843461, 5, 461),
    6: (54048796, 859355164, 12, 164),
    7: (102740722, 3592401650, 2, 650),
    8: (77835165, 3970149277, 13, 277),
    9: (119742243, 4146274083, 3, 83),
    10: (51615447, 722704087, 7, 87),
    11: (95467487, 1840297951, 15, 951),
    12: (89208944, 3176216688, 0, 688),
    13: (93409113, 1435586393, 9, 393),
    14: (53803829, 53803829, 5, 829),
    15: (108004643, 2389706019, 3, 19),
    16: (104135151, 3862231535, 15, 535),
    17: (29686963, 3116694707, 3, 707),
    18: (60527025, 3147534769, 1, 769),
    19: (11869844, 1890918036, 4, 36),
    20: (13051121, 4039582961, 1, 961),
    21: (108035848, 2926608136, 8, 136),
    22: (16905124, 1224864676, 4, 676),
    23: (127183605, 3482626805, 5, 805),
    24: (39588657, 442241841, 1, 841),
    25: (63233603, 63233603, 3, 603),
    26: (15239953, 2431159057, 1, 57),
    27: (45796266, 3803892650, 10, 650),
    28: (16134696, 1895182888, 8, 888),
    29: (120301599, 2804656159, 15, 159),
    30: (102515586, 2384216962, 2, 962),
    31: (96732338, 1707345074, 2, 74),
    32: (22896830, 1096638654, 14, 654),
    33: (94572569, 3718451225, 9, 225),
    34: (83008603, 3975322715, 11, 715),
    35: (33844677, 302280133, 5, 133),
    36: (85467569, 2769822129, 1, 129),
    37: (1390568, 2417309672, 8, 672),
    38: (74699133, 2490618237, 13, 237),
    39: (3711118, 1345888398, 14, 398),
    40: (20497236, 960021332, 4, 332),
}

#: erlang:phash2([HIGH[:n]], R): bytes >= 0x80, which fill the top bits of every word.
ONE_HIGH_BYTES_KEY_BY_LENGTH: dict[int, Hashes] = {
    1: (91660254, 3581321182, 14, 182),
    2: (10489514, 1621102250, 10, 250),
    3: (133824039, 4294573607, 7, 607),
    4: (118610, 2147602258, 2, 258),
    5: (110963180, 1855793644, 12, 644),
    6: (76858565, 3298084037, 5, 37),
    7: (112575081, 112575081, 9, 81),
    8: (61529730, 1940577922, 2, 922),
    9: (108367617, 3195375361, 1, 361),
    10: (36459333, 4062991173, 5, 173),
    11: (100132140, 3858228524, 12, 524),
    12: (32513374, 166731102, 14, 102),
    13: (59333200, 3683211856, 0, 856),
    14: (28697625, 3115705369, 9, 369),
    15: (74220663, 3698099319, 7, 319),
    16: (92319942, 1166061766, 6, 766),
    17: (87219456, 3845315840, 0, 840),
    18: (22417272, 3780513656, 8, 656),
    19: (112266599, 246484327, 7, 327),
    20: (114341394, 1724954130, 2, 130),
    21: (48792040, 1256751592, 8, 592),
    22: (19109991, 1898158183, 7, 183),
    23: (98401736, 3185409480, 8, 480),
    24: (130892401, 3888988785, 1, 785),
    25: (105947318, 4266696886, 6, 886),
    26: (125441508, 3480884708, 4, 708),
    27: (83622359, 1157364183, 7, 183),
    28: (34354125, 1376531405, 13, 405),
    29: (37252849, 1513647857, 1, 857),
    30: (52455051, 3139462795, 11, 795),
    31: (12903414, 818209782, 6, 782),
    32: (32685204, 2314386580, 4, 580),
    33: (126728506, 3750607162, 10, 162),
    34: (97698938, 1574093946, 10, 946),
    35: (104310745, 238528473, 9, 473),
    36: (56324168, 2874896456, 8, 456),
    37: (75513299, 3699391955, 3, 955),
    38: (32936985, 2046202905, 9, 905),
    39: (72431071, 609301983, 15, 983),
    40: (38942607, 3528603535, 15, 535),
}

#: erlang:phash2([unicode:characters_to_binary(S)], R).
ONE_UNICODE_KEY: dict[str, Hashes] = {
    "é": (61451803, 1806282267, 11, 267),
    "Ω≈ç√": (69371625, 1545766633, 9, 633),
    "日本語": (101876706, 2786231266, 2, 266),
    "agent-ü": (16837700, 687926340, 4, 340),
    "🚀lane": (62425339, 1270384891, 11, 891),
    "лайн-7": (83841550, 1828672014, 14, 14),
    "\x00nul": (88419850, 1296379402, 10, 402),
    "ßßßßßßßßßßßßß": (483897, 1342661177, 9, 177),
}

#: erlang:phash2([<<"agent-...">>], R): agent ids as the worker's routing keys.
ONE_AGENT_KEY: dict[str, Hashes] = {
    "agent-7": (90853915, 2372555291, 11, 291),
    "agent-0000": (118674018, 387109474, 2, 474),
    "agent-0001": (58299361, 3145307105, 1, 105),
    "agent-0002": (109059495, 3732938151, 7, 151),
    "agent-0003": (129710114, 3753588770, 2, 770),
    "agent-0004": (65015571, 3554676499, 3, 499),
    "agent-0005": (1431285, 1746261749, 5, 749),
    "agent-0006": (112873415, 3199881159, 7, 159),
    "agent-0007": (116355533, 1324315085, 13, 85),
    "agent-0008": (46938153, 2194421801, 9, 801),
    "agent-0009": (1107409, 1107409, 1, 409),
    "agent-0010": (5603764, 3361046964, 4, 964),
    "agent-0011": (91980891, 2642117723, 11, 723),
    "agent-0012": (74690292, 2087956212, 4, 212),
    "agent-0013": (89939807, 358375263, 15, 263),
    "agent-0014": (7610149, 3363053349, 5, 349),
    "agent-0015": (86355826, 3978669938, 2, 938),
    "agent-0016": (123511148, 2942083436, 12, 436),
    "agent-0017": (72575875, 2085841795, 3, 795),
    "agent-0018": (127957341, 3617618269, 13, 269),
    "agent-0019": (132525068, 669395980, 12, 980),
    "agent-0020": (132106455, 1608501463, 7, 463),
    "agent-0021": (120943071, 657813983, 15, 983),
    "agent-0022": (40628641, 2859200929, 1, 929),
    "agent-0023": (43882664, 1654495400, 8, 400),
    "agent-0024": (91339833, 3044129849, 9, 849),
    "agent-0025": (40550775, 3798647159, 7, 159),
    "agent-0026": (49887428, 3002677444, 4, 444),
    "agent-0027": (100809825, 100809825, 1, 825),
    "agent-0028": (111027840, 3198035584, 0, 584),
    "agent-0029": (60076947, 3683955603, 3, 603),
    "agent-0030": (86484552, 1160226376, 8, 376),
    "agent-0031": (5813235, 3629691891, 3, 891),
    "agent-0032": (127908082, 798996722, 2, 722),
    "agent-0033": (76196398, 3028986414, 14, 414),
    "agent-0034": (104126688, 1177868512, 0, 512),
    "agent-0035": (44746327, 2460665431, 7, 431),
    "agent-0036": (9457320, 814763688, 8, 688),
    "agent-0037": (1689460, 1746519924, 4, 924),
    "agent-0038": (120097748, 4146629588, 4, 588),
    "agent-0039": (10566875, 3231792347, 11, 347),
    "agent-0040": (33574737, 2449493841, 1, 841),
    "agent-0041": (11185885, 1353363165, 13, 165),
    "agent-0042": (133546463, 1073070559, 15, 559),
    "agent-0043": (18436118, 18436118, 6, 118),
    "agent-0044": (132202027, 2011250219, 11, 219),
    "agent-0045": (77732413, 77732413, 13, 413),
    "agent-0046": (54343218, 4215092786, 2, 786),
    "agent-0047": (69669943, 1546064951, 7, 951),
    "agent-0048": (92467279, 2105733199, 15, 199),
    "agent-0049": (74463280, 3161471024, 0, 24),
    "agent-0050": (78647603, 4239397171, 3, 171),
    "agent-0051": (1499444, 2685854004, 4, 4),
    "agent-0052": (81121788, 1691734524, 12, 524),
    "agent-0053": (39892084, 2455811188, 4, 188),
    "agent-0054": (23971332, 2037237252, 4, 252),
    "agent-0055": (18142646, 4044674486, 6, 486),
    "agent-0056": (32580897, 2851153185, 1, 185),
    "agent-0057": (89541229, 3981855341, 13, 341),
    "agent-0058": (87614351, 624485263, 15, 263),
    "agent-0059": (123911111, 929217479, 7, 479),
    "agent-0060": (101709145, 638580057, 9, 57),
    "agent-0061": (101834500, 2920406788, 4, 788),
    "agent-0062": (18480393, 4179229961, 9, 961),
    "agent-0063": (103487422, 3458930622, 14, 622),
    "agent-0064": (60648939, 3416092139, 11, 139),
    "agent-0065": (69381220, 203598948, 4, 948),
    "agent-0066": (98584635, 98584635, 11, 635),
    "agent-0067": (43673510, 714762150, 6, 150),
    "agent-0068": (129204142, 3753082798, 14, 798),
    "agent-0069": (106250968, 2924823256, 8, 256),
    "agent-0070": (6623652, 1751454116, 4, 116),
    "agent-0071": (126880203, 126880203, 11, 203),
    "agent-0072": (111342477, 2258826125, 13, 125),
    "agent-0073": (64209074, 1406386354, 2, 354),
    "agent-0074": (91583433, 1165325257, 9, 257),
    "agent-0075": (111685040, 380120496, 0, 496),
    "agent-0076": (50409955, 2600546787, 3, 787),
    "agent-0077": (72907767, 72907767, 7, 767),
    "agent-0078": (6232519, 3093240263, 7, 263),
    "agent-0079": (19269018, 1495664026, 10, 26),
    "agent-0080": (128132481, 530785665, 1, 665),
    "agent-0081": (62978966, 2613115798, 6, 798),
    "agent-0082": (106568508, 1180310332, 12, 332),
    "agent-0083": (116211267, 787299907, 3, 907),
    "agent-0084": (22231788, 961755884, 12, 884),
    "agent-0085": (49582719, 3807679103, 15, 103),
    "agent-0086": (96933434, 768022074, 10, 74),
    "agent-0087": (132860517, 3756739173, 5, 173),
    "agent-0088": (16798558, 1224758110, 14, 110),
    "agent-0089": (96710951, 767799591, 7, 591),
    "agent-0090": (55171129, 592042041, 9, 41),
    "agent-0091": (37453384, 3929767496, 8, 496),
    "agent-0092": (68225025, 4228974593, 1, 593),
    "agent-0093": (123395570, 123395570, 2, 570),
    "agent-0094": (33775100, 1241734652, 12, 652),
    "agent-0095": (64684144, 2346385520, 0, 520),
    "agent-0096": (128011460, 1201753284, 4, 284),
    "agent-0097": (12219543, 3367662743, 7, 743),
    "agent-0098": (48746326, 2196229974, 6, 974),
    "agent-0099": (27076283, 3785172667, 11, 667),
}

#: erlang:phash2(Keys, R) for lists of two and three binaries.
SEVERAL_KEYS: list[tuple[tuple[bytes, ...], Hashes]] = [
    (
        (
            b"",
            b"",
        ),
        (8578898, 1484973906, 2, 906),
    ),
    (
        (
            b"a",
            b"b",
        ),
        (3094894, 3761191278, 14, 278),
    ),
    (
        (
            b"b",
            b"a",
        ),
        (109821296, 4002135408, 0, 408),
    ),
    (
        (
            b"agent-1",
            b"agent-2",
        ),
        (32128001, 1240087553, 1, 553),
    ),
    (
        (
            b"",
            b"agent-7",
        ),
        (22112534, 1766942998, 6, 998),
    ),
    (
        (
            b"agent-7",
            b"",
        ),
        (15581143, 4042112983, 7, 983),
    ),
    (
        (
            b"abcdefghijkl",
            b"abcdefghijklm",
        ),
        (89521513, 2371222889, 9, 889),
    ),
    (
        (
            b"x",
            b"y",
            b"z",
        ),
        (34939805, 3793036189, 13, 189),
    ),
]

#: erlang:phash2([long_key(n)], R): binaries longer than a routing key may be.
ONE_LONG_KEY_BY_LENGTH: dict[int, Hashes] = {
    100: (73332781, 2220816429, 13, 429),
    255: (42229048, 3263454520, 8, 520),
    256: (72999933, 3965314045, 13, 45),
    1_000: (24618574, 1366795854, 14, 854),
    4_096: (70948588, 2084214508, 12, 508),
    65_536: (113927758, 3066717774, 14, 774),
    100_003: (53024022, 858330390, 6, 390),
}

#: erlang:phash2(Keys, R) for R in [1, 2, 3, 7, 2147483648, 4294967295].
ODD_RANGES = (1, 2, 3, 7, 2_147_483_648, 4_294_967_295)
KEYS_OVER_ODD_RANGES: list[tuple[tuple[bytes, ...], tuple[int, ...]]] = [
    ((), (0, 0, 0, 3, 1321387054, 3468870702)),
    ((b"agent-7",), (0, 1, 2, 1, 225071643, 2372555291)),
    (
        (
            b"a",
            b"b",
        ),
        (0, 0, 0, 5, 1613707630, 3761191278),
    ),
]


def test_empty_list_hashes_like_erlang() -> None:
    assert hashes([]) == EMPTY_LIST


@pytest.mark.parametrize("length", sorted(ONE_ASCII_KEY_BY_LENGTH))
def test_one_ascii_key_of_each_length_0_to_40_hashes_like_erlang(length: int) -> None:
    assert hashes([ASCII[:length]]) == ONE_ASCII_KEY_BY_LENGTH[length]


@pytest.mark.parametrize("length", sorted(ONE_HIGH_BYTES_KEY_BY_LENGTH))
def test_one_key_of_high_bytes_hashes_like_erlang(length: int) -> None:
    assert hashes([HIGH[:length]]) == ONE_HIGH_BYTES_KEY_BY_LENGTH[length]


@pytest.mark.parametrize("key", sorted(ONE_UNICODE_KEY))
def test_one_unicode_key_hashes_its_utf8_bytes_like_erlang(key: str) -> None:
    assert hashes([key.encode()]) == ONE_UNICODE_KEY[key]


@pytest.mark.parametrize("agent", sorted(ONE_AGENT_KEY))
def test_one_agent_id_key_hashes_like_erlang(agent: str) -> None:
    assert hashes([agent.encode()]) == ONE_AGENT_KEY[agent]


@pytest.mark.parametrize(("keys", "expected"), SEVERAL_KEYS, ids=repr)
def test_several_keys_hash_in_order_like_erlang(keys: tuple[bytes, ...], expected: Hashes) -> None:
    assert hashes(keys) == expected


@pytest.mark.parametrize("length", sorted(ONE_LONG_KEY_BY_LENGTH))
def test_one_long_key_hashes_like_erlang(length: int) -> None:
    assert hashes([long_key(length)]) == ONE_LONG_KEY_BY_LENGTH[length]


@pytest.mark.parametrize(("keys", "expected"), KEYS_OVER_ODD_RANGES, ids=repr)
def test_any_range_from_1_to_2_pow_32_is_applied_as_rem_like_erlang(
    keys: tuple[bytes, ...], expected: tuple[int, ...]
) -> None:
    assert tuple(phash2(keys, r) for r in ODD_RANGES) == expected


def test_default_range_is_the_full_32_bit_hash() -> None:
    assert phash2([b"agent-7"]) == ONE_AGENT_KEY["agent-7"][1]
    assert phash2([]) == EMPTY_LIST[1]


@pytest.mark.parametrize("range_", [0, -1, 2**32 + 1])
def test_range_outside_1_to_2_pow_32_is_rejected_as_erlang_badarg(range_: int) -> None:
    with pytest.raises(ValueError, match="range"):
        phash2([b"agent-7"], range_)


def test_modulus_hash_range_is_2_pow_27() -> None:
    assert PHASH2_RANGE == 134_217_728


# lane_of: lists:nth(phash2(RoutingKeys, 2^27) rem N + 1, Destinations), where RabbitMQ 3.10 has
# Destinations in route-table order: for lanes all bound with one binding key, by name bytes.

LANES = [f"budget.lane.{i:03d}" for i in range(16)]

#: Where RabbitMQ 3.10.8's x-modulus-hash exchange put these routing keys among LANES.
BROKER_ROUTED_16_LANES = {
    "agent-0000": "budget.lane.002",
    "agent-0001": "budget.lane.001",
    "agent-0002": "budget.lane.007",
    "agent-0003": "budget.lane.002",
    "agent-0004": "budget.lane.003",
    "agent-0005": "budget.lane.005",
    "agent-7": "budget.lane.011",
    "": "budget.lane.005",
    "é": "budget.lane.011",
    "日本語": "budget.lane.002",
    "608041f7-8b4e-09db-ad92-c7d6ee99c03d": "budget.lane.011",
    "f35b15bf-b870-3835-bdcc-489cefa65685": "budget.lane.002",
    "3ac3aeaf-1e59-5520-12c8-3c23a22845d1": "budget.lane.008",
    "f1f8665c-201f-0631-848a-58c50e46b510": "budget.lane.002",
}

#: The same for seven lanes bound in this (shuffled) order, whose names sort by bytes
#: differently from by number.
SEVEN_LANES_BOUND = [
    "budget.lane.101",
    "budget.lane.3",
    "budget.lane.1000",
    "budget.lane.2",
    "budget.lane.11",
    "budget.lane.20",
    "budget.lane.999",
]
BROKER_ROUTED_7_LANES = {
    "agent-0000": "budget.lane.101",
    "agent-0001": "budget.lane.101",
    "agent-0002": "budget.lane.999",
    "agent-0003": "budget.lane.11",
    "agent-0004": "budget.lane.3",
    "agent-0005": "budget.lane.11",
    "agent-0006": "budget.lane.20",
    "agent-0007": "budget.lane.1000",
    "agent-7": "budget.lane.3",
    "": "budget.lane.2",
}


def test_lane_of_picks_hash_rem_lane_count_among_sorted_names() -> None:
    for agent, by_range in ONE_AGENT_KEY.items():
        assert lane_of(agent, LANES) == LANES[by_range[0] % 16]
        assert lane_of(agent, LANES[:1]) == LANES[0]


@pytest.mark.parametrize("key", sorted(BROKER_ROUTED_16_LANES))
def test_lane_of_predicts_the_broker_for_16_lanes(key: str) -> None:
    assert lane_of(key, LANES) == BROKER_ROUTED_16_LANES[key]


@pytest.mark.parametrize("key", sorted(BROKER_ROUTED_7_LANES))
def test_lane_of_predicts_the_broker_for_7_lanes_named_out_of_numeric_order(key: str) -> None:
    assert lane_of(key, SEVEN_LANES_BOUND) == BROKER_ROUTED_7_LANES[key]


def test_lane_of_ignores_the_order_queue_names_are_given_in() -> None:
    shuffled = LANES[:]
    random.Random(7).shuffle(shuffled)
    for agent in ONE_AGENT_KEY:
        assert lane_of(agent, shuffled) == lane_of(agent, LANES)


def test_lane_of_orders_names_by_bytes_not_by_number() -> None:
    names = ["budget.lane.2", "budget.lane.1000", "budget.lane.101", "budget.lane.11"]
    by_bytes = ["budget.lane.1000", "budget.lane.101", "budget.lane.11", "budget.lane.2"]
    for agent, by_range in ONE_AGENT_KEY.items():
        assert lane_of(agent, names) == by_bytes[by_range[0] % 4]


def test_lane_of_orders_non_ascii_names_by_their_utf8_bytes() -> None:
    names = ["lane-é", "lane-z", "lane-\U0001f680", "lane-Z", "lane-ÿ"]
    by_bytes = sorted(names, key=str.encode)
    assert [n.encode() for n in by_bytes] == sorted(n.encode() for n in names)
    for agent, by_range in ONE_AGENT_KEY.items():
        assert lane_of(agent, names) == by_bytes[by_range[0] % len(names)]


def test_lane_of_without_queues_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        lane_of("agent-7", [])


# Against erl itself, when it is here: one erl run for a whole batch of random binaries.

ERL = shutil.which("erl")
ERL_EVAL = (
    "[Path] = init:get_plain_arguments(),"
    "{ok, [Ranges | Terms]} = file:consult(Path),"
    '[io:format("~w~n", [[erlang:phash2(T, R) || R <- Ranges]]) || T <- Terms],'
    "halt()."
)


def erl_phash2(batch: Sequence[Sequence[bytes]], ranges: Sequence[int]) -> list[list[int]]:
    """``erlang:phash2(Keys, R)`` for every ``Keys`` in ``batch`` and ``R`` in ``ranges``."""

    def binary(key: bytes) -> str:
        return "<<" + ",".join(map(str, key)) + ">>"

    lines = [f"[{','.join(map(str, ranges))}]."]
    lines += [f"[{','.join(map(binary, keys))}]." for keys in batch]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "terms")
        with open(path, "w") as terms:
            terms.write("\n".join(lines) + "\n")
        assert ERL is not None
        out = subprocess.run(
            [ERL, "-noshell", "-eval", ERL_EVAL, "-extra", path],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    return [[int(x) for x in line.strip("[]").split(",")] for line in out.split()]


keys_lists = st.lists(
    st.one_of(st.binary(max_size=40), st.binary(min_size=40, max_size=300)), max_size=3
)


@pytest.mark.skipif(ERL is None, reason="erl is not on PATH")
@settings(
    max_examples=1,
    phases=[Phase.generate],
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(st.lists(keys_lists, min_size=200, max_size=200))
def test_random_binaries_hash_like_erl(batch: list[list[bytes]]) -> None:
    ranges = (*RANGES, 7, 2**32 - 1)
    expected = erl_phash2(batch, ranges)
    assert len(expected) == len(batch)
    wrong = [
        (keys, got, want)
        for keys, want in zip(batch, expected, strict=True)
        if (got := [phash2(keys, r) for r in ranges]) != want
    ]
    assert not wrong
