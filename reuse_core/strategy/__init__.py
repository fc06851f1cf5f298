"""The public surface for writing a reuse strategy.

- The schema (torch-free, importable from here): :class:`Strategy`, :class:`Option`,
  :class:`StrategyResult`, :class:`OptionError`, the checks :func:`positive`, :func:`non_negative`
  and :func:`fraction`, and the shared option groups :func:`data_options`, :func:`train_options`,
  :func:`backbone_options`, :func:`augment_option`, :data:`NAME_OPTION`, :data:`TEACHER_OPTION` and :data:`PAIRS_OPTION`
  with their parsers.
- The run context: :class:`RunContext` (:mod:`reuse_core.strategy.context`), with ``save``,
  ``load_model`` and ``log``; :func:`register_model_loader` for composite stored models.
- The building blocks the built-in strategies are made of: :mod:`reuse_core.strategy.blocks`
  (splits with class subsets and label budgets, backbones, augmentation, training through the
  engine, teachers, feature taps, evaluation, saving with lineage and training data, running
  another strategy as a part of a run); :mod:`reuse_core.strategy.curve` for label-budget curves.

One schema drives the three ways to run a strategy (``reuse run``, recipe steps, and
``reuse_core.run(NAME, **options)``); docs/strategies.md walks through writing one.
"""
from __future__ import annotations

from reuse_core.strategy.options import (
    NAME_OPTION, PAIRS_OPTION, TEACHER_OPTION, TRAIN_KEYS, augment_option, backbone_options, data_options,
    parse_classes, parse_config, parses, train_options,
)
from reuse_core.strategy.schema import (
    REQUIRED, Option, OptionError, Strategy, StrategyResult, fraction, non_negative, positive,
)

__all__ = [
    "NAME_OPTION", "PAIRS_OPTION", "REQUIRED", "TEACHER_OPTION", "TRAIN_KEYS", "Option", "OptionError",
    "RunContext", "Strategy", "StrategyResult", "augment_option", "backbone_options", "data_options", "fraction",
    "non_negative", "parse_classes", "parse_config", "parses", "positive", "register_model_loader", "train_options",
]
_FROM_CONTEXT = ("RunContext", "register_model_loader")


def __getattr__(name: str):
    # The context needs torch; importing it on first use keeps `reuse --help` torch-free.
    if name in _FROM_CONTEXT:
        from reuse_core.strategy import context

        return getattr(context, name)
    raise AttributeError(f"module 'reuse_core.strategy' has no attribute {name!r}")
