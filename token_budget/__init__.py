"""token_budget: token budgets for fleets of AI agents.

``token_budget.client`` is the SDK (the base install), ``token_budget.schemas``
the wire contract, ``token_budget.worker`` the service (``pip install
'token-budget[worker]'``). The SDK's main names are re-exported here: the
same list as ``token_budget.client.__all__``.
"""

from token_budget import client as _client
from token_budget.client import *  # noqa: F403

__all__ = list(_client.__all__)
