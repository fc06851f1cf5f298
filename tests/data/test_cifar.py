"""CIFAR-10/100 through the project's own reader: tiny folders written in the official layouts
(binary and python versions), root resolution, and tampered pickles refused."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from reuse_core import data
from reuse_core.data import cifar
from reuse_core.data.cifar import CifarFormatError

RNG = np.random.default_rng(7)
C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
C100_FINE = [f"fine{i}" for i in range(100)]
C100_COARSE = [f"coarse{i}" for i in range(20)]


def c10_batches():
    """Five training batches of 10 images (one per class) and a test batch of 10."""
    return [(RNG.integers(0, 256, (10, 3072), dtype=np.uint8), list(RNG.permutation(10).tolist())) for _ in range(6)]


def write_c10_bin(folder, batches):
    folder.mkdir(parents=True)
    for name, (x, y) in zip([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"], batches):
        np.concatenate([np.asarray(y, np.uint8)[:, None], x], axis=1).tofile(folder / name)
    (folder / "batches.meta.txt").write_text("\n".join(C10_NAMES) + "\n\n")


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))  # as the official files: protocol 2, bytes keys


def write_c10_py(folder, batches):
    folder.mkdir(parents=True)
    for name, (x, y) in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], batches):
        dump(folder / name, {b"batch_label": name.encode(), b"labels": y, b"data": x,
                             b"filenames": [b"img%d.png" % i for i in range(len(y))]})
    dump(folder / "batches.meta", {b"label_names": [n.encode() for n in C10_NAMES], b"num_cases_per_batch": 10, b"num_vis": 3072})


def c100_parts():
    parts = {}
    for part, n in (("train", 200), ("test", 100)):
        fine = RNG.permutation(np.arange(n) % 100)
        parts[part] = (RNG.integers(0, 256, (n, 3072), dtype=np.uint8), fine.tolist(), (fine // 5).tolist())
    return parts


def write_c100(root, parts):
    b, p = root / "cifar-100-binary", root / "cifar-100-python"
    b.mkdir(parents=True)
    p.mkdir(parents=True)
    for part, (x, fine, coarse) in parts.items():
        np.concatenate([np.asarray(coarse, np.uint8)[:, None], np.asarray(fine, np.uint8)[:, None], x], axis=1).tofile(b / f"{part}.bin")
        dump(p / part, {b"filenames": [], b"batch_label": b"", b"fine_labels": fine, b"coarse_labels": coarse, b"data": x})
    (b / "fine_label_names.txt").write_text("\n".join(C100_FINE))
    (b / "coarse_label_names.txt").write_text("\n".join(C100_COARSE))
    dump(p / "meta", {b"fine_label_names": [n.encode() for n in C100_FINE], b"coarse_label_names": [n.encode() for n in C100_COARSE]})


@pytest.fixture(scope="module")
def c10(tmp_path_factory):
    batches = c10_batches()
    root = tmp_path_factory.mktemp("c10")
    write_c10_bin(root / "bin" / "cifar-10-batches-bin", batches)
    write_c10_py(root / "py" / "cifar-10-batches-py", batches)
    return root, batches


def as_arrays(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))]).numpy(), np.asarray(ds.targets)


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar10_reads_the_official_layout(c10, fmt):
    root, batches = c10
    test = data.load("cifar10", split="test", root=str(root / fmt))
    x, y = as_arrays(test)
    assert test.classes == C10_NAMES and test.in_channels == 3 and test.input_size == (32, 32)
    assert x.dtype == np.float32 and x.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(x, batches[5][0].reshape(-1, 3, 32, 32) / np.float32(255))
    assert y.tolist() == batches[5][1]
    train = data.load("cifar10", split="train", seed=3, root=str(root / fmt), val_fraction=0.2)
    val = data.load("cifar10", split="val", seed=3, root=str(root / fmt), val_fraction=0.2)
    assert (len(train), len(val)) == (40, 10) and sorted(val.targets) == list(range(10))  # stratified
    all_train = np.concatenate([b[0] for b in batches[:5]]).reshape(-1, 3, 32, 32) / np.float32(255)
    seen = {a.tobytes() for a in np.concatenate([as_arrays(train)[0], as_arrays(val)[0]])}
    assert seen == {a.tobytes() for a in all_train}
    sub = data.load("cifar10", split="test", root=str(root / fmt), classes=[9, 0])
    assert sub.classes == ["truck", "airplane"] and sorted(sub.targets) == [0, 1]


def test_both_formats_give_the_same_data(c10):
    root, _ = c10
    for split in ("train", "val", "test"):
        a = as_arrays(data.load("cifar10", split=split, seed=1, root=str(root / "bin")))
        b = as_arrays(data.load("cifar10", split=split, seed=1, root=str(root / "py" / "cifar-10-batches-py")))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_root_from_the_environment(c10, monkeypatch):
    root, _ = c10
    monkeypatch.setenv("REUSE_CORE_DATA", str(root / "py"))
    assert len(data.load("cifar10", split="test")) == 10
    monkeypatch.setenv("REUSE_CORE_CIFAR10", str(root / "bin" / "cifar-10-batches-bin"))
    assert cifar.find(cifar.CIFAR10, None) == ("bin", root / "bin" / "cifar-10-batches-bin")


def test_a_missing_folder_says_what_to_put_where(tmp_path, monkeypatch):
    for var in ("REUSE_CORE_CIFAR10", "REUSE_CORE_CIFAR100", "REUSE_CORE_DATA"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found; no folder given: pass root=<dir> \(the run option "
                       r"data_root\), or set REUSE_CORE_CIFAR10=<dir> or REUSE_CORE_DATA=<dir>\. Download cifar-10-binary"):
        data.load("cifar10")
    with pytest.raises(FileNotFoundError) as exc:
        data.load("cifar100", root=str(tmp_path))
    assert f"looked for {tmp_path}/cifar-100-binary/test.bin" in str(exc.value)
    assert "so that <dir>/cifar-100-binary/test.bin (or <dir>/cifar-100-python/test) exists" in str(exc.value)


@pytest.mark.parametrize("fmt", ["cifar-100-binary", "cifar-100-python"])
def test_cifar100_fine_and_coarse(tmp_path, fmt):
    parts = c100_parts()
    write_c100(tmp_path, parts)
    test = data.load("cifar100", split="test", root=str(tmp_path / fmt))
    assert len(test.classes) == 100 and test.targets == parts["test"][1]
    np.testing.assert_array_equal(as_arrays(test)[0], parts["test"][0].reshape(-1, 3, 32, 32) / np.float32(255))
    coarse = data.load("cifar100", split="train", root=str(tmp_path / fmt), label_mode="coarse", val_fraction=0.5)
    assert coarse.classes == C100_COARSE and len(coarse) == 100 and np.bincount(coarse.targets).tolist() == [5] * 20


def test_a_tampered_pickle_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    write_c10_py(folder, c10_batches())
    dump(folder / "test_batch", {b"labels": [0], b"data": np.zeros((1, 3072), np.uint8), b"x": Evil()})
    with pytest.raises(CifarFormatError, match=r"test_batch is not a CIFAR python-format file: refusing to load "
                       r"posix\.system: a CIFAR pickle holds only numpy arrays, lists and strings"):
        data.load("cifar10", split="test", root=str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ({b"labels": [0], b"data": np.zeros((1, 3072), object)}, r"'data' must be a uint8 array of shape \(N, 3072\)"),
    ({b"labels": [0, 1], b"data": np.zeros((1, 3072), np.uint8)}, "'labels' must be a list of 1 ints"),
    ([1, 2], "it holds a list, not a dict"),
])
def test_pickles_outside_the_documented_layout_are_refused(tmp_path, content, message):
    folder = tmp_path / "cifar-10-batches-py"
    write_c10_py(folder, c10_batches())
    dump(folder / "test_batch", content)
    with pytest.raises(CifarFormatError, match=message):
        data.load("cifar10", split="test", root=str(folder))


def test_a_truncated_binary_batch_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_c10_bin(folder, c10_batches())
    (folder / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(CifarFormatError, match="test_batch.bin is not a CIFAR binary batch: 3000 bytes is not a multiple of the 3073-byte record"):
        data.load("cifar10", split="test", root=str(tmp_path))


@pytest.mark.parametrize("label", [-1, 10, 2**70])
def test_a_python_batch_with_a_label_out_of_range_is_refused(tmp_path, label):
    folder = tmp_path / "cifar-10-batches-py"
    write_c10_py(folder, c10_batches())
    dump(folder / "test_batch", {b"labels": [3, label], b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(CifarFormatError, match=rf"test_batch: label {label} is outside \[0, 10\) \(10 class names\)"):
        data.load("cifar10", split="test", root=str(folder), classes=[8, 9])


@pytest.mark.parametrize("fmt", ["cifar-100-binary", "cifar-100-python"])
def test_a_cifar100_label_beyond_the_coarse_names_is_refused(tmp_path, fmt):
    parts = c100_parts()
    x, fine, coarse = parts["test"]
    parts["test"] = (x, fine, [20, *coarse[1:]])  # 20 superclasses: 20 is one too many
    write_c100(tmp_path, parts)
    name = "test.bin" if fmt == "cifar-100-binary" else "test"
    with pytest.raises(CifarFormatError, match=rf"{fmt}/{name}: label 20 is outside \[0, 20\)"):
        data.load("cifar100", split="test", root=str(tmp_path / fmt), label_mode="coarse")
    assert len(data.load("cifar100", split="test", root=str(tmp_path / fmt))) == 100  # the fine labels are fine


class ClaimedArray:
    """Pickles as a uint8 numpy array that claims ``shape`` but carries ``data``."""

    def __init__(self, shape, data=b""):
        self.shape, self.data = shape, data

    def __reduce__(self):
        return np.empty(0).__reduce__()[0], (np.ndarray, (0,), b"b"), (1, self.shape, np.dtype(np.uint8), False, self.data)


@pytest.mark.parametrize("raw, error", [
    (pickle.dumps({b"labels": [0], b"data": ClaimedArray((2**62, 2**62))}, protocol=2), "MemoryError"),
    (b"\x80\x04\x8e" + (2**63 - 1).to_bytes(8, "little"), "byte string is too large"),  # BINBYTES8 of 8 EiB
])
def test_a_pickle_claiming_absurd_sizes_is_refused(tmp_path, raw, error):
    folder = tmp_path / "cifar-10-batches-py"
    write_c10_py(folder, c10_batches())
    (folder / "test_batch").write_bytes(raw)
    with pytest.raises(CifarFormatError, match=f"test_batch is not a CIFAR python-format file: {error}"):
        data.load("cifar10", split="test", root=str(folder))


def test_a_huge_binary_batch_is_refused_without_reading_it(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-bin"
    write_c10_bin(folder, c10_batches())
    with open(folder / "test_batch.bin", "r+b") as f:
        f.truncate(2**40 + 1)  # sparse: 1 TiB claimed, nothing written; not a multiple of the record
    with pytest.raises(CifarFormatError, match=f"{2**40 + 1} bytes is not a multiple of the 3073-byte record"):
        data.load("cifar10", split="test", root=str(tmp_path))

    def no_memory(*args, **kwargs):  # a batch of the right length, too big to hold
        raise MemoryError("Unable to allocate 1.00 TiB")

    (folder / "test_batch.bin").write_bytes(bytes(3073))
    monkeypatch.setattr(np, "fromfile", no_memory)
    with pytest.raises(CifarFormatError, match="test_batch.bin is not a CIFAR binary batch: Unable to allocate 1.00 TiB"):
        data.load("cifar10", split="test", root=str(tmp_path))


def test_a_binary_label_beyond_the_names_is_refused(tmp_path):
    batches = c10_batches()
    batches[5][1][4] = 200
    write_c10_bin(tmp_path / "cifar-10-batches-bin", batches)
    with pytest.raises(CifarFormatError, match=r"test_batch.bin: label 200 is outside \[0, 10\)"):
        data.load("cifar10", split="test", root=str(tmp_path))
