"""Background work beside the lanes: outbox, hold sweeper, heartbeat line and
the routing upgrade. The only rooms besides the wiring that use both sides."""

__all__: list[str] = []
