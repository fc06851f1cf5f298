"""The model store: trained models with where they came from.

One folder per model under ``<root>/models/<id>/``: ``model.safetensors`` (weights only; loading a
shared model runs no code) and ``manifest.json``: id, name, backbone and its build config,
dataset, classes, metrics, the weights' sha256, creation time, and lineage (parent ids, the
strategy and options that produced it, and a summary of every ancestor, so the story survives an
ancestor's removal or a trip to another store). Every write is atomic; every read of weights
checks the sha256 first, so a changed or truncated file is refused with a :class:`StoreError`.
An export can be quantised (:data:`QUANTIZE_SCHEMES`: int8 weights with float32 scales, or bf16):
it is a new model, its own id with the original as its parent, whose manifest's ``quantization``
records the scheme, the size against the float32 export and the validation accuracy before and
after; :meth:`ModelStore.load` gives its weights back dequantised, so it is used like any model.
A manifest that cannot be read (unparsable, too large, nested too deeply, fields of the wrong type)
marks only its own entry broken.

Models are named by id, by a unique prefix of one, or by name: several models may share a name
(each seed of a recipe step does); the name alone means the newest of them, ``NAME@N`` the N-th,
1 the oldest (:meth:`ModelStore.resolve`). Names hold no path separators, ``@`` or control
characters (:func:`check_name`), and what the store prints escapes control characters (:func:`printable`).
Building the nn.Module from a manifest is the strategies' job:
``backbone.build(m["backbone"], len(m["classes"]), **m["config"])`` then ``load_state_dict``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import unicodedata
from collections.abc import Callable
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
ID_PATTERN = re.compile(r"[0-9a-f]{12}")  # what save makes: secrets.token_hex(6)
NAME_MAX = 128  # characters
MANIFEST_MAX_BYTES = 8 << 20  # a manifest is a few KB; its ancestry grows by ~300 bytes an ancestor
MANIFEST_MAX_DEPTH = 64  # nesting of JSON objects and arrays
STALE_SECONDS = 30 * 60  # a .tmp-*/.rm-* folder untouched this long belongs to a save or rm that was killed
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # control (ANSI escapes, newlines), format (bidi), surrogates
NAME_RULE = (f"a model name is 1 to {NAME_MAX} characters, without '/', '\\', '@' (which separates a name "
             "from its version, NAME@N) or control characters, and is not '.' or '..'")


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


def _unprintable(c: str) -> bool:
    return unicodedata.category(c) in _UNPRINTABLE


def printable(text: Any) -> str:
    """``str(text)`` with control characters (ANSI escapes, newlines), invisible format characters
    and lone surrogates written as escapes (``\\x1b``, ``\\u202e``): safe to print to a terminal."""
    return "".join((f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") if _unprintable(c) else c
                   for c in str(text))


def _short(text: Any, limit: int = 60) -> str:
    text = str(text)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def check_name(name: Any) -> str:
    """``name`` if it may name a model (:data:`NAME_RULE`), else a :class:`StoreError` naming it."""
    if (not isinstance(name, str) or not name or len(name) > NAME_MAX or name in (".", "..")
            or any(c in "/\\@" or _unprintable(c) for c in name)):
        raise StoreError(f"the model name {_short(name)} is not allowed: {NAME_RULE}")
    return name


def clean_name(text: str, limit_bytes: int = 200) -> str:
    """``text`` made into an allowed name (and a safe file name): separators, ``@`` and control
    characters become ``_``, at most NAME_MAX characters and ``limit_bytes`` UTF-8 bytes."""
    out = "".join("_" if c in "/\\@" or _unprintable(c) else c for c in str(text))[:NAME_MAX]
    while len(out.encode("utf-8", "replace")) > limit_bytes:
        out = out[:-1]
    return out if out not in ("", ".", "..") else "model"


def _child(folder: Path, name: str) -> Path:
    """``folder / name``, after checking that it is one plain entry of ``folder``: the resolved path
    lies directly inside the resolved folder, so a write there cannot land anywhere else."""
    base = folder.resolve()
    if (name in ("", ".", "..") or any(c in name for c in "/\\\0")
            or Path(os.path.normpath(base / name)).parent != base):
        raise StoreError(f"{_short(name)} is not a plain entry of {folder}; refusing it")
    return folder / name


def _parse_json(text: str | bytes, where: str) -> Any:
    """JSON of bounded size and depth: a huge or deeply nested file is refused, not a RecursionError."""
    if len(text) > MANIFEST_MAX_BYTES:
        raise StoreError(f"{where} is not a readable manifest (over {MANIFEST_MAX_BYTES} bytes, more than any "
                         "manifest holds)")
    try:
        data = json.loads(text)
    except RecursionError:
        raise StoreError(f"{where} is not a readable manifest (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{where} is not a readable manifest ({e})") from None
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > MANIFEST_MAX_DEPTH:
                raise StoreError(f"{where} is not a readable manifest (nested more than {MANIFEST_MAX_DEPTH} deep)")
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return data


_FIELDS = {"id": str, "backbone": str, "classes": list, "weights": dict, "lineage": dict}  # required
_OPTIONAL_FIELDS = {"name": str, "config": dict, "metrics": dict, "created": str, "dataset": str,
                    "lineage.parents": list, "lineage.ancestry": dict, "lineage.strategy": str,
                    "lineage.options": dict, "weights.sha256": str, "quantization": dict,
                    "quantization.tensors": dict}  # null is allowed


def _check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """``manifest`` if it has the fields of one, of the types the store and ``reuse models`` use."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{where} is not a manifest (a JSON object)")
    missing = [k for k in _FIELDS if k not in manifest]
    if missing:
        raise StoreError(f"{where}: the manifest lacks {', '.join(missing)}")
    wrong = [k for k, kind in _FIELDS.items() if not isinstance(manifest[k], kind)]
    for key, kind in _OPTIONAL_FIELDS.items():
        outer, _, inner = key.rpartition(".")
        within = manifest.get(outer) if outer else manifest
        if isinstance(within, dict) and within.get(inner) is not None and not isinstance(within[inner], kind):
            wrong.append(key)
    if isinstance(manifest["classes"], list) and not all(isinstance(c, str) for c in manifest["classes"]):
        wrong.append("classes")
    parents = manifest["lineage"].get("parents") if isinstance(manifest["lineage"], dict) else None
    if isinstance(parents, list) and not all(isinstance(p, str) for p in parents):
        wrong.append("lineage.parents")
    if wrong:
        raise StoreError(f"{where}: the manifest's {', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the "
                         "wrong type (it was edited)")
    return manifest


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


def _parse_weights(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as e:
        raise StoreError(f"{where} is not a valid safetensors file ({e})") from None


# ---------------------------------------------------------------- quantised weights

QUANTIZE_SCHEMES = ("int8", "bf16")
QUANTIZE_STRATEGY = "quantize"  # the lineage strategy of a quantised export
SCALE_SUFFIX = "_scale"  # int8: the scales of weight W are stored as W + "_scale"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quantize_state(state: dict[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the tensors to store, {key: original dtype} of those quantised) for ``scheme``:

    - ``int8``: every floating tensor of 2 or more dimensions (Linear and Conv weights) becomes
      symmetric int8 per output channel (per index of dim 0): ``scale = max|W[c]| / 127``,
      ``q = round(W / scale)`` in [-127, 127], with the float32 scales stored under ``W_scale``;
      biases, norm parameters and buffers stay as they are (a few per cent of a model's size).
    - ``bf16``: every floating tensor becomes bfloat16.
    """
    if scheme not in QUANTIZE_SCHEMES:
        raise StoreError(f"unknown quantisation {scheme!r}; the schemes are {', '.join(QUANTIZE_SCHEMES)}")
    out: dict[str, torch.Tensor] = {}
    done: dict[str, str] = {}
    for key, v in state.items():
        if not v.is_floating_point() or (scheme == "int8" and v.dim() < 2):
            out[key] = v
            continue
        done[key] = str(v.dtype).removeprefix("torch.")
        if scheme == "bf16":
            out[key] = v.to(torch.bfloat16)
            continue
        if key + SCALE_SUFFIX in state:
            raise StoreError(f"cannot quantise {key}: the model already has a tensor {key + SCALE_SUFFIX}")
        w = v.detach().to(torch.float32)
        scale = w.abs().amax(dim=tuple(range(1, w.dim()))) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).view(-1, *[1] * (w.dim() - 1))
        out[key] = torch.round(w / safe).clamp(-127, 127).to(torch.int8)  # an all-zero channel stays 0
        out[key + SCALE_SUFFIX] = scale
    return out, done


def dequantize_state(tensors: dict[str, torch.Tensor], quantization: dict[str, Any], where: str = "the weights"
                     ) -> dict[str, torch.Tensor]:
    """The state dict :func:`quantize_state` stored ``tensors`` from, each quantised tensor back in
    its original dtype (``quantization``: a manifest's record, with ``scheme`` and ``tensors``)."""
    scheme, done = quantization.get("scheme"), quantization.get("tensors")
    if scheme not in QUANTIZE_SCHEMES or not isinstance(done, dict) or not all(v in _DTYPES for v in done.values()):
        raise StoreError(f"{where}: the manifest's quantization record is not one this store writes (it was edited)")
    scales = {k + SCALE_SUFFIX for k in done} if scheme == "int8" else set()
    out = {k: v for k, v in tensors.items() if k not in scales}
    for key, dtype in done.items():
        q = tensors.get(key)
        scale = tensors.get(key + SCALE_SUFFIX) if scheme == "int8" else None
        if q is None or (scheme == "int8" and (scale is None or q.dtype != torch.int8 or scale.shape != q.shape[:1])):
            raise StoreError(f"{where}: the quantised tensor {key} is missing or malformed")
        value = q.to(torch.float32) * scale.view(-1, *[1] * (q.dim() - 1)) if scale is not None else q
        out[key] = value.to(_DTYPES[dtype])
    return out


def training_options(manifest: dict[str, Any]) -> dict[str, Any]:
    """The options of the run that trained a model (its seed and data settings, say): its own
    lineage's, or for a quantised export its source's."""
    lineage = manifest.get("lineage") or {}
    options = lineage.get("options") or {}
    if lineage.get("strategy") == QUANTIZE_STRATEGY:
        return options.get("source_options") or {}
    return options


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the state dict, dequantised, and the manifest) of a store export file, checked against
    the sha256 its manifest carries, without importing it into a store."""
    path = Path(path).expanduser()
    manifest = export_manifest(path)
    tensors = _parse_weights(path.read_bytes(), str(path))
    if _sha256(_serialize(tensors)) != manifest["weights"].get("sha256"):
        raise StoreError(f"{path}: the weights do not match the sha256 recorded in the export's manifest")
    if manifest.get("quantization"):
        tensors = dequantize_state(tensors, manifest["quantization"], str(path))
    return tensors, manifest


def export_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest a store export file carries (read from its header; the weights are not read)."""
    path = Path(path).expanduser()
    meta = _safetensors_metadata(path)
    if EXPORT_KEY not in meta:
        raise StoreError(f"{path}: not a store export (no {EXPORT_KEY} metadata)")
    where = f"{path}: its {EXPORT_KEY} metadata"
    return _check_manifest(_parse_json(meta[EXPORT_KEY], where), where)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise StoreError(f"{path}: not a readable safetensors file ({e})") from None


def _node(fields: dict[str, Any], strategy: Any, parents: Any) -> dict[str, Any]:
    """A lineage summary with the types format_lineage relies on, whatever an edited manifest holds."""
    def text(v: Any) -> str | None:
        return v if v is None or isinstance(v, str) else str(v)

    return {**{k: text(fields.get(k)) for k in _SUMMARY_KEYS}, "strategy": text(strategy),
            "parents": [p for p in parents if isinstance(p, str)] if isinstance(parents, list) else []}


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    lineage = manifest.get("lineage") if isinstance(manifest.get("lineage"), dict) else {}
    return _node(manifest, lineage.get("strategy"), lineage.get("parents"))


def _by_name(models: list[dict[str, Any]]) -> dict[str, list[str]]:
    """name -> the ids of the readable models of that name, in ``models``' order (list(): oldest first)."""
    out: dict[str, list[str]] = {}
    for m in models:
        if "error" not in m and isinstance(m.get("name"), str):
            out.setdefault(m["name"], []).append(m["id"])
    return out


def version_labels(models: list[dict[str, Any]]) -> dict[str, str]:
    """id -> ``NAME@N`` for the models of :meth:`ModelStore.list` (N counts from 1, the oldest)."""
    return {mid: f"{name}@{n}" for name, ids in _by_name(models).items() for n, mid in enumerate(ids, 1)}


def _cycle(nodes: dict[str, dict[str, Any]]) -> list[str]:
    """A cycle of parent links among ``nodes``, parent first and the first id again at the end
    (``[a, b, a]``: a is b's parent and b is a's), or [] where there is none."""
    pending = {i: len({p for p in s["parents"] if p in nodes}) for i, s in nodes.items()}
    children: dict[str, list[str]] = {}
    for i, s in nodes.items():
        for p in {p for p in s["parents"] if p in nodes}:
            children.setdefault(p, []).append(i)
    todo = [i for i, n in pending.items() if n == 0]
    while todo:  # peel off the models whose parents are all peeled off; what stays is on or below a cycle
        for c in children.get(todo.pop(), []):
            pending[c] -= 1
            if pending[c] == 0:
                todo.append(c)
    left = [i for i, n in pending.items() if n]
    if not left:
        return []
    path, at = [], left[0]
    while at not in path:  # every model left has a parent left: walk up until one repeats
        path.append(at)
        at = next(p for p in nodes[at]["parents"] if pending.get(p))
    return [*reversed(path[path.index(at):]), path[-1]]


def _refuse_cycle(nodes: dict[str, dict[str, Any]], mid: str) -> None:
    cycle = _cycle(nodes)
    if cycle:
        names = [f"{i} ({nodes[i].get('name')})" if nodes[i].get("name") else i for i in cycle]
        raise StoreError(f"the lineage of {mid} has a cycle, each model a parent of the next: {' -> '.join(names)}; "
                         "a manifest was edited")


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
        models in this store. ``name`` must follow :data:`NAME_RULE` (default:
        ``<backbone>-<strategy>``); a name already in the store is fine: this model becomes its
        newest version. ``run``: ``{"id", "key"}`` of the run and the save within it that produced
        the model (:meth:`find_run_product` finds it again). Returns the new record."""
        state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) \
            else model_or_state_dict
        parent_ids = [self.resolve(p) for p in parents]
        ancestry: dict[str, dict] = {}
        for pid in parent_ids:
            pm = self.manifest(pid)
            ancestry.update(pm.get("lineage", {}).get("ancestry", {}))
            ancestry[pid] = _summary(pm)
        name = check_name(name) if name is not None else clean_name(f"{backbone}-{strategy or 'model'}")
        mid = secrets.token_hex(6)
        manifest = {
            "format": FORMAT, "id": mid, "name": name,
            "backbone": backbone, "config": dict(config), "dataset": dataset, "classes": [str(c) for c in classes],
            "metrics": dict(metrics), "created": _now(),
            "lineage": {"parents": parent_ids, "strategy": strategy, "options": dict(options), "ancestry": ancestry},
        }
        if run is not None:
            manifest["lineage"]["run"] = dict(run)
        return self._write(manifest, _serialize(state))

    def _write(self, manifest: dict[str, Any], weights: bytes) -> ModelRecord:
        mid = manifest["id"]
        if not isinstance(mid, str) or not ID_PATTERN.fullmatch(mid):
            raise StoreError(f"{_short(mid)} is not a store id (12 hex digits)")
        manifest = dict(manifest, weights={"file": WEIGHTS, "sha256": _sha256(weights), "bytes": len(weights)})
        text = json.dumps(manifest, indent=2, default=str) + "\n"
        self.models.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        final = _child(self.models, mid)
        tmp = _child(self.models, f".tmp-{mid}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            with atomic_open(tmp / WEIGHTS) as f:
                f.write(weights)
            with atomic_open(tmp / MANIFEST, "w") as f:
                f.write(text)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.models)
        return ModelRecord(mid, final, json.loads(text))

    def _remove_leftovers(self) -> None:
        """Delete the ``.tmp-*`` folders of saves (and ``.rm-*`` of removals) that were killed midway:
        those in which nothing changed for STALE_SECONDS. A writer at work changes its folder all the
        time (it creates files there, the weights file grows), so its folder is never taken; a writer
        paused for that long finds its folder gone and fails, leaving the store as it was."""
        now = time.time()
        for p in self.models.iterdir():
            if not p.name.startswith((".tmp-", ".rm-")) or p.is_symlink() or not p.is_dir():
                continue
            try:
                changed = max([p.stat().st_mtime, *(c.lstat().st_mtime for c in p.iterdir())])
            except OSError:  # gone already, or not ours to look into
                continue
            if now - changed > STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)

    def rm(self, ref: str) -> dict[str, Any]:
        """Remove a model (a broken entry too); returns its manifest, as far as it is readable.
        Its descendants keep its summary in their lineage."""
        mid = self.resolve(ref)
        try:
            manifest = {**self._read_manifest(mid, check=False), "id": mid}
        except StoreError:
            manifest = {"id": mid}
        trash = _child(self.models, f".rm-{mid}-{secrets.token_hex(4)}")
        os.replace(_child(self.models, mid), trash)  # gone from the store in one step; then delete at leisure
        shutil.rmtree(trash)
        return manifest

    # ---------------------------------------------------------------- reading

    def _ids(self) -> list[str]:
        if not self.models.is_dir():
            return []
        return sorted(p.name for p in self.models.iterdir() if p.is_dir() and not p.name.startswith("."))

    def resolve(self, ref: str) -> str:
        """The full id of the model ``ref`` names, the first of these that matches:

        1. an id;
        2. a name: the newest model of that name (the last in :meth:`list`'s order, by creation time);
        3. ``NAME@N``: the N-th model of that name, 1 the oldest (ids hold no ``@``, so this never
           meets an id; ``reuse models list`` shows each model's ``NAME@N``);
        4. the start of exactly one id.

        A name comes before an id prefix, so a name the store accepted always finds its own model,
        even one that reads like the start of an id ("cafe"); give more of the id to mean that one.
        """
        ids = self._ids()
        if ref in ids:
            return ref
        named = _by_name(self.list())
        if ref in named:
            return named[ref][-1]
        name, at, number = ref.rpartition("@")
        if at and name in named:
            versions = named[name]
            if not re.fullmatch(r"[0-9]+", number) or not 1 <= int(number) <= len(versions):
                n = len(versions)
                raise StoreError(f"no model {ref!r}: {name!r} names " + (f"1 model, {name}@1" if n == 1 else
                                 f"{n} models, {name}@1 (the oldest) to {name}@{n} (the newest, also just {name!r})"))
            return versions[int(number) - 1]
        by_prefix = [i for i in ids if i.startswith(ref)] if ref else []
        if len(by_prefix) == 1:
            return by_prefix[0]
        if by_prefix:
            raise StoreError(f"{ref!r} is the start of {len(by_prefix)} model ids ({', '.join(by_prefix[:8])}); "
                             "give more characters")
        raise StoreError(f"no model {ref!r} in the store at {self.root} (`reuse models list` shows what it holds)")

    def _read_manifest(self, mid: str, *, check: bool = True) -> dict[str, Any]:
        path = _child(self.models, mid) / MANIFEST
        where = f"model {mid}: {path}"
        try:
            with open(path, "rb") as f:
                text = f.read(MANIFEST_MAX_BYTES + 1)  # no more than that is read, however large the file
        except FileNotFoundError:
            raise StoreError(f"{where} is missing (an incomplete or damaged entry)") from None
        except OSError as e:
            raise StoreError(f"{where} is not a readable manifest ({e})") from None
        manifest = _parse_json(text, where)
        if not check:
            if not isinstance(manifest, dict):
                raise StoreError(f"{where} is not a manifest (a JSON object)")
            return manifest
        _check_manifest(manifest, where)
        if manifest["id"] != mid:
            raise StoreError(f"model {mid}: its manifest names another id ({_short(manifest['id'])}); it was edited")
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
        """(state_dict on the CPU, manifest), the weights checked against the manifest's sha256; a
        quantised model's dequantised (:func:`dequantize_state`)."""
        mid = self.resolve(ref)
        data, manifest = self._verified_weights(mid)
        where = f"model {mid}: its weights {self.models / mid / WEIGHTS}"
        state = _parse_weights(data, where)
        if manifest.get("quantization"):
            state = dequantize_state(state, manifest["quantization"], where)
        return state, manifest

    # ---------------------------------------------------------------- lineage

    def lineage(self, ref: str) -> dict[str, Any]:
        """How knowledge flowed into and out of a model, as a graph:
        ``{"id", "nodes": {id: summary}, "ancestors": [ids], "descendants": [ids]}``. A summary has
        id, name, strategy, backbone, dataset, created, parents and ``in_store`` (False for an
        ancestor known only from the summaries its descendants carry). Broken entries of the store
        are left out (a broken ``ref`` is a StoreError); a cycle of parents is a StoreError naming it."""
        mid = self.resolve(ref)
        entries = self.list()
        for m in entries:
            if m["id"] == mid and "error" in m:
                raise StoreError(m["error"])
        manifests = {m["id"]: m for m in entries if "error" not in m}
        nodes = {i: dict(_summary(m), in_store=True) for i, m in manifests.items()}
        for m in manifests.values():
            for aid, s in (m["lineage"].get("ancestry") or {}).items():
                if isinstance(s, dict):
                    nodes.setdefault(aid, dict(_node(s, s.get("strategy"), s.get("parents")), id=aid, in_store=False))

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
        kept = {i: nodes[i] for i in nodes if i in keep}
        _refuse_cycle(kept, mid)
        return {"id": mid, "nodes": kept, "ancestors": ancestors, "descendants": descendants}

    # ---------------------------------------------------------------- moving models

    def export(self, ref: str, path: str | os.PathLike, *, quantize: str | None = None,
               evaluate: Callable[[dict[str, torch.Tensor]], float] | None = None) -> Path:
        """Write the model as one self-contained .safetensors file (weights, with the manifest in
        the file's metadata) that :meth:`import_` reads back into any store. A folder ``path``
        gets ``<name>-<id>.safetensors`` inside it (the name made safe: :func:`clean_name`). Returns
        the file written.

        ``quantize`` (:data:`QUANTIZE_SCHEMES`, :func:`quantize_state`) writes a quantised copy
        instead: a new model named ``<name>-<scheme>``, whose id follows from the original's and
        the quantised weights (exporting twice gives one id), with the original as its parent. Its
        manifest's ``quantization`` records the scheme, the quantised tensors, the file's bytes
        against the float32 export's (``size_ratio``) and, when ``evaluate`` (state dict ->
        validation accuracy) is given, the accuracy before and after (``val_accuracy``)."""
        mid = self.resolve(ref)
        data, manifest = self._verified_weights(mid)
        state = _parse_weights(data, f"model {mid}: its weights {self.models / mid / WEIGHTS}")
        if quantize is None:
            blob = st_save(state, metadata={EXPORT_KEY: json.dumps(manifest)})
        else:
            if manifest.get("quantization"):  # quantised already: start from its dequantised weights
                state = dequantize_state(state, manifest["quantization"], f"model {mid}")
            manifest, blob = _quantized_export(manifest, state, quantize, evaluate)
        path = Path(path).expanduser()
        if path.is_dir():
            name = f"{clean_name(manifest.get('name') or 'model')}-{clean_name(manifest['id'])}.safetensors"
            path = _child(path, name)
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
        if name is not None:
            check_name(name)
        if not path.is_file():
            raise StoreError(f"{path}: no such file")
        if path.suffix == ".safetensors":
            meta = _safetensors_metadata(path)
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
                             "`reuse backbones` lists the registered ones)")
        return self._import_external(path, state, fmt, backbone=backbone, config=config or {}, classes=classes,
                                     name=name)

    @staticmethod
    def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
        return _parse_weights(path.read_bytes(), str(path))

    def _import_export(self, path: Path, meta: str, *, backbone: str | None) -> ModelRecord:
        where = f"{path}: its {EXPORT_KEY} metadata"
        manifest = _check_manifest(_parse_json(meta, where), where)
        mid, want = manifest["id"], manifest["weights"].get("sha256")
        if not ID_PATTERN.fullmatch(mid):
            raise StoreError(f"{path}: the export's manifest gives the id {_short(mid)}, which is not a store id "
                             "(12 hex digits); refusing to import it")
        try:
            check_name(manifest.get("name"))
        except StoreError as e:
            raise StoreError(f"{path}: {e}; refusing to import it") from None
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
                         name=name if name is not None else clean_name(path.stem))


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


def _quantized_export(source: dict[str, Any], state: dict[str, torch.Tensor], scheme: str,
                      evaluate: Callable[[dict[str, torch.Tensor]], float] | None) -> tuple[dict[str, Any], bytes]:
    """(the manifest, the file) of the quantised export of the model ``source`` with float weights ``state``."""
    tensors, done = quantize_state(state, scheme)
    weights = _serialize(tensors)
    sha = _sha256(weights)
    float_bytes = len(st_save({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()},
                              metadata={EXPORT_KEY: json.dumps(source)}))
    accuracy = None
    if evaluate is not None:
        before, after = evaluate(state), evaluate(dequantize_state(tensors, {"scheme": scheme, "tensors": done}))
        accuracy = {"float32": before, "quantized": after, "change": after - before}
    lineage = source["lineage"]
    manifest = {
        "format": FORMAT, "id": _sha256(f"{source['id']}/{scheme}/{sha}".encode())[:12],
        "name": clean_name(f"{source.get('name') or 'model'}-{scheme}"), "backbone": source["backbone"],
        "config": source.get("config") or {}, "dataset": source.get("dataset"), "classes": source["classes"],
        "metrics": {"val_accuracy": accuracy["quantized"]} if accuracy else {}, "created": _now(),
        "lineage": {"parents": [source["id"]], "strategy": QUANTIZE_STRATEGY,
                    "options": {"scheme": scheme, "source_options": training_options(source)},
                    "ancestry": {**(lineage.get("ancestry") or {}), source["id"]: _summary(source)}},
        "quantization": {"scheme": scheme, "tensors": done, "source": source["id"], "float32_export_bytes": float_bytes,
                         "bytes": 0, "size_ratio": 0.0, "val_accuracy": accuracy},
        "weights": {"file": WEIGHTS, "sha256": sha, "bytes": len(weights)},
    }
    record = manifest["quantization"]
    for _ in range(8):  # the file records its own size: write it until that is the size written (twice or
        blob = st_save(tensors, metadata={EXPORT_KEY: json.dumps(manifest)})  # so; safetensors pads its header)
        if record["bytes"] == len(blob):
            break
        record.update(bytes=len(blob), size_ratio=round(len(blob) / float_bytes, 4))
    return manifest, blob


def format_lineage(lineage: dict[str, Any]) -> str:
    """The lineage graph as a tree, roots first: ``pretrain -> finetune -> distill ...``; a model
    with several parents appears under each (expanded once). Control characters in names and the
    like are escaped (:func:`printable`); a cycle of parents is a StoreError."""
    nodes, me = lineage["nodes"], lineage["id"]
    _refuse_cycle(nodes, me)
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
        return printable("  ".join(p for p in parts if p))

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
