"""The study: search -> held-out evaluation -> profiles -> controls and interventions -> results -> verdicts,
written once for every model kind (:mod:`tapioca.study.steps`), over one run-directory helper module
(:mod:`tapioca.study.rundir`)."""

from tapioca.study.steps import run_study

__all__ = ["run_study"]
