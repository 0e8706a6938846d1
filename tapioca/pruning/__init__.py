"""Which blocks to remove: TALE and the one-shot baselines (one registry, :mod:`tapioca.pruning.searches`),
prefix reuse, racing, Ray workers, and weight-level pruning for the C9 control (:mod:`tapioca.pruning.weights`).

The names of the former module ``tapioca.pruning`` (``PruneResult``, ``SEARCHES``, ``tale_search``, ...) are
re-exported here.
"""

from tapioca.pruning.searches import *  # noqa: F401,F403
