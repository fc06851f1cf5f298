"""Every hook of reuse-core. Each docstring is the hook's contract.

A plugin is a module (or object) with functions named like these hooks and marked with
``@reuse_core.hookimpl``; it may take any subset of a hook's arguments, by name. Plugins are found
through the entry-point group ``reuse_core`` (see docs/plugins.md); the built-in backbones and
datasets are plugins too, registered first.

Registration hooks run once per process, when the plugin manager loads, in plugin order (built-ins
first, then third-party plugins). Lifecycle hooks run during a training run; the strategy that runs
it hands the engine a relay (``reuse_core.plugins.lifecycle_relay()``) that calls them with keyword
arguments.

This module imports nothing of the project, so any module may import it. Its annotations are text,
never evaluated: ``Registry`` is :class:`reuse_core.registry.Registry`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

# What the register hooks add: a backbone factory builds a torch.nn.Module (the backbone contract,
# docs/plugins.md); a dataset provider returns a torch.utils.data.Dataset (:mod:`reuse_core.data`).
BackboneFactory = Callable[..., Any]
DatasetProvider = Callable[..., Any]

hookspec = pluggy.HookspecMarker("reuse_core")
hookimpl = pluggy.HookimplMarker("reuse_core")


# --------------------------------------------------------------------------------------------
# Registration: called once per plugin while the plugin manager loads
# --------------------------------------------------------------------------------------------

@hookspec
def reuse_register_backbones(registry: Registry[BackboneFactory]) -> None:
    """Add backbones: ``registry.add(name, factory, description=..., family=..., min_input_size=...)``.

    Called once per plugin when the plugin manager loads, built-in plugins first, then third-party
    plugins in entry-point order. Every plugin's implementation is called with the same registry.

    :param registry: the backbone registry. ``factory(num_classes: int, in_channels: int = 3,
        **config) -> torch.nn.Module`` builds an untrained model that meets the backbone contract
        (``head_name`` and ``block_names`` attributes; see :mod:`reuse_core.backbone`). Meta keys:
        ``family`` (str) and ``min_input_size`` (int or None: the smallest height and width the
        model accepts).
    :return: nothing; results are ignored. A name that is already taken is reported with both
        plugins and skipped (the first registration wins). If the hook raises, the entries it added
        are removed and the error is reported; the other plugins still load
        (``REUSE_CORE_STRICT_PLUGINS=1`` makes either fatal).
    """


@hookspec
def reuse_register_strategies(registry: Registry[Any]) -> None:
    """Add reuse strategies (fine-tune, distill, ensemble, ...): ``registry.add(name, strategy,
    description=...)``.

    Called once per plugin when the plugin manager loads, built-in plugins first, then third-party
    plugins in entry-point order. Every plugin's implementation is called with the same registry.

    :param registry: the strategy registry; what a strategy object is, is defined by
        :mod:`reuse_core.strategy`.
    :return: nothing; results are ignored. A taken name or a raising hook is handled as for
        :func:`reuse_register_backbones`.
    """


@hookspec
def reuse_register_datasets(registry: Registry[DatasetProvider]) -> None:
    """Add datasets: ``registry.add(name, provider, description=..., in_channels=..., input_size=...)``.

    Called once per plugin when the plugin manager loads, built-in plugins first, then third-party
    plugins in entry-point order. Every plugin's implementation is called with the same registry.

    :param registry: the dataset registry. ``provider(*, split: str = "train", seed: int = 0,
        classes: Sequence[int] | None = None, root: str | None = None, **options) ->
        torch.utils.data.Dataset`` (the dataset contract in :mod:`reuse_core.data`).
    :return: nothing; results are ignored. A taken name or a raising hook is handled as for
        :func:`reuse_register_backbones`.
    """


# --------------------------------------------------------------------------------------------
# Lifecycle: called during a training run, through the relay the strategy hands the engine
# --------------------------------------------------------------------------------------------

@hookspec
def reuse_run_start(strategy: str, options: dict, run_dir: str) -> None:
    """A run is about to train: the model, data and run folder are ready, no step has run.

    Called once per run (also when a run resumes from its checkpoint), before the first epoch.
    Every plugin's implementation is called.

    :param strategy: the registered name of the strategy running (e.g. ``"finetune"``).
    :param options: the run's options as the strategy received them (treat as read-only).
    :param run_dir: the folder the run writes its checkpoints and metrics to; a plugin may write
        its own files there.
    :return: nothing; results are ignored. If an implementation raises, the run stops before
        training with :class:`reuse_core.plugins.PluginHookError` naming the plugin.
    """


@hookspec
def reuse_epoch_end(strategy: str, epoch: int, metrics: dict) -> None:
    """An epoch has finished: its metrics are computed and its checkpoint is written.

    Called once per epoch, after the checkpoint. Every plugin's implementation is called.

    :param strategy: the registered name of the strategy running.
    :param epoch: the epoch that finished, counting from 1.
    :param metrics: that epoch's metrics (e.g. ``train_loss``, ``val_loss``, ``val_accuracy``,
        ``lr``); treat as read-only.
    :return: nothing; results are ignored. If an implementation raises, the run stops with
        :class:`reuse_core.plugins.PluginHookError` naming the plugin (the last checkpoint stays).
    """


@hookspec
def reuse_run_end(strategy: str, result: dict) -> None:
    """A run has finished training (not called when it failed or was interrupted).

    Called once per run, after the last epoch. Every plugin's implementation is called.

    :param strategy: the registered name of the strategy that ran.
    :param result: the run's result (e.g. ``best_val_accuracy``, ``last_val_accuracy``,
        ``epochs``, ``metrics``); treat as read-only.
    :return: nothing; results are ignored. If an implementation raises, the error is raised as
        :class:`reuse_core.plugins.PluginHookError` naming the plugin.
    """


@hookspec
def reuse_adjust_loss(
    strategy: str,
    loss: torch.Tensor,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    outputs: torch.Tensor,
) -> torch.Tensor | None:
    """Add a term to the training loss of one step (a regulariser, an auxiliary loss).

    Called once per training step (each micro-batch under gradient accumulation), after the
    forward pass and before backward. Every plugin's implementation is called.

    :param strategy: the registered name of the strategy running.
    :param loss: the step's loss so far (a scalar tensor with its graph); do not modify it.
    :param model: the model being trained.
    :param inputs: the batch's inputs.
    :param targets: the batch's targets.
    :param outputs: the model's outputs for ``inputs``.
    :return: a scalar tensor to ADD to the loss (keep it on the loss's device, with its graph if it
        should train anything), or None to leave the loss alone. Every non-None return is added;
        the relay returns the list of them. If an implementation raises, the run stops with
        :class:`reuse_core.plugins.PluginHookError` naming the plugin.
    """
