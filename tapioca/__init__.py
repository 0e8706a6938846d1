"""tapioca: when and why removing transformer layers makes a model more robust to distribution shift.

Notebook use::

    import tapioca
    cfg = tapioca.load_config()                    # the built-in testbed study
    model = tapioca.train(cfg)
    task = tapioca.load_task(cfg)
    result = tapioca.prune(model, task, search="tale", protocol="target", target="x_scale_3")
    scores = tapioca.evaluate(model, task, gates=result.gates)

Language models::

    lm = tapioca.HFModel.load("path/to/hf-folder")
    result = tapioca.prune(lm, tapioca.load_text_task(cfg.lm), target="humanities")
    tapioca.save_pruned(lm, result, "runs/pruned-model")          # a normal Hugging Face folder
    tapioca.check("path/to/hf-folder", "runs/pruned-model", "task.yaml")   # ID, OOD and calibration tests
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

from tapioca.api import check, save_pruned

# The language-model API, imported on first use (``tapioca.HFModel``, ``from tapioca import TextWorkload``):
# name -> module that defines it.
_LAZY = {
    "HFModel": "tapioca.models.hf",
    "TextWorkload": "tapioca.tasks.text_workload",
    "load_lm": "tapioca.tasks.text_workload",
    "load_text_task": "tapioca.tasks.text_workload",
    "TextTask": "tapioca.tasks.text",
    "TextTaskConfig": "tapioca.tasks.text",
    "prune_lm": "tapioca.tasks.choices",
    "evaluate_lm": "tapioca.analysis.calibration",
    "compare_lm": "tapioca.analysis.calibration",
    "calibration": "tapioca.analysis.calibration",
    "calibration_change": "tapioca.analysis.calibration",
    "match_blocks": "tapioca.models.hf_save",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tapioca' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CheckpointError", "Config", "ConfigError", "DataError", "Evaluation", "PruneResult", "SEARCHES",
    "TapiocaError", "check", "compare", "evaluate", "gated", "load", "load_config", "load_task", "prune",
    "removal_gates", "replace", "run_study", "save_pruned", "train", *_LAZY,
]
