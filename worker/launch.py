"""The console scripts' entry points, importable with the SDK alone.

``budget-worker`` and ``budgetctl`` are installed with every install of the
package, but they run only with the ``worker`` extra. Without it they say how
to get it and exit 2 (``ExitCode.UNREACHABLE``: something the worker needs is
not there), instead of a traceback about SQLAlchemy.
"""

import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["MISSING_EXIT", "ctl", "missing_extra", "worker"]

#: Distributions the worker extra installs, by the module each provides.
_EXTRA_MODULES = {
    "sqlalchemy": "sqlalchemy",
    "aiosqlite": "aiosqlite",
    "asyncpg": "asyncpg",
    "alembic": "alembic",
    "structlog": "structlog",
    "pydantic_settings": "pydantic-settings",
    "rich": "rich",
}
#: ``ExitCode.UNREACHABLE``, as when the broker or database is missing.
MISSING_EXIT = 2


def missing_extra() -> list[str]:
    """The worker extra's distributions that are not installed."""
    return [
        dist for module, dist in _EXTRA_MODULES.items() if importlib.util.find_spec(module) is None
    ]


def _refuse(program: str, missing: list[str]) -> int:
    print(
        f"{program}: the worker is not installed (missing: {', '.join(missing)}).\n"
        "Install it with: pip install 'token-budget[worker]'",
        file=sys.stderr,
    )
    return MISSING_EXIT


def worker(argv: Sequence[str] | None = None) -> int:
    """``budget-worker``."""
    missing = missing_extra()
    if missing:
        return _refuse("budget-worker", missing)
    from token_budget.worker.cli import main

    return main(argv)


def ctl(argv: Sequence[str] | None = None) -> int:
    """``budgetctl``."""
    missing = missing_extra()
    if missing:
        return _refuse("budgetctl", missing)
    from token_budget.worker.ctl import main

    return main(argv)
