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
RUN pip install .

# The working directory is the user's own: the default SQLite URL
# (./budget.db) then works for a single container without PostgreSQL.
WORKDIR /data
USER budget

# The worker's own probe of its broker and database (`budget-worker --check`).
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["budget-worker", "--check"]

# `docker stop` sends SIGTERM: allow the worker time to finish the batch in
# hand (`docker stop --time`, compose's stop_grace_period).
ENTRYPOINT ["budget-worker"]
