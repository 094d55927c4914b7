"""What the worker may say about its connection URLs: standard library only,
so that ``budgetctl`` can use it without loading SQLAlchemy."""

from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["broker_user", "redact_url"]


def broker_user(amqp_url: str) -> str:
    """The user a connection to ``amqp_url`` authenticates as (aio-pika, and
    RabbitMQ, use guest when the URL names none)."""
    return unquote(urlsplit(amqp_url).username or "") or "guest"


def redact_url(url: str) -> str:
    """``url`` with its password masked, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
