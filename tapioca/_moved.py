"""Old import paths (``tapioca.pruning``, ``tapioca.study``'s helpers, ...) kept for one release.

``import tapioca.pruning`` gives the very module ``tapioca.pruning.searches`` (the same object, so patching it
patches the new one). New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "tapioca.racing": "tapioca.pruning.racing",
    "tapioca.parallel": "tapioca.pruning.parallel", "tapioca.weight_pruning": "tapioca.pruning.weights",
    "tapioca.lm": "tapioca.tasks.choices", "tapioca.evaluation": "tapioca.analysis.evaluation",
    "tapioca.lm_evaluation": "tapioca.analysis.calibration", "tapioca.stats": "tapioca.analysis.stats",
    "tapioca.geometry": "tapioca.analysis.geometry", "tapioca.interventions": "tapioca.analysis.interventions",
    "tapioca.heldout": "tapioca.analysis.heldout", "tapioca.controls": "tapioca.study.controls",
    "tapioca.lm_study": "tapioca.tasks.text_workload", "tapioca.scales": "tapioca.study.scales",
    "tapioca.training": "tapioca.models.training", "tapioca.claims": "tapioca.report.claims",
    "tapioca.plots": "tapioca.report.plots", "tapioca.summary": "tapioca.report.summary",
    "tapioca.scales_report": "tapioca.report.scales_report",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and hands back the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):  # noqa: D102
        module = importlib.import_module(MOVED[spec.name])
        self._own_spec = module.__spec__  # the import system overwrites __spec__ next; exec_module restores it
        return module

    def exec_module(self, module) -> None:  # noqa: D102
        module.__spec__ = self._own_spec


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
