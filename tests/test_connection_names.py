"""Every AMQP connection a test opens carries the test's node id, so that one it
leaks names it in the management UI (tests/amqp_helpers.py, tests/conftest.py)."""

from urllib.parse import quote

from tests.amqp_helpers import connection_name, open_amqp
from tests.eventually import eventually
from tests.support import RabbitAdmin
from token_budget.client import BudgetClient


def _names(rabbit: RabbitAdmin, vhost: str) -> list[str]:
    """The names the broker lists for the vhost's connections (statistics lag: poll)."""
    connections = rabbit.call("GET", f"/vhosts/{quote(vhost, safe='')}/connections")
    return sorted(c.get("client_properties", {}).get("connection_name", "") for c in connections)


async def test_a_plain_aio_pika_connection_is_named_after_its_test(
    rabbit: RabbitAdmin, vhost: str, amqp_url: str, amqp_connection_name: str
) -> None:
    async with open_amqp(amqp_url):
        names = await eventually(
            lambda: _names(rabbit, vhost), within=30, what="the connection listed"
        )
    assert names == [amqp_connection_name]


async def test_an_sdk_connection_is_named_after_its_test(
    rabbit: RabbitAdmin, vhost: str, amqp_url: str, amqp_connection_name: str
) -> None:
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()):
        names = await eventually(
            lambda: _names(rabbit, vhost), within=30, what="the connection listed"
        )
    assert names == [amqp_connection_name]
