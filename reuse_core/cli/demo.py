"""``reuse demo``: the main job, pretrain -> fine-tune -> distill -> combine on the embedded digits."""
from __future__ import annotations

import argparse

from reuse_core.cli.output import fail

DEMO_EPILOG = """\
On the embedded digits data (no download), for each seed: pretrain a teacher on classes 0-4,
fine-tune it to classes 5-9 with a few labels per class against the same network trained from
scratch on the same labels, then distill the teacher and the fine-tuned model into a much smaller
MLP student against that student trained from scratch on the same labels; then combine models:
an ensemble of four CNNs trained together against its best member, a cascade of the student and
its teacher (accuracy against compute, cascade.png), a soup of fine-tuned models against its
ingredients, and a merge of two specialists (one parent fine-tuned to 0-4 and to 5-9) into one
10-digit model against their ensemble and joint training, exported in int8. The steps are the recipes in recipes/digits-*.toml, run the same way as
`reuse run`. It prints a table of test accuracies (mean +- standard deviation over the seeds) and
writes report.md, metrics.json and PNG plots into a run directory it names at the end (the models
go to a store inside it unless --store is given).

examples:
  reuse demo                                      the full demo (3 seeds, one intra-op thread)
  reuse demo --seeds 1 --epochs-scale 0.2         a quick look
  reuse demo --out runs/my-demo
"""

def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds to average over (default: 3)")
    p.add_argument("--epochs-scale", type=float, default=1.0, metavar="X",
                   help="multiply every step's epochs by X, at least 1 epoch each (default: 1; e.g. 0.2 for a quick look)")
    p.add_argument("--out", default=None, metavar="DIR", help="the run directory (default: ./runs/demo-<timestamp>)")
    p.add_argument("--store", default=None, metavar="DIR", help="the model store (default: a store inside the run directory)")
    p.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, ... (default: cuda when visible, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no per-step logs; print the table only")


def _run_demo(args: argparse.Namespace) -> int:
    from reuse_core import demo

    if args.seeds < 1 or args.epochs_scale <= 0:
        return fail("--seeds must be >= 1 and --epochs-scale > 0")
    report = demo.run(seeds=args.seeds, epochs_scale=args.epochs_scale, out=args.out, store=args.store,
                      device=args.device, quiet=args.quiet)
    print(report.table)
    print(f"\nreport, metrics and plots: {report.run_dir}")
    return 0


VERBS = [("demo", "pretrain, fine-tune, distill and combine models on the embedded digits data, with baselines, "
          "and report", DEMO_EPILOG, _add_demo, _run_demo)]
