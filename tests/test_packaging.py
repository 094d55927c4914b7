"""What ``pip install`` gives, in fresh venvs built from the Docker build context.

The base install is the SDK alone (aio-pika, pydantic): ``from token_budget
import BudgetClient`` works without SQLAlchemy, and no generic top-level
``worker``, ``schemas`` or ``client`` module lands in site-packages. The
``worker`` extra, installed as the Dockerfile does (``pip install
'.[worker]'`` in a copy of what .dockerignore lets in), gives working
``budget-worker`` and ``budgetctl``; without it they say how to get it.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GENERIC = ("worker", "schemas", "client")


def _run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )
    assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _build_context(target: Path) -> Path:
    """The files a ``docker build`` would see: only what .dockerignore allows."""
    allowed = [
        line[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for name in allowed:
        source = ROOT / name
        if source.is_symlink():
            (target / name).symlink_to(os.readlink(source))
        elif source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def _venv(path: Path) -> Path:
    _run(sys.executable, "-m", "venv", path)
    return path / "bin"


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_context(tmp_path_factory.mktemp("context"))


@pytest.fixture(scope="module")
def wheel(context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, context)
    (built,) = out.glob("token_budget-*.whl")
    return built


@pytest.fixture(scope="module")
def sdk_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    bin_dir = _venv(tmp_path_factory.mktemp("sdk") / "venv")
    _run(bin_dir / "pip", "install", "-q", "--disable-pip-version-check", wheel)
    yield bin_dir


@pytest.fixture(scope="module")
def worker_venv(context: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    bin_dir = _venv(tmp_path_factory.mktemp("worker") / "venv")
    # As the Dockerfile does, from the build context.
    _run(bin_dir / "pip", "install", "-q", "--disable-pip-version-check", ".[worker]", cwd=context)
    yield bin_dir


def test_the_wheel_holds_one_package_and_no_generic_top_level_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"token_budget"}
    assert "token_budget/worker/store/migrations/script.py.mako" in names
    assert "token_budget/worker/store/migrations/versions/0001_initial.py" in names


def test_the_base_install_is_the_sdk_without_the_worker_dependencies(sdk_venv: Path) -> None:
    probe = (
        "import importlib.util, sys\n"
        "from token_budget import BudgetClient, InsufficientBudgetError\n"
        "import token_budget.schemas\n"
        f"print(sorted(m for m in {GENERIC!r} if importlib.util.find_spec(m)))\n"
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'structlog', 'asyncpg',"
        " 'aiosqlite', 'pydantic_settings') if importlib.util.find_spec(m)))\n"
        "print('sqlalchemy' in sys.modules)\n"
    )
    out = _run(sdk_venv / "python", "-c", probe, cwd=sdk_venv).splitlines()
    assert out == ["[]", "[]", "False"]


@pytest.mark.parametrize("program", ["budget-worker", "budgetctl"])
def test_without_the_worker_extra_the_programs_say_how_to_install_it(
    sdk_venv: Path, program: str
) -> None:
    done = subprocess.run([sdk_venv / program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install 'token-budget[worker]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_worker_extra_migrates_and_checks_as_the_image_does(
    worker_venv: Path, tmp_path: Path, amqp_url: str
) -> None:
    env = {
        "PATH": f"{worker_venv}:{os.environ['PATH']}",
        "BUDGET_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}",
        "BUDGET_AMQP_URL": amqp_url,
        "BUDGET_LOG_FORMAT": "json",
    }
    _run(worker_venv / "budget-worker", "migrate", env=env, cwd=tmp_path)
    # The image's health check.
    out = _run(worker_venv / "budget-worker", "--check", env=env, cwd=tmp_path)
    assert "rabbitmq: ok" in out and "database: ok" in out
    assert "usage" in _run(worker_venv / "budgetctl", "--help", env=env, cwd=tmp_path).lower()
