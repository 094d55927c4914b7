"""The Makefile's own messages: a missing tool is named with how to install it."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
