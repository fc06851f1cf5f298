"""Quantised sharing: int8 (symmetric, per output channel, float32 scales) and bf16 exports
against a float64 reference; the export is a new model (its own id, the original its parent) that
imports, loads dequantised, evaluates and fine-tunes like any model; `reuse models export
--quantize`; and a small-cnn trained on digits stays within 0.3x the size and 0.5 points of test
accuracy in int8."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from reuse_core import cli
from reuse_core import run as reuse_run
from reuse_core.cli.models import QUANTIZE_SCHEMES as CLI_SCHEMES
from reuse_core.store import (
    QUANTIZE_SCHEMES, ModelStore, StoreError, dequantize_state, export_manifest, quantize_state, read_export,
)
from reuse_core.strategy.scoring import split_scorer


def test_int8_is_symmetric_per_output_channel_against_a_float64_reference(gen):
    conv = torch.randn(6, 3, 3, 3, generator=gen) * torch.logspace(-3, 1, 6).view(6, 1, 1, 1)
    conv[2] = 0  # an all-zero channel
    state = {"conv.weight": conv, "conv.bias": torch.randn(6, generator=gen),
             "fc.weight": torch.randn(4, 54, generator=gen), "bn.num_batches_tracked": torch.tensor(3)}
    tensors, done = quantize_state(state, "int8")
    assert done == {"conv.weight": "float32", "fc.weight": "float32"}
    for key in done:
        w = state[key].double()
        scale = w.flatten(1).abs().amax(1) / 127  # the reference: max |W[c]| / 127 per output channel
        q = torch.where(scale.view(-1, *[1] * (w.dim() - 1)) > 0, w / scale.view(-1, *[1] * (w.dim() - 1)),
                        torch.zeros_like(w)).round().clamp(-127, 127)
        assert tensors[key].dtype == torch.int8 and torch.equal(tensors[key].double(), q)
        torch.testing.assert_close(tensors[key + "_scale"].double(), scale, rtol=1e-6, atol=0)
        back = dequantize_state(tensors, {"scheme": "int8", "tensors": done})[key]
        err = (back.double() - w).abs()
        assert back.dtype == torch.float32 and bool((err <= scale.view(-1, *[1] * (w.dim() - 1)) * 0.5 + 1e-7).all())
    assert torch.equal(tensors["conv.bias"], state["conv.bias"]) and torch.equal(tensors["bn.num_batches_tracked"],
                                                                                 state["bn.num_batches_tracked"])
    assert not dequantize_state(tensors, {"scheme": "int8", "tensors": done})["conv.weight"][2].any()
    assert set(dequantize_state(tensors, {"scheme": "int8", "tensors": done})) == set(state)


def test_bf16_rounds_every_float_tensor_and_comes_back_in_its_dtype(gen):
    state = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(5, generator=gen, dtype=torch.float64),
             "n": torch.tensor(7)}
    tensors, done = quantize_state(state, "bf16")
    assert done == {"w": "float32", "b": "float64"} and tensors["w"].dtype == torch.bfloat16
    back = dequantize_state(tensors, {"scheme": "bf16", "tensors": done})
    assert back["b"].dtype == torch.float64 and torch.equal(back["w"], state["w"].bfloat16().float())
    assert QUANTIZE_SCHEMES == CLI_SCHEMES  # the CLI's copy (kept torch-free) is the store's


def test_quantisation_refuses_a_scale_name_taken_and_an_edited_record():
    with pytest.raises(StoreError, match="already has a tensor w_scale"):
        quantize_state({"w": torch.ones(2, 2), "w_scale": torch.ones(2)}, "int8")
    with pytest.raises(StoreError, match="unknown quantisation 'int4'"):
        quantize_state({"w": torch.ones(2, 2)}, "int4")
    tensors, done = quantize_state({"w": torch.ones(2, 2)}, "int8")
    with pytest.raises(StoreError, match="not one this store writes"):
        dequantize_state(tensors, {"scheme": "int8", "tensors": {"w": "complex64"}})
    with pytest.raises(StoreError, match="the quantised tensor w is missing or malformed"):
        dequantize_state({"w": tensors["w"]}, {"scheme": "int8", "tensors": done})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small-cnn trained on all ten digits (a few short epochs) in its own store."""
    store = ModelStore(tmp_path_factory.mktemp("store"))
    torch.set_num_threads(1)
    result = reuse_run.run("pretrain", store=store, run_dir=tmp_path_factory.mktemp("run"), quiet=True,
                           backbone="small-cnn", epochs=4, lr=0.1, name="cnn")
    return store, result.model


def test_int8_export_of_small_cnn_is_small_imports_loads_and_evaluates(trained, tmp_path, capsys):
    store, mid = trained
    assert cli.main(["models", "--store", str(store.root), "export", mid, str(tmp_path / "float.safetensors")]) == 0
    assert cli.main(["models", "--store", str(store.root), "export", mid, str(tmp_path), "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    path = next(tmp_path.glob("cnn-int8-*.safetensors"))
    m = export_manifest(path)
    q = m["quantization"]
    float_bytes = (tmp_path / "float.safetensors").stat().st_size
    assert q["scheme"] == "int8" and q["source"] == mid and q["bytes"] == path.stat().st_size
    assert q["float32_export_bytes"] == float_bytes and q["size_ratio"] == round(path.stat().st_size / float_bytes, 4)
    assert path.stat().st_size <= 0.3 * float_bytes
    acc = q["val_accuracy"]
    assert acc["change"] == pytest.approx(acc["quantized"] - acc["float32"]) and abs(acc["change"]) <= 0.005
    assert f"{q['size_ratio']:.3f} of the float32 export" in out and "validation accuracy" in out
    with safe_open(str(path), framework="pt") as f:  # int8 weights, float32 scales, in plain safetensors
        assert f.get_tensor("fc.0.weight").dtype == torch.int8
        assert f.get_tensor("fc.0.weight_scale").dtype == torch.float32

    # into another store: its own id, the original as its parent, weights dequantised on load
    other = ModelStore(tmp_path / "other")
    rec = other.import_(path)
    assert rec.id == m["id"] != mid and rec.manifest["lineage"]["parents"] == [mid]
    assert rec.manifest["lineage"]["strategy"] == "quantize" and rec.name == "cnn-int8"
    assert other.lineage(rec.id)["ancestors"] == [mid]
    assert other.import_(path).id == rec.id  # importing again changes nothing
    state, _ = other.load(rec.id)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert set(state) == set(store.load(mid)[0])
    torch.testing.assert_close(state, read_export(path)[0])
    # it evaluates like any model: test accuracy within 0.5 points of the float32 model's
    test = split_scorer(store, mid, split="test")[0]
    assert abs(test(state) - test(store.load(mid)[0])) <= 0.005
    # and it is fine-tuned like any model
    tuned = reuse_run.run("finetune", store=other, run_dir=tmp_path / "ft", quiet=True, model=rec.id,
                          dataset="digits", classes=["5-9"], epochs=1, label_budget=2)
    assert other.manifest(tuned.model)["lineage"]["parents"] == [rec.id]
    assert cli.main(["models", "--store", str(other.root), "show", rec.id]) == 0
    assert "quantized int8 from " + mid in capsys.readouterr().out


def test_quantised_exports_are_deterministic_and_checked(trained, tmp_path):
    store, mid = trained
    a = store.export(mid, tmp_path / "a.safetensors", quantize="bf16")
    b = store.export(mid, tmp_path / "b.safetensors", quantize="bf16")
    assert export_manifest(a)["id"] == export_manifest(b)["id"]
    assert export_manifest(a)["quantization"]["val_accuracy"] is None  # no evaluate given
    assert 0.45 < export_manifest(a)["quantization"]["size_ratio"] < 0.55
    # re-quantising a quantised model starts from its dequantised weights
    rec = ModelStore(tmp_path / "s").import_(a)
    again = ModelStore(tmp_path / "s").export(rec.id, tmp_path / "c.safetensors", quantize="int8")
    assert export_manifest(again)["lineage"]["parents"] == [rec.id]
    data = bytearray(a.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="do not match the sha256"):
        ModelStore(tmp_path / "t").import_(tmp_path / "bad.safetensors")
    with pytest.raises(StoreError, match="do not match the sha256"):
        read_export(tmp_path / "bad.safetensors")


def test_cli_refuses_an_unknown_scheme(trained, tmp_path, capsys):
    store, mid = trained
    with pytest.raises(SystemExit) as exit_:
        cli.main(["models", "--store", str(store.root), "export", mid, str(tmp_path), "--quantize", "int4"])
    assert exit_.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_a_model_without_a_dataset_exports_without_an_accuracy(tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    rec = store.save(torch.nn.Linear(4, 3), backbone="mlp", config={}, dataset=None, classes=["a", "b", "c"],
                     metrics={}, parents=[], strategy="import", options={})
    assert cli.main(["models", "--store", str(store.root), "export", rec.id, str(tmp_path), "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy not measured: model " + rec.id + " records no dataset" in out
    manifest = export_manifest(next(tmp_path.glob("*-int8-*.safetensors")))
    assert manifest["metrics"] == {} and json.dumps(manifest)
