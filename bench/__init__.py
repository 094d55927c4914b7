"""Issue 5's benchmark: the worker against baselines measured in the same run.

``python -m bench`` drains the same consume commands through a do-nothing
consumer (the broker's limit), a naive one-transaction-per-message worker and
the real worker, measures get_budget RPC latency against a raw echo RPC and the
worker's peak memory at two backlog sizes, then prints ratios and writes JSON
(and a PNG chart when matplotlib is installed) under ``bench/results/``.
Speed is only ever reported as ratios: nothing here asserts a time.
"""

__all__: list[str] = []
