"""The budget worker: applies agents' commands from RabbitMQ to the database."""

__all__: list[str] = []
