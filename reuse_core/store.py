"""The model store: trained models with where they came from.

One folder per model under ``<root>/models/<id>/``: ``model.safetensors`` (weights only; loading a
shared model runs no code) and ``manifest.json``: id, name, backbone and its build config,
dataset, classes, metrics, the weights' sha256, creation time, and lineage (parent ids, the
strategy and options that produced it, and a summary of every ancestor, so the story survives an
ancestor's removal or a trip to another store). Every write is atomic; every read of weights
checks the sha256 first, so a changed or truncated file is refused with a :class:`StoreError`.

Models are named by id, by a unique prefix of one, or by a unique name.
Building the nn.Module from a manifest is the strategies' job:
``backbone.build(m["backbone"], len(m["classes"]), **m["config"])`` then ``load_state_dict``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from reuse_core.files import atomic_open, fsync_dir

FORMAT = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
EXPORT_KEY = "reuse_core.manifest"  # safetensors metadata key of an export's manifest
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SUMMARY_KEYS = ("id", "name", "backbone", "dataset", "created")


class StoreError(Exception):
    """A model that is missing, ambiguous, corrupted, tampered with, or not importable."""


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS


def default_root() -> Path:
    """$REUSE_CORE_STORE, else reuse-core/store in the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("REUSE_CORE_STORE"):
        return Path(os.environ["REUSE_CORE_STORE"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "reuse-core" / "store"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialize(state: dict[str, Any]) -> bytes:
    """Canonical safetensors bytes (no metadata): the same tensors always give the same bytes, so an
    export's weights can be checked against the sha256 its manifest carries."""
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise StoreError(f"a state_dict holds tensors only; not tensors: {', '.join(map(str, bad[:5]))}")
    # clone: safetensors refuses tensors that share memory (tied weights); each key gets its own copy
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    lineage = manifest.get("lineage", {})
    return {**{k: manifest.get(k) for k in _SUMMARY_KEYS}, "strategy": lineage.get("strategy"),
            "parents": list(lineage.get("parents", []))}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


class ModelStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.models = self.root / "models"

    # ---------------------------------------------------------------- writing

    def save(self, model_or_state_dict: torch.nn.Module | dict[str, torch.Tensor], *, backbone: str,
             config: dict, dataset: str | None, classes: list[str], metrics: dict, parents: list[str],
             strategy: str, options: dict, name: str | None = None, run: dict | None = None) -> ModelRecord:
        """Store a model's weights with its manifest; ``parents`` may be ids, prefixes or names of
        models in this store. ``run``: ``{"id", "key"}`` of the run and the save within it that
        produced the model (:meth:`find_run_product` finds it again). Returns the new record."""
        state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) \
            else model_or_state_dict
        parent_ids = [self.resolve(p) for p in parents]
        ancestry: dict[str, dict] = {}
        for pid in parent_ids:
            pm = self.manifest(pid)
            ancestry.update(pm.get("lineage", {}).get("ancestry", {}))
            ancestry[pid] = _summary(pm)
        mid = secrets.token_hex(6)
        manifest = {
            "format": FORMAT, "id": mid, "name": name or f"{backbone}-{strategy or 'model'}",
            "backbone": backbone, "config": dict(config), "dataset": dataset, "classes": [str(c) for c in classes],
            "metrics": dict(metrics), "created": _now(),
            "lineage": {"parents": parent_ids, "strategy": strategy, "options": dict(options), "ancestry": ancestry},
        }
        if run is not None:
            manifest["lineage"]["run"] = dict(run)
        return self._write(manifest, _serialize(state))

    def _write(self, manifest: dict[str, Any], weights: bytes) -> ModelRecord:
        manifest = dict(manifest, weights={"file": WEIGHTS, "sha256": _sha256(weights), "bytes": len(weights)})
        text = json.dumps(manifest, indent=2, default=str) + "\n"
        self.models.mkdir(parents=True, exist_ok=True)
        tmp = self.models / f".tmp-{manifest['id']}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            with atomic_open(tmp / WEIGHTS) as f:
                f.write(weights)
            with atomic_open(tmp / MANIFEST, "w") as f:
                f.write(text)
            os.replace(tmp, self.models / manifest["id"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.models)
        return ModelRecord(manifest["id"], self.models / manifest["id"], json.loads(text))

    def rm(self, ref: str) -> dict[str, Any]:
        """Remove a model; returns its manifest. Its descendants keep its summary in their lineage."""
        mid = self.resolve(ref)
        manifest = self._read_manifest(mid, check=False)
        trash = self.models / f".rm-{mid}-{secrets.token_hex(4)}"
        os.replace(self.models / mid, trash)  # gone from the store in one step; then delete at leisure
        shutil.rmtree(trash)
        return manifest

    # ---------------------------------------------------------------- reading

    def _ids(self) -> list[str]:
        if not self.models.is_dir():
            return []
        return sorted(p.name for p in self.models.iterdir() if p.is_dir() and not p.name.startswith("."))

    def resolve(self, ref: str) -> str:
        """The full id of the model named by an id, a unique id prefix, or a unique name."""
        ids = self._ids()
        if ref in ids:
            return ref
        by_prefix = [i for i in ids if i.startswith(ref)] if ref else []
        if len(by_prefix) == 1:
            return by_prefix[0]
        if len(by_prefix) > 1:
            raise StoreError(f"{ref!r} is the start of {len(by_prefix)} model ids ({', '.join(by_prefix[:8])}); "
                             "give more characters")
        by_name = [m["id"] for m in self.list() if m.get("name") == ref]
        if len(by_name) == 1:
            return by_name[0]
        if by_name:
            raise StoreError(f"{len(by_name)} models are named {ref!r} ({', '.join(by_name)}); use an id")
        raise StoreError(f"no model {ref!r} in the store at {self.root} (`reuse models list` shows what it holds)")

    def _read_manifest(self, mid: str, *, check: bool = True) -> dict[str, Any]:
        path = self.models / mid / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"model {mid}: {path} is missing (an incomplete or damaged entry)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"model {mid}: {path} is not a readable manifest ({e})") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"model {mid}: {path} is not a manifest (a JSON object)")
        if check:
            missing = [k for k in ("id", "backbone", "classes", "weights", "lineage") if k not in manifest]
            if missing:
                raise StoreError(f"model {mid}: the manifest lacks {', '.join(missing)}")
            if manifest["id"] != mid:
                raise StoreError(f"model {mid}: its manifest names another id ({manifest['id']!r}); it was edited")
        return manifest

    def manifest(self, ref: str) -> dict[str, Any]:
        return self._read_manifest(self.resolve(ref))

    def get(self, ref: str) -> ModelRecord:
        mid = self.resolve(ref)
        return ModelRecord(mid, self.models / mid, self._read_manifest(mid))

    def list(self) -> list[dict[str, Any]]:
        """Every model's manifest, oldest first. An unreadable entry appears as {"id", "error"}
        rather than hiding the others."""
        out = []
        for mid in self._ids():
            try:
                out.append(self._read_manifest(mid))
            except StoreError as e:
                out.append({"id": mid, "error": str(e)})
        return sorted(out, key=lambda m: (m.get("created") or "", m["id"]))

    def find_run_product(self, run_id: str, key: str) -> str | None:
        """The id of the model that save ``key`` of run ``run_id`` stored, or None."""
        for m in self.list():
            if m.get("lineage", {}).get("run") == {"id": run_id, "key": key}:
                return m["id"]
        return None

    def _verified_weights(self, mid: str) -> tuple[bytes, dict[str, Any]]:
        manifest = self._read_manifest(mid)
        path = self.models / mid / WEIGHTS
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"model {mid}: cannot read its weights {path} ({e})") from None
        want = manifest["weights"].get("sha256")
        got = _sha256(data)
        if got != want:
            raise StoreError(f"model {mid}: the weights {path} do not match the sha256 in its manifest "
                             f"(expected {want}, found {got}, {len(data)} bytes): the file is corrupted or was "
                             f"changed, or the manifest was edited. Refusing to load it; `reuse models rm {mid}` "
                             "removes it.")
        return data, manifest

    def verify(self, ref: str) -> dict[str, Any]:
        """The manifest, after checking the weights against its sha256 (StoreError if they differ)."""
        return self._verified_weights(self.resolve(ref))[1]

    def load(self, ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(state_dict on the CPU, manifest), the weights checked against the manifest's sha256."""
        mid = self.resolve(ref)
        data, manifest = self._verified_weights(mid)
        try:
            return st_load(data), manifest
        except (SafetensorError, ValueError) as e:
            raise StoreError(f"model {mid}: its weights are not a valid safetensors file ({e})") from None

    # ---------------------------------------------------------------- lineage

    def lineage(self, ref: str) -> dict[str, Any]:
        """How knowledge flowed into and out of a model, as a graph:
        ``{"id", "nodes": {id: summary}, "ancestors": [ids], "descendants": [ids]}``. A summary has
        id, name, strategy, backbone, dataset, created, parents and ``in_store`` (False for an
        ancestor known only from the summaries its descendants carry)."""
        mid = self.resolve(ref)
        manifests = {m["id"]: m for m in self.list() if "error" not in m}
        nodes = {i: dict(_summary(m), in_store=True) for i, m in manifests.items()}
        for m in manifests.values():
            for aid, s in m.get("lineage", {}).get("ancestry", {}).items():
                nodes.setdefault(aid, dict(s, in_store=False))

        def walk(start: str, step) -> list[str]:
            seen: list[str] = []
            todo = list(step(start))
            while todo:
                i = todo.pop(0)
                if i not in seen and i != start:
                    seen.append(i)
                    todo.extend(step(i))
            return seen

        children: dict[str, list[str]] = {}
        for i, s in nodes.items():
            for p in s["parents"]:
                children.setdefault(p, []).append(i)
        for p in {p for s in nodes.values() for p in s["parents"]} - nodes.keys():
            nodes[p] = {"id": p, "name": None, "strategy": None, "parents": [], "in_store": False}
        ancestors = walk(mid, lambda i: nodes[i]["parents"])
        descendants = walk(mid, lambda i: children.get(i, []))
        keep = {mid, *ancestors, *descendants}
        return {"id": mid, "nodes": {i: nodes[i] for i in nodes if i in keep},
                "ancestors": ancestors, "descendants": descendants}

    # ---------------------------------------------------------------- moving models

    def export(self, ref: str, path: str | os.PathLike) -> Path:
        """Write the model as one self-contained .safetensors file (weights, with the manifest in
        the file's metadata) that :meth:`import_` reads back into any store. A folder ``path``
        gets ``<name>-<id>.safetensors`` inside it. Returns the file written."""
        mid = self.resolve(ref)
        data, manifest = self._verified_weights(mid)
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / f"{manifest['name']}-{mid}.safetensors"
        blob = st_save(st_load(data), metadata={EXPORT_KEY: json.dumps(manifest)})
        with atomic_open(path) as f:
            f.write(blob)
        return path

    def import_(self, path: str | os.PathLike, *, backbone: str | None = None, config: dict | None = None,
                classes: list[str] | int | None = None, name: str | None = None) -> ModelRecord:
        """Add a model from a file: an :meth:`export` of a store (keeps its id and lineage), or
        external weights for a registered ``backbone`` (a .safetensors file, or a PyTorch state_dict
        file .pt/.pth/.bin read with ``torch.load(weights_only=True)``), which become the root of a
        new lineage. External weights are checked against the backbone built with ``config`` and
        as many classes as ``classes`` gives (a count or names; default: the head's size)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise StoreError(f"{path}: no such file")
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
            except (SafetensorError, OSError) as e:
                raise StoreError(f"{path}: not a readable safetensors file ({e})") from None
            if EXPORT_KEY in meta:
                return self._import_export(path, meta[EXPORT_KEY], backbone=backbone)
            state, fmt = self._read_safetensors(path), "safetensors"
        elif path.suffix in TORCH_SUFFIXES:
            state, fmt = _read_torch_state(path), "torch"
        else:
            raise StoreError(f"{path}: unknown format; import takes .safetensors files (a store export or "
                             f"weights) and PyTorch state_dict files ({', '.join(TORCH_SUFFIXES)})")
        if not backbone:
            raise StoreError(f"{path}: external weights need the backbone they belong to (--backbone NAME; "
                             "`reuse plugins list` shows the registered ones)")
        return self._import_external(path, state, fmt, backbone=backbone, config=config or {}, classes=classes,
                                     name=name)

    @staticmethod
    def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
        try:
            return st_load(path.read_bytes())
        except (SafetensorError, ValueError) as e:
            raise StoreError(f"{path}: not a valid safetensors file ({e})") from None

    def _import_export(self, path: Path, meta: str, *, backbone: str | None) -> ModelRecord:
        try:
            manifest = json.loads(meta)
            mid, want = manifest["id"], manifest["weights"]["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StoreError(f"{path}: its {EXPORT_KEY} metadata is not a store manifest ({e})") from None
        if backbone and backbone != manifest.get("backbone"):
            raise StoreError(f"{path}: an export of a {manifest.get('backbone')} model, not {backbone}")
        data = _serialize(self._read_safetensors(path))
        if _sha256(data) != want:
            raise StoreError(f"{path}: the weights do not match the sha256 recorded in the export's manifest: "
                             "the file is corrupted or was changed. Refusing to import it.")
        if mid in self._ids():
            if self._read_manifest(mid)["weights"].get("sha256") == want:
                return self.get(mid)
            raise StoreError(f"{path}: the store already holds a different model with id {mid}")
        return self._write({k: v for k, v in manifest.items() if k != "weights"}, data)

    def _import_external(self, path: Path, state: dict[str, torch.Tensor], fmt: str, *, backbone: str,
                         config: dict, classes: list[str] | int | None, name: str | None) -> ModelRecord:
        from reuse_core import backbone as backbones

        config = dict(config)
        in_channels = int(config.pop("in_channels", 3))

        def build(num_classes: int) -> torch.nn.Module:
            try:
                try:
                    with torch.device("meta"):  # shapes only: no memory, no initialisation
                        return backbones.build(backbone, num_classes, in_channels, **config)
                except KeyError:
                    raise
                except Exception:  # a factory that cannot build on the meta device builds for real
                    return backbones.build(backbone, num_classes, in_channels, **config)
            except KeyError as e:  # the registry's UnknownNameError, which names close matches
                raise StoreError(f"{path}: {e.args[0] if e.args else e}") from None
            except (TypeError, ValueError) as e:
                raise StoreError(f"{path}: cannot build backbone {backbone!r} with {config}: {e}") from None

        if isinstance(classes, int):
            names = [str(i) for i in range(classes)]
        elif classes is not None:
            names = [str(c) for c in classes]
        else:
            head = build(2).head_name
            weight = state.get(f"{head}.weight")
            if weight is None or weight.dim() < 1:
                raise StoreError(f"{path}: no {head}.weight (the {backbone} head) to count the classes by; "
                                 "give them (--classes)")
            names = [str(i) for i in range(weight.shape[0])]
        want = {k: v.shape for k, v in build(len(names)).state_dict().items()}
        # BatchNorm fills in a missing num_batches_tracked itself (checkpoints older than PyTorch 0.4.1)
        problems = {
            "missing": [k for k in want if k not in state and not k.endswith("num_batches_tracked")],
            "unexpected": [k for k in state if k not in want],
            "wrong shape": [f"{k} {tuple(state[k].shape)} (the backbone has {tuple(want[k])})"
                            for k in want if k in state and state[k].shape != want[k]],
        }
        if any(problems.values()):
            detail = "; ".join(f"{len(v)} {what}: {', '.join(v[:4])}{', ...' if len(v) > 4 else ''}"
                               for what, v in problems.items() if v)
            raise StoreError(f"{path}: these weights do not fit backbone {backbone!r} with {len(names)} classes and "
                             f"{in_channels} input channels ({detail})")
        source = {"source": str(path.resolve()), "format": fmt, "source_sha256": _sha256(path.read_bytes())}
        return self.save(state, backbone=backbone, config={"in_channels": in_channels, **config},
                         dataset=None, classes=names, metrics={}, parents=[], strategy="import", options=source,
                         name=name or path.stem)


def _read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a PyTorch file (torchvision's plain dict; timm/Lightning-style
    {"state_dict": ...} or {"model": ...}; DDP's "module." prefixes dropped), unpickled with
    weights_only=True so a file that holds code is refused rather than run."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError, or whatever a damaged file makes the unpickler raise
        raise StoreError(f"{path}: not loadable as weights with torch.load(weights_only=True) ({e})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StoreError(f"{path}: not a state_dict (a dict of parameter name -> tensor)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def format_lineage(lineage: dict[str, Any]) -> str:
    """The lineage graph as a tree, roots first: ``pretrain -> finetune -> distill ...``; a model
    with several parents appears under each (expanded once)."""
    nodes, me = lineage["nodes"], lineage["id"]
    children: dict[str, list[str]] = {}
    for i, s in nodes.items():
        for p in s["parents"]:
            children.setdefault(p, []).append(i)

    def order(ids):
        return sorted(ids, key=lambda i: (nodes[i].get("created") or "", i))

    def label(i: str) -> str:
        s = nodes[i]
        parts = [f"{s.get('strategy') or '?':<9}", i]
        if s.get("name"):
            parts.append(s["name"])
        parts.append("(" + ", ".join(x for x in (s.get("backbone"), s.get("dataset")) if x) + ")"
                     if s.get("backbone") else "")
        if not s.get("in_store", True):
            parts.append("[not in this store]")
        if i == me:
            parts.append("<- this model")
        return "  ".join(p for p in parts if p)

    lines: list[str] = []
    shown: set[str] = set()

    def draw(i: str, prefix: str, last: bool, top: bool) -> None:
        lines.append(("" if top else prefix + ("└─ " if last else "├─ ")) + label(i)
                     + ("  (see above)" if i in shown else ""))
        if i in shown:
            return
        shown.add(i)
        kids = order(children.get(i, []))
        for k, c in enumerate(kids):
            draw(c, "" if top else prefix + ("   " if last else "│  "), k == len(kids) - 1, False)

    roots = order(i for i, s in nodes.items() if not any(p in nodes for p in s["parents"]))
    for r in roots:
        draw(r, "", True, True)
    return "\n".join(lines)
