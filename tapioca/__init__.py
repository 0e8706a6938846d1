"""tapioca: when and why removing transformer layers makes a model more robust to distribution shift.

Notebook use::

    import tapioca
    cfg = tapioca.load_config()                    # the built-in testbed study
    model = tapioca.train(cfg)
    task = tapioca.load_task(cfg)
    result = tapioca.prune(model, task, search="tale", protocol="target", target="x_scale_3")
    scores = tapioca.evaluate(model, task, gates=result.gates)
"""

__version__ = "0.1.0"

from tapioca import _moved

_moved.install()

from tapioca.api import evaluate, load, load_task, prune, workload
from tapioca.config import Config, load_config, replace
from tapioca.errors import CheckpointError, ConfigError, DataError, TapiocaError
from tapioca.analysis.evaluation import Evaluation, compare
from tapioca.models.gates import gated, removal_gates
from tapioca.pruning.searches import SEARCHES, PruneResult
from tapioca.study.steps import run_study
from tapioca.models.training import train

__all__ = [
    "CheckpointError", "Config", "ConfigError", "DataError", "Evaluation", "PruneResult", "SEARCHES",
    "TapiocaError", "compare", "evaluate", "gated", "load", "load_config", "load_task", "prune",
    "removal_gates", "replace", "run_study", "train",
]
