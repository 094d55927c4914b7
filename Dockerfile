# The budget worker. Scale it by running more containers: lanes are shared out
# by the broker (single active consumer), not by configuration.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BUDGET_LOG_FORMAT=json

RUN groupadd --system --gid 10001 budget \
    && useradd --system --uid 10001 --gid budget --home-dir /data --no-create-home budget \
    && install -d -o budget -g budget -m 0750 /data

# Only what the wheel is built from (.dockerignore keeps the rest out), so an
# edit to the tests or the docs does not rebuild this layer.
WORKDIR /src
COPY . .
RUN pip install ".[worker]"

# SQLite in the user's own directory, named explicitly, for a single
# container without PostgreSQL (compose sets a PostgreSQL URL instead).
WORKDIR /data
USER budget
ENV BUDGET_DATABASE_URL=sqlite+aiosqlite:////data/budget.db

# The worker's own probe of its broker and database (`budget-worker --check`).
# Docker reserves exit code 2, which --check uses for "unreachable": any
# failure is reported to Docker as 1 (unhealthy).
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "budget-worker --check || exit 1"]

# `docker stop` sends SIGTERM: allow the worker time to finish the batch in
# hand (`docker stop --time`, compose's stop_grace_period).
ENTRYPOINT ["budget-worker"]
