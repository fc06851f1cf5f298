"""The run context a strategy's ``run(context, options)`` receives.

It carries what the runner prepared (store, lifecycle hooks, run directory, device, resume flag)
and enforces the rules a strategy must keep: :meth:`RunContext.save` records lineage, writes only
on the main process under torchrun and stores nothing twice when a run is resumed;
:meth:`RunContext.log` prints only on the main process. :meth:`RunContext.load_model` rebuilds a
stored model: a registered backbone, or a composite model whose strategy registered a loader for
its backbone name (:func:`register_model_loader`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reuse_core.backbone import build as build_backbone
from reuse_core.engine.distributed import is_main_process

# backbone name in a manifest -> loader(manifest, state_dict) -> nn.Module, for stored models that are
# not one registered backbone (an ensemble of members, say).
ModelLoader = Callable[[dict, dict], torch.nn.Module]
_MODEL_LOADERS: dict[str, ModelLoader] = {}


def register_model_loader(backbone_name: str, loader: ModelLoader) -> None:
    """Rebuild stored models whose manifest names ``backbone_name`` with ``loader(manifest, state_dict)``
    instead of a registered backbone. Call it when your strategy's module is imported."""
    _MODEL_LOADERS[backbone_name] = loader


@dataclass
class RunContext:
    """What a strategy's ``run(context, options)`` gets besides its options.

    ``store``: the :class:`~reuse_core.store.ModelStore`; ``hooks``: the lifecycle relay to hand to
    :func:`reuse_core.engine.fit` (the building block :func:`~reuse_core.strategy.blocks.fit` does);
    ``run_dir``: this run's folder; ``run_id``: its identity, recorded in ``run.json`` and in the
    manifest of every model it saves; ``resume``: the run continues an interrupted one. ``refs``
    maps recipe step names to the store IDs of the models those steps saved.
    """

    strategy: str
    store: Any
    hooks: Any
    run_dir: Path
    device: torch.device
    resume: bool = False
    quiet: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    _saves: int = field(default=0, init=False, repr=False)

    def model_id(self, ref: str) -> str:
        """The store ID for a recipe step name, a store ID, a unique ID prefix or a model name."""
        if ref in self.refs:
            return self.refs[ref]
        return self.store.resolve(ref)

    def load_model(self, ref: str) -> tuple[torch.nn.Module, dict]:
        """(the stored model rebuilt on ``self.device`` with its weights, in training mode; its
        manifest). The manifest holds ``id``, ``backbone``, ``config``, ``dataset``, ``classes``
        (names, in output order), ``metrics`` and ``lineage``."""
        state, manifest = self.store.load(self.model_id(ref))
        loader = _MODEL_LOADERS.get(manifest["backbone"])
        if loader is not None:
            model = loader(manifest, state)
        else:
            model = build_backbone(manifest["backbone"], len(manifest["classes"]), **manifest["config"])
            model.load_state_dict(state)
        return model.to(self.device), manifest

    def save(self, model: torch.nn.Module | dict, *, backbone: str, config: dict, dataset: str | None,
             classes: list, metrics: dict, parents: list[str], options: dict, name: str | None = None,
             key: str | None = None) -> str | None:
        """Store ``model`` (a module or a state_dict) with its lineage: ``parents`` (IDs, prefixes or
        names), this strategy and ``options``. Returns the store ID, or None on the non-main
        processes of a torchrun job, which save nothing.

        Each save of a run has a ``key`` (default: its order in the run, ``model-0``, ``model-1``,
        ...). A resumed run whose model with that key already reached the store (the run was killed
        after saving it) gets that model's ID back, and nothing is stored twice.
        """
        key = key if key is not None else f"model-{self._saves}"
        self._saves += 1
        if not is_main_process():
            return None
        if self.resume and self.run_id is not None:
            done = self.store.find_run_product(self.run_id, key)
            if done is not None:
                self.log(f"{self.strategy}: model {done} ({key}) was saved before the run was interrupted")
                return done
        record = self.store.save(model, backbone=backbone, config=config, dataset=dataset, classes=list(classes),
                                 metrics=metrics, parents=parents, strategy=self.strategy, options=options,
                                 name=name, run={"id": self.run_id, "key": key} if self.run_id else None)
        return record.id

    def log(self, message: str) -> None:
        """Print ``message`` unless the run is quiet; once under torchrun (on the main process)."""
        if not self.quiet and is_main_process():
            print(message, flush=True)
