"""The test suite's first words when the broker lacks what it needs."""

from tests.support import RabbitAdmin


def test_a_broker_without_management_is_named_with_the_command_that_fixes_it() -> None:
    problem = RabbitAdmin("http://127.0.0.1:1/api").missing_prerequisites()
    assert problem is not None
    assert "management API at http://127.0.0.1:1/api is unreachable" in problem
    assert (
        "rabbitmq-plugins enable rabbitmq_management rabbitmq_sharding "
        "rabbitmq_consistent_hash_exchange" in problem
    )


def test_the_local_broker_has_every_prerequisite(rabbit: RabbitAdmin) -> None:
    assert rabbit.missing_prerequisites() is None
