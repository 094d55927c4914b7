import sys

from token_budget.worker.cli import main

sys.exit(main())
