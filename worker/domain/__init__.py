"""The rules of budgets: state, rules, reservations, thresholds, outcomes.

Pure: imports nothing of ours but the wire schemas, no AMQP, no SQL."""

__all__: list[str] = []
