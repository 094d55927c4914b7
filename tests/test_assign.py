"""Which partitions a worker runs (worker/pool/pool.py ``assign``): a table and
properties, no broker and no database.

Every worker computes its own share from the same sorted list of live
workers; the shares must fit together without any worker talking to another.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from token_budget.worker.pool.pool import assign


@pytest.mark.parametrize(
    ("live", "partitions", "worker", "expected"),
    [
        pytest.param([], 4, "a", set(), id="nobody_live"),
        pytest.param(["a"], 4, "a", {0, 1, 2, 3}, id="alone_takes_all"),
        pytest.param(["a", "b"], 4, "a", {0, 2}, id="first_of_two"),
        pytest.param(["a", "b"], 4, "b", {1, 3}, id="second_of_two"),
        pytest.param(["a", "b", "c"], 4, "a", {0, 3}, id="first_of_three_takes_the_rest"),
        pytest.param(["a", "b", "c"], 4, "b", {1}, id="second_of_three"),
        pytest.param(["a", "b", "c"], 4, "c", {2}, id="third_of_three"),
        pytest.param(["a", "b"], 1, "b", set(), id="more_workers_than_partitions"),
        pytest.param(["a", "b"], 0, "a", set(), id="no_partitions"),
        pytest.param(["a", "b"], 4, "z", set(), id="not_live"),
    ],
)
def test_a_worker_owns_the_partitions_the_table_says(
    live: list[str], partitions: int, worker: str, expected: set[int]
) -> None:
    assert assign(live, partitions, worker) == expected


#: The pool's view: worker ids, sorted, each once.
pools = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=24, unique=True).map(sorted)
partition_counts = st.integers(min_value=0, max_value=256)


@given(live=pools, partitions=partition_counts)
def test_every_partition_is_assigned_to_exactly_one_live_worker(
    live: list[str], partitions: int
) -> None:
    shares = [assign(live, partitions, worker) for worker in live]
    assert sorted(p for share in shares for p in share) == list(range(partitions))


@given(live=pools, partitions=partition_counts)
def test_each_live_worker_gets_the_floor_or_the_ceiling_of_its_share(
    live: list[str], partitions: int
) -> None:
    low, high = partitions // len(live), -(-partitions // len(live))
    assert {len(assign(live, partitions, worker)) for worker in live} <= {low, high}


@given(live=pools, partitions=partition_counts, outsider=st.text(max_size=12))
def test_a_worker_not_live_gets_nothing(live: list[str], partitions: int, outsider: str) -> None:
    live = [worker for worker in live if worker != outsider]
    assert assign(live, partitions, outsider) == set()
