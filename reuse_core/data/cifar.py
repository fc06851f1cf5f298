"""CIFAR-10 and CIFAR-100 from a local folder in the official layout, read by our own reader.

Both official formats are read (https://www.cs.toronto.edu/~kriz/cifar.html):

- binary: ``cifar-10-batches-bin/`` (data_batch_1..5.bin, test_batch.bin, batches.meta.txt) and
  ``cifar-100-binary/`` (train.bin, test.bin, fine_label_names.txt, coarse_label_names.txt);
  records of label byte(s) + 3072 pixel bytes;
- python: ``cifar-10-batches-py/`` and ``cifar-100-python/``: pickles, loaded with an unpickler
  that resolves only numpy's array reconstruction (never an arbitrary class or function), then
  checked against the documented layout.

Nothing is downloaded, and no checksum is demanded (torchvision's CIFAR classes insist on the
official ones). The official test set is ``split="test"``; "train" and "val" divide the official
training set, stratified by ``seed`` (``val_fraction`` of every class goes to val).
"""
from __future__ import annotations

import codecs
import functools
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reuse_core.data.base import ArrayDataset, array_dataset, check_split, stratified_split

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class Layout:
    title: str
    env: str
    bin_dir: str
    py_dir: str
    bin_train: tuple[str, ...]
    bin_test: str
    py_train: tuple[str, ...]
    py_test: str
    py_meta: str


CIFAR10 = Layout(
    "CIFAR-10", "REUSE_CORE_CIFAR10", "cifar-10-batches-bin", "cifar-10-batches-py",
    tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
)
CIFAR100 = Layout(
    "CIFAR-100", "REUSE_CORE_CIFAR100", "cifar-100-binary", "cifar-100-python",
    ("train.bin",), "test.bin", ("train",), "test", "meta",
)


class CifarFormatError(ValueError):
    """A file in the CIFAR folder is not in the documented layout (or is a tampered pickle, or one
    whose sizes or labels are out of range)."""


def _detail(e: BaseException) -> str:
    return str(e) or type(e).__name__  # a MemoryError has no message


def _bad_label(path: Path, label: object, num_classes: int) -> CifarFormatError:
    return CifarFormatError(f"{path}: label {label} is outside [0, {num_classes}) ({num_classes} class names)")


# ---- finding the folder ----------------------------------------------------------------------

def find(layout: Layout, root: str | os.PathLike | None) -> tuple[str, Path]:
    """("bin" or "py", the folder holding the files). ``root`` (else $REUSE_CORE_CIFAR10 /
    $REUSE_CORE_CIFAR100, else $REUSE_CORE_DATA) may be that folder or its parent."""
    bases = [Path(root)] if root else [Path(os.environ[v]) for v in (layout.env, "REUSE_CORE_DATA") if os.environ.get(v)]
    looked = []
    for base in bases:
        for fmt, sub, first in (("bin", layout.bin_dir, layout.bin_test), ("py", layout.py_dir, layout.py_test)):
            for folder in (base / sub, base):
                looked.append(str(folder / first))
                if (folder / first).is_file():
                    return fmt, folder
    where = "; looked for " + ", ".join(looked) if looked else (
        f"; no folder given: pass root=<dir> (the run option data_root), or set {layout.env}=<dir> or REUSE_CORE_DATA=<dir>")
    name = "cifar-10" if layout is CIFAR10 else "cifar-100"
    raise FileNotFoundError(
        f"{layout.title} not found{where}. Download {name}-binary.tar.gz (or {name}-python.tar.gz) from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into <dir>, so that "
        f"<dir>/{layout.bin_dir}/{layout.bin_test} (or <dir>/{layout.py_dir}/{layout.py_test}) exists; "
        f"nothing is downloaded for you"
    )


# ---- the binary format -----------------------------------------------------------------------

def read_bin(path: Path, label_bytes: int, label_index: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels) from one binary batch file; a label outside
    [0, num_classes) is refused."""
    record = label_bytes + PIXELS
    size = path.stat().st_size  # checked before reading: a file of the wrong length is never loaded
    if size == 0 or size % record:
        raise CifarFormatError(f"{path} is not a CIFAR binary batch: {size} bytes is not a multiple of the {record}-byte record")
    try:
        rows = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    except (MemoryError, ValueError) as e:  # too big to hold, or changed while read
        raise CifarFormatError(f"{path} is not a CIFAR binary batch: {_detail(e)}") from None
    labels = rows[:, label_index].astype(np.int64)
    if labels.max() >= num_classes:
        raise _bad_label(path, labels.max(), num_classes)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def read_names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ---- the python format -----------------------------------------------------------------------

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array-rebuilding function, wherever it lives

# The only globals a CIFAR pickle needs: numpy arrays (and, in protocol 2, the codec and the bytes
# type that rebuild byte strings). Anything else in a file is refused before it is resolved.
ALLOWED_GLOBALS = {
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR pickle holds only numpy arrays, lists and strings") from None


def read_pickle(path: Path) -> dict[str, object]:
    """A CIFAR python-format file as a dict with str keys, without running any code it names."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OverflowError, MemoryError) as e:
        # OverflowError, MemoryError: a crafted file whose strings or arrays claim absurd sizes
        raise CifarFormatError(f"{path} is not a CIFAR python-format file: {_detail(e)}") from None
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{path} is not a CIFAR python-format file: it holds a {type(obj).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _py_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = read_pickle(path)
    images, labels = d.get("data"), d.get(label_key)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2 and images.shape[1] == PIXELS):
        raise CifarFormatError(f"{path}: 'data' must be a uint8 array of shape (N, {PIXELS})")
    if not (isinstance(labels, list) and len(labels) == len(images) and all(type(y) is int for y in labels)):
        raise CifarFormatError(f"{path}: {label_key!r} must be a list of {len(images)} ints")
    bad = next((y for y in labels if not 0 <= y < num_classes), None)  # before int64 could overflow
    if bad is not None:
        raise _bad_label(path, bad, num_classes)
    return images.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _py_names(path: Path, key: str) -> list[str]:
    names = read_pickle(path).get(key)
    if not (isinstance(names, list) and all(isinstance(n, (bytes, str)) for n in names)):
        raise CifarFormatError(f"{path}: {key!r} must be a list of strings")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


# ---- both ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def read(layout: Layout, fmt: str, folder: Path, part: str, label_mode: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, class names) of the official "train" or "test" part. Every label must be
    in [0, number of class names)."""
    if fmt == "bin":
        files = layout.bin_train if part == "train" else (layout.bin_test,)
        if layout is CIFAR10:
            names = read_names(folder / "batches.meta.txt")
            batches = [read_bin(folder / f, 1, 0, len(names)) for f in files]
        else:
            names = read_names(folder / f"{label_mode}_label_names.txt")
            batches = [read_bin(folder / f, 2, 0 if label_mode == "coarse" else 1, len(names)) for f in files]
    else:
        files = layout.py_train if part == "train" else (layout.py_test,)
        if layout is CIFAR10:
            names = _py_names(folder / layout.py_meta, "label_names")
            batches = [_py_batch(folder / f, "labels", len(names)) for f in files]
        else:
            names = _py_names(folder / layout.py_meta, f"{label_mode}_label_names")
            batches = [_py_batch(folder / f, f"{label_mode}_labels", len(names)) for f in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return images, labels, names


def load(layout: Layout, *, split: str, seed: int, classes: Sequence[int] | None, root: str | None,
         val_fraction: float, label_mode: str = "fine") -> ArrayDataset:
    check_split(split)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    fmt, folder = find(layout, root)
    images, labels, names = read(layout, fmt, folder.resolve(), "test" if split == "test" else "train", label_mode)
    if split == "test":
        part = np.arange(len(labels))
    else:
        part = stratified_split(labels, seed, (1 - val_fraction, val_fraction))[split == "val"]
    # indices count the official training images first, then the test images
    offset = len(read(layout, fmt, folder.resolve(), "train", label_mode)[1]) if split == "test" else 0
    return array_dataset(images, labels, names, part=part, classes=classes, divisor=255, offset=offset)


def cifar10(*, split: str = "train", seed: int = 0, classes: Sequence[int] | None = None, root: str | None = None,
            val_fraction: float = 0.1) -> ArrayDataset:
    """CIFAR-10: 3x32x32 images in [0, 1], 10 classes; 50,000 train (val = ``val_fraction`` of
    them, by seed) and 10,000 test images."""
    return load(CIFAR10, split=split, seed=seed, classes=classes, root=root, val_fraction=val_fraction)


def cifar100(*, split: str = "train", seed: int = 0, classes: Sequence[int] | None = None, root: str | None = None,
             val_fraction: float = 0.1, label_mode: str = "fine") -> ArrayDataset:
    """CIFAR-100: 3x32x32 images in [0, 1], 100 fine classes (``label_mode="coarse"``: the 20
    superclasses); 50,000 train (val = ``val_fraction`` of them, by seed) and 10,000 test images."""
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    return load(CIFAR100, split=split, seed=seed, classes=classes, root=root, val_fraction=val_fraction, label_mode=label_mode)
