"""The Makefile's own messages (a missing tool is named with how to install
it) and docker-compose.yml: its opt-in ``observe`` profile and the files that
profile mounts from docs/grafana/."""

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
# What `docker compose up` starts; everything else waits for a profile.
DEFAULT_SERVICES = {"rabbitmq", "postgres", "worker"}
OBSERVE_SERVICES = {"prometheus", "grafana"}


def test_compose_check_without_compose_says_how_to_install_it() -> None:
    run = subprocess.run(
        ["make", "-s", "compose-check", "COMPOSE=no-such-compose-tool"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "'no-such-compose-tool' not found" in run.stderr
    assert "apt-get install docker-compose" in run.stderr
    assert "docker compose plugin" in run.stderr
    assert "No such file or directory" not in run.stderr


def test_readme_and_compose_file_give_the_same_scale_command() -> None:
    command = "docker compose up --build --scale worker=3"
    assert command in (ROOT / "docker-compose.yml").read_text()
    assert command in (ROOT / "README.md").read_text()


def compose_file() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts (short syntax): container path -> host path."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def container_ports(service: dict[str, Any]) -> set[int]:
    """The ports a service listens on inside the compose network, as the file declares them."""
    ports = {int(port) for port in service.get("expose", [])}
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_the_observe_services_start_only_with_their_profile() -> None:
    services = compose_file()["services"]
    assert set(services) == DEFAULT_SERVICES | OBSERVE_SERVICES
    for name in DEFAULT_SERVICES:
        assert "profiles" not in services[name], name
    for name in OBSERVE_SERVICES:
        assert services[name]["profiles"] == ["observe"], name
        # Published on the host's loopback only, like the broker and the database.
        assert all(str(port).startswith("127.0.0.1:") for port in services[name]["ports"]), name


def test_the_observe_images_are_pinned() -> None:
    services = compose_file()["services"]
    for name in OBSERVE_SERVICES:
        _, _, tag = services[name]["image"].partition(":")
        assert tag and tag != "latest" and any(c.isdigit() for c in tag), services[name]["image"]


def test_every_file_a_service_mounts_exists() -> None:
    for name, service in compose_file()["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target})"


def test_rabbitmq_serves_prometheus_metrics() -> None:
    rabbitmq = compose_file()["services"]["rabbitmq"]
    plugins = bind_mounts(rabbitmq)["/etc/rabbitmq/enabled_plugins"].read_text()
    assert "rabbitmq_prometheus" in plugins
    assert 15692 in container_ports(rabbitmq)


def test_prometheus_scrapes_the_services_on_the_ports_they_expose() -> None:
    services = compose_file()["services"]
    worker = services["worker"]
    metrics_port = int(worker["environment"]["BUDGET_METRICS_PORT"])
    assert metrics_port in container_ports(worker)
    config_path = bind_mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    jobs = {job["job_name"]: job for job in load_yaml(config_path)["scrape_configs"]}
    assert set(jobs) == {"budget-worker", "rabbitmq", "rabbitmq-queues"}
    # Every replica of the worker, through compose's DNS (one address each).
    (discovery,) = jobs["budget-worker"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert discovery["port"] == metrics_port
    assert jobs["budget-worker"]["metrics_path"] == "/metrics"
    for name in ("rabbitmq", "rabbitmq-queues"):
        for static in jobs[name]["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services and int(port) in container_ports(services[host]), target
    assert jobs["rabbitmq-queues"]["metrics_path"] == "/metrics/detailed"


def test_grafana_is_provisioned_with_the_data_source_and_the_dashboard() -> None:
    services = compose_file()["services"]
    grafana = bind_mounts(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    host, port = source["url"].removeprefix("http://").split(":")
    assert host == "prometheus" and int(port) in container_ports(services["prometheus"])
    (provider,) = load_yaml(provisioning / "dashboards" / "budget.yml")["providers"]
    dashboards = grafana[provider["options"]["path"]]
    assert (dashboards / "budget-dashboard.json").is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/budget-dashboard.json"


@pytest.mark.parametrize("profile", [[], ["--profile", "observe"]], ids=["default", "observe"])
def test_compose_accepts_the_file(profile: list[str]) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    run = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), *profile, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
