"""The AMQP side: topology, lanes, decoding, authorization, settlement,
confirmed publishing, the wire guard. Never imports SQLAlchemy."""

__all__: list[str] = []
