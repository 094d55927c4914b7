import sys

from token_budget.worker.launch import worker

sys.exit(worker())
