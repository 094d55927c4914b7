"""Everything SQL: tables, engine, migrations, the batch apply, the service,
group commit, audit, leases and read-only views. Never imports aio-pika."""

__all__: list[str] = []
