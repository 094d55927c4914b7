"""docs/grafana/budget-dashboard.json: a Grafana dashboard of the worker's metrics.

No Grafana runs here, so the dashboard's shape is checked by hand: the panels
Grafana needs to lay it out, one data source variable behind every query, and
PromQL that names only the metrics the worker and RabbitMQ export. Where
promtool (Debian's ``prometheus`` package) is installed, it parses every
expression for real.
"""

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "docs" / "grafana"
DASHBOARD = GRAFANA / "budget-dashboard.json"
PROMETHEUS_CONFIG = GRAFANA / "prometheus.yml"

# The worker's metrics, by base name (prometheus-client adds _total to
# counters and _bucket/_sum/_count to histograms), with their labels. A
# literal copy of token_budget.worker.metrics (its NAMES, checked below when
# that module can be imported), so that the dashboard is checked against the
# names it was written for. With several processes a worker adds a pid label
# to its "liveall" gauges (prometheus-client's multiprocess mode).
PID = frozenset({"pid"})
WORKER_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "budget_commands": ("counter", frozenset({"type", "outcome"})),
    "budget_batch_duration_seconds": ("histogram", frozenset()),
    "budget_batch_size": ("histogram", frozenset()),
    "budget_lane_unapplied": ("gauge", frozenset({"lane"})),
    "budget_partition_epoch": ("gauge", frozenset({"partition"})),
    "budget_partitions_held": ("gauge", frozenset()),
    "budget_outbox_backlog": ("gauge", frozenset()),
    "budget_reservation_sweeps": ("counter", frozenset()),
    "budget_reservation_sweep_agents": ("counter", frozenset()),
    "budget_storage_retries": ("counter", frozenset()),
    "budget_broker_reconnects": ("counter", frozenset()),
    "budget_dead_letters": ("counter", frozenset({"code"})),
    "budget_worker_healthy": ("gauge", PID),
    "budget_worker_health_checked_seconds": ("gauge", PID),
}
OUTCOMES = frozenset(
    {
        "applied",
        "refused",
        "duplicate",
        "conflict",
        "query",
        "query_refused",
        "rejected",
        "unauthorized",
        "invalid",
    }
)
# Labels every scraped series carries (Prometheus adds instance and job);
# le is a histogram bucket's bound.
SCRAPE_LABELS = frozenset({"instance", "job"})

# rabbitmq_prometheus' /metrics/detailed, by family (the RabbitMQ
# "Monitoring with Prometheus" guide); every series has vhost and queue.
RABBITMQ_DETAILED_FAMILIES = {
    "queue_coarse_metrics": {
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_messages_unacked",
        "rabbitmq_detailed_queue_messages",
        "rabbitmq_detailed_queue_process_reductions_total",
    },
    "queue_consumer_count": {"rabbitmq_detailed_queue_consumers"},
}
RABBITMQ_QUEUE_LABELS = frozenset({"vhost", "queue"})

# Grafana's own variables that a query may use without defining them.
GRAFANA_GLOBALS = frozenset({"__rate_interval", "__interval", "__range", "__all"})
PANEL_TYPES = frozenset({"timeseries", "stat", "table", "state-timeline", "gauge", "bargauge"})
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

METRIC_NAME = re.compile(r"\b((?:budget|rabbitmq)_[a-zA-Z0-9_]+)")
SELECTOR = re.compile(r"\b((?:budget|rabbitmq)_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VARIABLE = re.compile(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)")


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in panels(dashboard) if panel["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in query_panels(dashboard) for target in panel["targets"]]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    return [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]


def worker_series() -> dict[str, str]:
    """Each series name the worker exports -> its metric's base name."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {
        base + suffix: base
        for base, (kind, _labels) in WORKER_METRICS.items()
        for suffix in suffixes[kind]
    }


def without_strings(expr: str) -> str:
    """The expression with its string literals blanked (brackets in a regex do not count)."""
    return re.sub(r"\"(?:[^\"\\]|\\.)*\"", '""', expr)


def test_the_dashboard_is_json_of_a_current_grafana() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"]
    assert dashboard["uid"] == "token-budget"
    # Grafana 11 writes 39, 12.0 writes 41; a newer Grafana migrates it up.
    assert isinstance(dashboard["schemaVersion"], int)
    assert 39 <= dashboard["schemaVersion"] <= 42
    # A provisioned dashboard must not carry a database id of some other Grafana.
    assert dashboard.get("id") is None
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]


def test_every_panel_has_an_id_a_type_a_title_a_place_and_queries() -> None:
    dashboard = load_dashboard()
    for panel in panels(dashboard):
        assert isinstance(panel["id"], int), panel
        assert panel["title"], panel
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("x", "y", "w", "h")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            assert "targets" not in panel, panel["title"]
            continue
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    dashboard = load_dashboard()
    ids = Counter(panel["id"] for panel in panels(dashboard))
    assert [panel_id for panel_id, n in ids.items() if n > 1] == []
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_query_goes_through_the_data_source_variable() -> None:
    dashboard = load_dashboard()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert source["type"] == "datasource"
    assert source["query"] == "prometheus"
    for panel in query_panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_queries_use_only_defined_variables() -> None:
    dashboard = load_dashboard()
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    for expr in expressions(dashboard) + variable_queries(dashboard):
        used = set(VARIABLE.findall(expr))
        assert used <= defined | GRAFANA_GLOBALS, expr


def test_the_list_here_is_the_worker_s_own() -> None:
    metrics = pytest.importorskip("token_budget.worker.metrics")
    families = {
        base + ("_total" if kind == "counter" else "") for base, (kind, _) in WORKER_METRICS.items()
    }
    assert set(metrics.NAMES) == families


def test_worker_metrics_are_the_ones_the_worker_exports() -> None:
    series = worker_series()
    used: set[str] = set()
    for expr in expressions(load_dashboard()):
        for name in METRIC_NAME.findall(expr):
            if name.startswith("budget_"):
                assert name in series, f"{name} in {expr}"
                used.add(series[name])
    assert set(WORKER_METRICS) - used == set(), "metrics no panel shows"


def test_queries_filter_and_group_by_labels_the_series_have() -> None:
    series = worker_series()
    bucket_series = {name for name in series if name.endswith("_bucket")}
    for expr in expressions(load_dashboard()):
        labels_here: set[str] = set(SCRAPE_LABELS)
        for name, matchers in SELECTOR.findall(expr):
            if name in series:
                allowed = WORKER_METRICS[series[name]][1] | SCRAPE_LABELS
                if name in bucket_series:
                    allowed |= {"le"}
            else:
                allowed = RABBITMQ_QUEUE_LABELS | SCRAPE_LABELS
            for label, _op, value in MATCHER.findall(matchers):
                assert label in allowed, f"{name} has no label {label}: {expr}"
                if label == "outcome":
                    assert set(value.split("|")) <= OUTCOMES, expr
            labels_here |= allowed
        for name in METRIC_NAME.findall(expr):
            if name in series:
                labels_here |= WORKER_METRICS[series[name]][1]
                if name in bucket_series:
                    labels_here |= {"le"}
            elif name.startswith("rabbitmq_detailed_"):
                labels_here |= RABBITMQ_QUEUE_LABELS
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in labels_here, f"grouping by {label}: {expr}"


def test_rabbitmq_metrics_are_in_the_families_prometheus_scrapes() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    families = [
        family
        for job in config["scrape_configs"]
        if job.get("metrics_path") == "/metrics/detailed"
        for family in job.get("params", {}).get("family", [])
    ]
    assert families, "no job scrapes /metrics/detailed"
    scraped = {name for family in families for name in RABBITMQ_DETAILED_FAMILIES[family]}
    dashboard = load_dashboard()
    for expr in expressions(dashboard) + variable_queries(dashboard):
        for name in METRIC_NAME.findall(expr):
            if name.startswith("rabbitmq_"):
                assert name in scraped, f"{name} is not scraped: {expr}"


def test_expressions_are_balanced() -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    dashboard = load_dashboard()
    for expr in expressions(dashboard) + variable_queries(dashboard):
        assert expr.count('"') % 2 == 0, expr
        stack: list[str] = []
        for char in without_strings(expr):
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], expr
        assert stack == [], expr


def as_promql(expr: str) -> str:
    """The expression as Prometheus would receive it from this dashboard (All selected)."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('"$instance"', '".*"')
        .replace('"$queue"', '"budget[.].*"')
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(expressions(load_dashboard())):
        lines += [
            f"      - record: dashboard:expr_{n}",
            f"        expr: {json.dumps(as_promql(expr))}",
        ]
    rules.write_text("\n".join(lines) + "\n")
    run = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    run = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
