"""The training engine every strategy shares: seeded, resumable, distributed-ready.

``fit(model, train_data, val_data, loss_fn=..., config=TrainConfig(...), run_dir=..., hooks=relay)``
trains in place and checkpoints every epoch; ``evaluate`` and ``predict_logits`` read a model out.
The engine calls lifecycle hooks only through the relay its caller hands it.
"""
from reuse_core.engine.config import FitResult, TrainConfig
from reuse_core.engine.hooks import NO_HOOKS, NoHooks
from reuse_core.engine.seeding import seed_everything
from reuse_core.engine.trainer import cross_entropy, evaluate, fit, predict_logits

__all__ = ["FitResult", "NO_HOOKS", "NoHooks", "TrainConfig", "cross_entropy", "evaluate", "fit",
           "predict_logits", "seed_everything"]
