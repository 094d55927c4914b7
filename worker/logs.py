"""structlog set-up: JSON lines in production, readable lines in a terminal.

The libraries' own records (aiormq, aio-pika, SQLAlchemy, Alembic) go through
the standard library: they are rendered by the same renderer, so a JSON log
holds nothing but JSON lines.
"""

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

from token_budget.worker.settings import LogFormat

__all__ = ["configure_logging", "get_logger", "renders_json"]

_SECRET_KEYS = ("password", "secret", "token_value", "authorization")

#: The standard-library handler installed last, replaced on the next call.
_handler: logging.Handler | None = None


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # A last guard: callers log redacted URLs, but a stray secret key is masked.
    for key in event:
        lowered = key.lower()
        if any(marker in lowered for marker in _SECRET_KEYS):
            event[key] = "***"
    return event


def renders_json(fmt: LogFormat) -> bool:
    """Whether ``fmt`` means JSON lines here: ``auto`` does when stderr is no terminal."""
    return fmt is LogFormat.JSON or (fmt is LogFormat.AUTO and not sys.stderr.isatty())


def configure_logging(level: str = "info", fmt: LogFormat = LogFormat.AUTO) -> None:
    global _handler
    use_json = renders_json(fmt)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    exc_info: Any = structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library; keep their warnings visible,
    # rendered like ours (``logger`` names the library).
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exc_info,
            renderer,
        ],
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(formatter)
    root.addHandler(_handler)
    root.setLevel(max(numeric, logging.WARNING))


def get_logger(**context: Any) -> FilteringBoundLogger:
    """The worker's logger, bound to ``context`` (filtered by level, as configured)."""
    logger: FilteringBoundLogger = structlog.get_logger("budget")
    return logger.bind(**context)
