"""``reuse models``: the model store from the command line (list, show, lineage, export, import, rm)."""
from __future__ import annotations

import argparse
import json

from reuse_core.cli.output import fail, table

QUANTIZE_SCHEMES = ("int8", "bf16")  # reuse_core.store's, repeated here so that `reuse --help` needs no torch

MODELS_EPILOG = """\
A model is named by its id, a unique prefix of it, or its name. Several models may share a name:
the name alone means the newest of them, NAME@N the N-th (1 the oldest; `reuse models list`
shows each model's NAME@N).
The store is --store PATH, else $REUSE_CORE_STORE, else ~/.cache/reuse-core/store
($XDG_CACHE_HOME/reuse-core/store where that is set).

examples:
  reuse models list
  reuse models show 3fa2                        one model's manifest, its weights checked
  reuse models show teacher@1                   the first model named teacher
  reuse models lineage 3fa2                     pretrained -> fine-tuned -> distilled ...
  reuse models export 3fa2 teacher.safetensors  one file, with the manifest inside
  reuse models export 3fa2 out/ --quantize int8 int8 weights (about a quarter of the size), a new model
                                                whose parent is 3fa2; reports the validation accuracy change
  reuse models import teacher.safetensors       into another store: same id, same lineage
  reuse models import resnet18.pth --backbone resnet18
                                                your own weights become the root of a lineage
  reuse models import digits.safetensors --backbone small-cnn --config in_channels=1 --classes 10
  reuse models rm 3fa2
"""


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="PATH", default=None, help="the store's folder (default: $REUSE_CORE_STORE "
                   "or ~/.cache/reuse-core/store)")
    common = argparse.ArgumentParser(add_help=False)
    # also accepted after the sub-command; SUPPRESS keeps a --store given before it
    common.add_argument("--store", metavar="PATH", default=argparse.SUPPRESS, help="the store's folder")
    sub = p.add_subparsers(dest="models_command", metavar="<action>", title="actions")

    def action(name: str, help_: str, json_help: str | None = None) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".", parents=[common])
        if json_help:
            a.add_argument("--json", action="store_true", help=json_help)
        return a

    action("list", "list the stored models, oldest first", "print the manifests as JSON")
    action("show", "show a model's manifest and check its weights", "print the manifest as JSON").add_argument(
        "model", metavar="ID")
    action("lineage", "show how knowledge flowed into and out of a model",
           "print the lineage graph as JSON").add_argument("model", metavar="ID")
    a = action("export", "write a model to one self-contained .safetensors file")
    a.add_argument("model", metavar="ID")
    a.add_argument("path", metavar="PATH", help="the file to write, or a folder to write <name>-<id>.safetensors in")
    a.add_argument("--quantize", choices=QUANTIZE_SCHEMES, default=None,
                   help="write a quantised copy: int8 = symmetric int8 per output channel for the weights of "
                   "Linear and Conv layers (float32 scales; other tensors stay float32), bf16 = every float tensor "
                   "in bfloat16. It is a new model (named <name>-<scheme>, with its own id and the original as its "
                   "parent) that imports and loads dequantised; the size against the float32 export and the accuracy "
                   "change on the model's validation split are printed and recorded in its manifest")
    a = action("import", "add a store export, or external weights for a registered backbone",
               "print the new model's manifest as JSON")
    a.add_argument("path", metavar="PATH", help="a store export, or weights: .safetensors, .pt/.pth/.bin state_dict")
    a.add_argument("--backbone", metavar="NAME",
                   help="the backbone external weights belong to (`reuse backbones` lists them)")
    a.add_argument("--classes", metavar="N|A,B,...", help="external weights: the number of classes or their names, "
                   "comma-separated (default: the size of the head)")
    a.add_argument("--config", metavar="KEY=VALUE", action="append", default=[],
                   help="external weights: a backbone build option, e.g. in_channels=1 (repeatable; values are JSON "
                   "where they parse as JSON)")
    a.add_argument("--name", help="a name for the model (default: the file's name); no '/', '\\', '@' or "
                   "control characters")
    action("rm", "remove a model from the store").add_argument("model", metavar="ID")


def _config(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _classes(text: str | None) -> int | list[str] | None:
    if text is None:
        return None
    return int(text) if text.strip().isdigit() else [c.strip() for c in text.split(",") if c.strip()]


def _metric(m: dict) -> str:
    metrics = m.get("metrics") or {}
    for key in ("val_accuracy", "test_accuracy", "accuracy"):
        if isinstance(metrics.get(key), (int, float)):
            return f"{key}={metrics[key]:.4f}"
    return ""


def _show(m: dict, version: str | None) -> str:
    from reuse_core.store import printable

    lin = m["lineage"]
    w = m["weights"]
    lines = [
        f"id        {m['id']}",
        f"name      {m.get('name')}" + (f"  ({version})" if version else ""),
        f"backbone  {m['backbone']}  {json.dumps(m.get('config') or {})}",
        f"dataset   {m.get('dataset') or '-'}",
        f"classes   {len(m['classes'])}: {', '.join(m['classes'][:12])}{' ...' if len(m['classes']) > 12 else ''}",
        f"metrics   {json.dumps(m.get('metrics') or {})}",
        f"created   {m.get('created')}",
        f"strategy  {lin.get('strategy') or '-'}  {json.dumps(lin.get('options') or {})}",
        f"parents   {', '.join(lin.get('parents') or []) or '- (a root)'}",
        f"weights   {w.get('file')}, {w.get('bytes')} bytes, sha256 {w.get('sha256')} (checked: ok)",
    ]
    if q := m.get("quantization"):
        change = (q.get("val_accuracy") or {}).get("change")
        lines.append(f"quantized {q.get('scheme')} from {q.get('source')}: {q.get('size_ratio')} of the float32 "
                     "export's size" + (f", validation accuracy {change * 100:+.2f} points"
                                        if isinstance(change, (int, float)) else "") + "; loads dequantised")
    return "\n".join(printable(line) for line in lines)


def _export(store, args: argparse.Namespace) -> list[str]:
    """Export (quantised, with the accuracy change measured on the model's validation split); the
    lines that say what was written."""
    from reuse_core.store import export_manifest

    mid = store.resolve(args.model)
    if args.quantize is None:
        return [f"exported {mid} to {store.export(mid, args.path)}"]
    from reuse_core.strategy.scoring import split_scorer

    scorer, split = split_scorer(store, mid)
    path = store.export(mid, args.path, quantize=args.quantize, evaluate=scorer)
    m = export_manifest(path)
    q = m["quantization"]
    acc = q["val_accuracy"]
    accuracy = (f"validation accuracy {acc['float32']:.4f} -> {acc['quantized']:.4f} ({acc['change'] * 100:+.2f} "
                f"points; {split})" if acc else f"validation accuracy not measured: {split}")
    return [f"exported {mid} to {path}, quantised to {q['scheme']}: model {m['id']} ({m['name']}), parent {mid}",
            f"  {q['bytes']} bytes, {q['size_ratio']:.3f} of the float32 export ({q['float32_export_bytes']} bytes)",
            f"  {accuracy}"]


def _run_models(args: argparse.Namespace) -> int:
    from reuse_core.store import ModelStore, StoreError, format_lineage, printable, version_labels

    if not args.models_command:
        return fail("models: say what to do: list, show, lineage, export, import or rm (see reuse models --help)")
    store = ModelStore(args.store)
    cmd = args.models_command
    try:
        if cmd == "list":
            models = store.list()
            if args.json:
                print(json.dumps(models, indent=2))
            elif not models:
                print(f"no models in {store.root}")
            else:
                versions = version_labels(models)
                rows = [["ID", "NAME", "VERSION", "BACKBONE", "STRATEGY", "DATASET", "CLASSES", "METRIC", "CREATED"]]
                for m in models:
                    if "error" in m:
                        rows.append([m["id"], "BROKEN", "-", "", "", "", "", "", m["error"]])
                        continue
                    rows.append([m["id"], str(m.get("name")), versions.get(m["id"], "-"), m["backbone"],
                                 m["lineage"].get("strategy") or "-", m.get("dataset") or "-",
                                 str(len(m["classes"])), _metric(m), (m.get("created") or "")[:19].replace("T", " ")])
                print(table([[printable(c) for c in row] for row in rows]))
        elif cmd == "show":
            m = store.verify(args.model)
            print(json.dumps(m, indent=2) if args.json else _show(m, version_labels(store.list()).get(m["id"])))
        elif cmd == "lineage":
            lin = store.lineage(args.model)
            print(json.dumps(lin, indent=2) if args.json else format_lineage(lin))
        elif cmd == "export":
            for line in _export(store, args):
                print(printable(line))
        elif cmd == "import":
            rec = store.import_(args.path, backbone=args.backbone, config=_config(args.config),
                                classes=_classes(args.classes), name=args.name)
            print(json.dumps(rec.manifest, indent=2) if args.json else
                  printable(f"imported {rec.id} ({rec.name}, {rec.manifest['backbone']}) into {store.root}"))
        elif cmd == "rm":
            m = store.rm(args.model)
            orphans = [m2["id"] for m2 in store.list() if m["id"] in m2.get("lineage", {}).get("parents", [])]
            print(printable(f"removed {m['id']} ({m.get('name')})"))
            if orphans:
                print(f"note: {len(orphans)} model(s) descend from it and keep its summary in their lineage: "
                      f"{', '.join(orphans)}")
    except (StoreError, ValueError) as e:
        return fail(printable(f"models {cmd}: {e}"), 1)
    return 0


VERBS = [
    (
        "models",
        "list, inspect, export and import the models in the model store",
        MODELS_EPILOG,
        _add_models,
        _run_models,
    ),
]
