"""The HTTP endpoint alone: routes and what /healthz makes of the reports it is given."""

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from token_budget.worker.endpoint import Endpoint, HealthReport

Report = list[HealthReport | None]


@pytest.fixture
def served() -> Iterator[tuple[Endpoint, Report]]:
    registry = CollectorRegistry()
    Counter("probe_things", "for the test", registry=registry).inc(3)
    latest: Report = [None]
    endpoint = Endpoint("127.0.0.1", 0, registry, lambda: latest[0], stale_after=5).start()
    yield endpoint, latest
    endpoint.close()


def get(endpoint: Endpoint, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{endpoint.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def healthz(endpoint: Endpoint) -> tuple[int, dict[str, Any]]:
    status, body = get(endpoint, "/healthz")
    return status, json.loads(body)


def test_metrics_are_served_in_the_prometheus_text_format(
    served: tuple[Endpoint, Report],
) -> None:
    status, body = get(served[0], "/metrics")
    assert status == 200
    assert "probe_things_total 3.0" in body.decode()


def test_an_unknown_path_is_404_and_names_the_two_routes(served: tuple[Endpoint, Report]) -> None:
    status, body = get(served[0], "/")
    assert status == 404 and b"/metrics" in body and b"/healthz" in body


def test_healthz_is_503_before_the_first_check(served: tuple[Endpoint, Report]) -> None:
    assert healthz(served[0]) == (
        503,
        {"status": "unavailable", "reason": "worker: starting", "worker": "starting"},
    )


def test_healthz_is_200_when_every_check_is_ok(served: tuple[Endpoint, Report]) -> None:
    endpoint, latest = served
    latest[0] = HealthReport({"broker": "ok", "database": "ok"}, extra={"partitions": [1]})
    assert healthz(endpoint) == (
        200,
        {"status": "ok", "broker": "ok", "database": "ok", "partitions": [1]},
    )


def test_healthz_is_503_and_says_which_check_failed(served: tuple[Endpoint, Report]) -> None:
    endpoint, latest = served
    latest[0] = HealthReport({"broker": "ok", "database": "unreachable (OSError)"})
    status, body = healthz(endpoint)
    assert (status, body["reason"]) == (503, "database: unreachable (OSError)")


def test_a_stale_report_is_a_stuck_worker(served: tuple[Endpoint, Report]) -> None:
    endpoint, latest = served
    latest[0] = HealthReport({"broker": "ok"}, at=time.monotonic() - 60)
    status, body = healthz(endpoint)
    assert status == 503 and "stuck" in body["reason"]
