"""``GET /metrics`` and ``GET /healthz`` on ``BUDGET_METRICS_PORT``.

A WSGI app on a thread of its own, which is how prometheus-client serves
(``start_http_server``), plus the health route it lacks. The thread only
reads: the worker's event loop writes a ``HealthReport`` every
``BUDGET_HEALTH_INTERVAL`` and ``/healthz`` answers from the latest one, so a
scrape never waits on the broker or the database, and a report gone stale
(a frozen loop) is itself a failure.
"""

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["Endpoint", "HealthReport", "children_health"]


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What ``/healthz`` says: each check "ok" or why not, and when it was made."""

    checks: dict[str, str]
    #: ``time.monotonic()`` of the check.
    at: float = field(default_factory=time.monotonic)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return all(value == "ok" for value in self.checks.values())

    def body(self) -> dict[str, Any]:
        failing = [f"{name}: {value}" for name, value in self.checks.items() if value != "ok"]
        status = {"status": "ok" if self.healthy else "unavailable"}
        reason = {"reason": "; ".join(failing)} if failing else {}
        return {**status, **reason, **self.checks, **self.extra}


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood stderr; the worker logs what matters."""


class Endpoint:
    """Serves ``registry`` and ``health()`` until ``close()``."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], HealthReport | None],
        *,
        stale_after: float,
    ) -> None:
        """``stale_after``: seconds after which a report no longer counts."""
        self._metrics = make_wsgi_app(registry)
        self._health = health
        self._stale_after = stale_after
        self._server = make_server(
            host, port, self._app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-endpoint", daemon=True
        )

    @property
    def port(self) -> int:
        """The port bound (the one asked for, or the system's pick for 0)."""
        return int(self._server.server_address[1])

    def start(self) -> "Endpoint":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return self._healthz(start_response)
        if path == "/metrics":
            served: Iterable[bytes] = self._metrics(environ, start_response)
            return served
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: GET /metrics or GET /healthz\n"]

    def _healthz(self, start_response: StartResponse) -> Iterable[bytes]:
        report = self._health()
        if report is None:
            report = HealthReport({"worker": "starting"})
        elif (age := time.monotonic() - report.at) > self._stale_after:
            report = HealthReport({"worker": f"no health check for {age:.0f} s: stuck?"})
        status = "200 OK" if report.healthy else "503 Service Unavailable"
        body = json.dumps(report.body()).encode()
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]


def children_health(registry: CollectorRegistry, expected: int, stale_after: float) -> HealthReport:
    """The parent's health with ``--processes N``: every child reported healthy lately.

    Read from the children's own ``budget_worker_healthy`` and
    ``budget_worker_health_checked_seconds`` (one sample per live pid).
    """
    healthy: dict[str, float] = {}
    checked: dict[str, float] = {}
    for family in registry.collect():
        if family.name == "budget_worker_healthy":
            healthy = {s.labels.get("pid", ""): s.value for s in family.samples}
        elif family.name == "budget_worker_health_checked_seconds":
            checked = {s.labels.get("pid", ""): s.value for s in family.samples}
    now = time.time()
    fresh = {pid for pid, at in checked.items() if now - at <= stale_after}
    ok = sorted(pid for pid, value in healthy.items() if value == 1 and pid in fresh)
    state = "ok" if len(ok) >= expected else f"{len(ok)} of {expected} healthy"
    return HealthReport({"children": state}, extra={"healthy_pids": ok})
