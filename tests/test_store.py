"""The model store on real files: round trip, tamper detection, lineage, export/import, names."""
from __future__ import annotations

import json
import os
import secrets

import pytest
import torch
from safetensors.torch import load_file

from reuse_core.store import ModelStore, StoreError, default_root, format_lineage


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def put(store: ModelStore, strategy: str, parents=(), name=None, seed=0):
    return store.save(net(seed), backbone="mlp", config={"hidden": 8}, dataset="digits", classes=["a", "b", "c"],
                      metrics={"val_accuracy": 0.5 + seed / 10}, parents=list(parents), strategy=strategy,
                      options={"epochs": 2, "lr": 0.1}, name=name)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_round_trip_keeps_weights_and_manifest(store):
    model = net()
    rec = put(store, "pretrain", name="teacher")
    state, manifest = store.load(rec.id)
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert manifest == rec.manifest == store.manifest(rec.id)
    assert manifest["name"] == "teacher" and manifest["backbone"] == "mlp" and manifest["config"] == {"hidden": 8}
    assert manifest["classes"] == ["a", "b", "c"] and manifest["dataset"] == "digits"
    assert manifest["lineage"] == {"parents": [], "strategy": "pretrain", "options": {"epochs": 2, "lr": 0.1},
                                   "ancestry": {}}
    assert len(manifest["weights"]["sha256"]) == 64 and manifest["created"]
    # what is on disk: safetensors weights (no pickle) and a JSON manifest
    assert sorted(os.listdir(rec.path)) == ["manifest.json", "model.safetensors"]
    assert load_file(rec.weights_path).keys() == state.keys()
    assert json.loads((rec.path / "manifest.json").read_text()) == manifest
    assert [m["id"] for m in store.list()] == [rec.id]


def test_a_state_dict_with_tied_weights_is_stored(store):
    model = torch.nn.Linear(3, 3)
    state = {"a": model.weight, "b": model.weight, "c": model.bias}
    rec = store.save(state, backbone="x", config={}, dataset=None, classes=["0", "1", "2"], metrics={}, parents=[],
                     strategy="import", options={})
    loaded, _ = store.load(rec.id)
    assert torch.equal(loaded["a"], loaded["b"])


def test_ids_prefixes_and_names_resolve_or_fail_clearly(store, monkeypatch):
    ids = iter(["abc123000001", "abc123999999", "fff000000000"])
    real = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(ids) if n == 6 else real(n))
    a, b = put(store, "pretrain", name="teacher"), put(store, "finetune", name="student")
    assert store.resolve(a.id) == a.id and store.resolve("abc1230") == a.id and store.resolve("student") == b.id
    with pytest.raises(StoreError, match="no model 'nope' in the store"):
        store.resolve("nope")
    with pytest.raises(StoreError, match="'abc' is the start of 2 model ids"):
        store.resolve("abc")
    put(store, "finetune", name="student")
    with pytest.raises(StoreError, match="2 models are named 'student'"):
        store.resolve("student")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "manifest_hash", "manifest_garbage", "weights_gone"])
def test_a_corrupted_or_tampered_model_is_refused(store, damage):
    rec = put(store, "pretrain")
    w, m = rec.weights_path, rec.path / "manifest.json"
    if damage == "flip_byte":
        data = bytearray(w.read_bytes())
        data[-3] ^= 0x01
        w.write_bytes(bytes(data))
    elif damage == "truncate":
        w.write_bytes(w.read_bytes()[:-10])
    elif damage == "manifest_hash":
        manifest = json.loads(m.read_text())
        manifest["weights"]["sha256"] = "0" * 64
        m.write_text(json.dumps(manifest))
    elif damage == "manifest_garbage":
        m.write_text("{not json")
    else:
        w.unlink()
    with pytest.raises(StoreError, match=rec.id) as e:
        store.load(rec.id)
    expected = {"manifest_garbage": "not a readable manifest", "weights_gone": "cannot read its weights"}
    assert expected.get(damage, "do not match the sha256 in its manifest") in str(e.value)
    with pytest.raises(StoreError):
        store.export(rec.id, store.root / "out.safetensors")
    if damage == "manifest_garbage":
        assert store.list() == [{"id": rec.id, "error": str(e.value)}]


def test_lineage_follows_parents_and_children(store):
    root = put(store, "import", name="pretrained")
    ft = put(store, "finetune", parents=[root.id], name="finetuned")
    st = put(store, "distill", parents=["finetuned"], name="student")
    ens = put(store, "ensemble", parents=[ft.id, st.id], name="ens")
    other = put(store, "pretrain", name="unrelated")
    assert st.manifest["lineage"]["parents"] == [ft.id]
    assert set(st.manifest["lineage"]["ancestry"]) == {root.id, ft.id}

    lin = store.lineage("finetuned")
    assert lin["id"] == ft.id and lin["ancestors"] == [root.id]
    assert set(lin["descendants"]) == {st.id, ens.id} and other.id not in lin["nodes"]
    text = format_lineage(lin)
    lines = text.splitlines()
    assert lines[0].startswith("import") and root.id in lines[0]
    assert "finetune" in lines[1] and lines[1].endswith("<- this model")
    assert "distill" in lines[2] and st.id in lines[2]
    assert sum(ens.id in line for line in lines) == 2 and "(see above)" in text  # two parents, expanded once

    # removing an ancestor keeps the story: descendants carry its summary
    store.rm(root.id)
    lin = store.lineage(st.id)
    assert lin["ancestors"] == [ft.id, root.id] and lin["nodes"][root.id]["in_store"] is False
    assert "[not in this store]" in format_lineage(lin).splitlines()[0]


def test_unknown_parent_is_refused(store):
    with pytest.raises(StoreError, match="no model 'deadbeef'"):
        put(store, "finetune", parents=["deadbeef"])


def test_export_import_round_trip_into_another_store(store, tmp_path):
    root = put(store, "pretrain", name="teacher")
    child = put(store, "distill", parents=[root.id], name="student", seed=1)
    out = store.export("student", tmp_path)
    assert out == tmp_path / f"student-{child.id}.safetensors" and out.is_file()

    other = ModelStore(tmp_path / "other")
    rec = other.import_(out)
    assert rec.id == child.id and rec.manifest == child.manifest
    state, _ = other.load(rec.id)
    want, _ = store.load(child.id)
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert other.import_(out).id == rec.id  # importing twice is a no-op
    assert other.lineage(rec.id)["ancestors"] == [root.id]

    # an export whose weights were changed is refused
    data = bytearray(out.read_bytes())
    data[-1] ^= 0x01
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="do not match the sha256 recorded in the export"):
        ModelStore(tmp_path / "third").import_(bad)


def test_rm_removes_only_that_model(store):
    a, b = put(store, "pretrain"), put(store, "pretrain", seed=1)
    assert store.rm(a.id[:6])["id"] == a.id
    assert [m["id"] for m in store.list()] == [b.id]
    assert not [p for p in store.models.iterdir() if p.name.startswith(".")]
    with pytest.raises(StoreError):
        store.load(a.id)


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("REUSE_CORE_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_root() == tmp_path / "cache" / "reuse-core" / "store"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "reuse-core" / "store"
    monkeypatch.setenv("REUSE_CORE_STORE", str(tmp_path / "mine"))
    assert ModelStore().root == tmp_path / "mine"


# ------------------------------------------------------------------ external weights


class NotWeights:
    """Pickled inside a .pt file, this is code the store must refuse to unpickle."""


def torchvision_state(name: str, num_classes: int) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=num_classes).state_dict()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_a_torchvision_state_dict_saved_with_torch_save(store, tmp_path):
    state = torchvision_state("resnet18", 10)
    path = tmp_path / "resnet18-mine.pth"
    torch.save(state, path)
    rec = store.import_(path, backbone="resnet18")
    m = rec.manifest
    assert m["backbone"] == "resnet18" and m["classes"] == [str(i) for i in range(10)] and m["dataset"] is None
    assert m["config"] == {"in_channels": 3} and m["name"] == "resnet18-mine"
    assert m["lineage"]["parents"] == [] and m["lineage"]["strategy"] == "import"
    assert m["lineage"]["options"]["format"] == "torch" and m["lineage"]["options"]["source"] == str(path)
    loaded, _ = store.load(rec.id)
    assert same_weights(loaded, state)

    # the imported weights are the root of a lineage
    child = store.save(net(), backbone="mlp", config={}, dataset="digits", classes=m["classes"],
                       metrics={}, parents=[rec.id], strategy="distill", options={})
    assert format_lineage(store.lineage(child.id)).splitlines()[0].startswith(f"import     {rec.id}  resnet18-mine")

    with pytest.raises(StoreError, match=r"do not fit backbone 'resnet34' with 10 classes and 3 input channels "
                                         r"\(80 missing: layer1.2.conv1.weight, .*, \.\.\.\)"):
        store.import_(path, backbone="resnet34")
    with pytest.raises(StoreError, match="need the backbone they belong to"):
        store.import_(path)
    with pytest.raises(StoreError, match="unknown backbone 'resnet19'"):
        store.import_(path, backbone="resnet19")


def test_import_torchvision_weights_from_safetensors_and_wrapped_state_dicts(store, tmp_path):
    from safetensors.torch import save_file

    state = torchvision_state("mobilenet_v3_small", 5)
    st = tmp_path / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    rec = store.import_(st, backbone="mobilenet_v3_small", classes=["a", "b", "c", "d", "e"], name="mnv3")
    assert rec.manifest["classes"] == ["a", "b", "c", "d", "e"] and rec.manifest["lineage"]["options"]["format"] == \
        "safetensors"
    assert same_weights(store.load("mnv3")[0], state)

    # Lightning/timm-style {"state_dict": ...} with DDP's "module." prefixes
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    assert same_weights(store.load(store.import_(wrapped, backbone="mobilenet_v3_small").id)[0], state)

    with pytest.raises(StoreError, match="with 4 classes"):
        store.import_(st, backbone="mobilenet_v3_small", classes=4)


def test_a_pt_file_holding_code_is_refused_not_run(store, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": NotWeights()}, path)
    with pytest.raises(StoreError, match=r"weights_only=True"):
        store.import_(path, backbone="resnet18")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="unknown format"):
        store.import_(tmp_path / "notes.txt", backbone="resnet18")
    assert store.list() == []
