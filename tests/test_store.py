"""The model store on real files: round trip, tamper detection, lineage, export/import, names."""
from __future__ import annotations

import json
import os
import secrets
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from reuse_core import store as store_mod
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
    ids = iter(["abc123000001", "abc123999999", "fff000000000", "fff000000001", "fff000000002", "fff000000003"])
    real = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(ids) if n == 6 else real(n))
    a, b = put(store, "pretrain", name="teacher"), put(store, "finetune", name="student")
    assert store.resolve(a.id) == a.id and store.resolve("abc1230") == a.id and store.resolve("student") == b.id
    with pytest.raises(StoreError, match="no model 'nope' in the store"):
        store.resolve("nope")
    with pytest.raises(StoreError, match="'abc' is the start of 2 model ids"):
        store.resolve("abc")

    # a name given again makes a new version: the name alone is the newest, NAME@N the N-th (1 the oldest)
    c = put(store, "finetune", name="student")
    assert store.resolve("student") == c.id == store.resolve("student@2") and store.resolve("student@1") == b.id
    assert store.manifest("student")["id"] == c.id and store.get("student@1").id == b.id
    for bad in ("student@3", "student@0", "student@x", "student@"):
        with pytest.raises(StoreError, match=r"'student' names 2 models, student@1 \(the oldest\) to student@2 \(the newest"):
            store.resolve(bad)
    with pytest.raises(StoreError, match="'teacher' names 1 model, teacher@1$"):
        store.resolve("teacher@2")
    with pytest.raises(StoreError, match="no model 'nobody@1'"):
        store.resolve("nobody@1")
    # a name wins over the start of ids, one or several (it always finds its own model); an exact id wins over a name
    abc = store.save(net(), backbone="mlp", config={}, dataset=None, classes=["a"], metrics={}, parents=[],
                     strategy="x", options={}, name="abc")
    assert store.resolve("abc") == abc.id and store.resolve("abc@1") == abc.id
    prefix_name = put(store, "pretrain", name="abc1230")  # also the start of exactly one id, a's
    assert store.resolve("abc1230") == prefix_name.id and store.resolve("abc12300") == a.id
    [named_like_id] = [put(store, "pretrain", name=a.id)]
    assert store.resolve(a.id) == a.id and store.resolve(f"{a.id}@1") == named_like_id.id


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
    with pytest.raises(StoreError, match="need the backbone they belong to") as e:
        store.import_(path)
    assert "`reuse backbones` lists the registered ones" in str(e.value) and "plugins list" not in str(e.value)
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


# ------------------------------------------------------------------ hostile names, manifests and files


def edit(rec, **changes) -> None:
    """Change a stored manifest on disk, as a person with an editor would (lineage.* keys too)."""
    path = rec.path / "manifest.json"
    m = json.loads(path.read_text())
    for key, value in changes.items():
        outer, _, inner = key.partition("__")
        (m[outer] if inner else m)[inner or outer] = value
    path.write_text(json.dumps(m))


def craft_export(src, dst, **changes) -> None:
    """An export file whose embedded manifest was changed (the weights, and so their sha256, kept)."""
    with safe_open(str(src), framework="pt") as f:
        manifest = json.loads(f.metadata()[store_mod.EXPORT_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest.update(changes)
    dst.write_bytes(st_save(tensors, metadata={store_mod.EXPORT_KEY: json.dumps(manifest)}))


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a\\b", "..", "", "k1@2", "red\x1b[31mred", "tab\there",
                                  "x" * 129])
def test_a_name_that_could_escape_or_confuse_is_refused_on_save(store, name):
    with pytest.raises(StoreError, match="is not allowed: a model name is 1 to 128 characters") as e:
        put(store, "pretrain", name=name)
    assert repr(name[:60]) in str(e.value) and "\x1b" not in str(e.value)
    assert store.list() == []


def test_default_names_are_made_valid(store, tmp_path):
    rec = store.save(net(), backbone="org/net@2", config={}, dataset=None, classes=["a"], metrics={}, parents=[],
                     strategy="pre\x1btrain", options={})
    assert rec.name == "org_net_2-pre_train"
    path = tmp_path / "we@ird\x1bname.pt"
    torch.save(net().state_dict(), path)
    assert store_mod.clean_name(path.stem) == "we_ird_name" and store_mod.clean_name("..") == "model"


def test_export_stays_inside_the_folder_whatever_the_name(store, tmp_path):
    rec = put(store, "pretrain", name="fine")
    out = tmp_path / "deep" / "er" / "out"
    out.mkdir(parents=True)
    for name in ("../../x", str(tmp_path / "abs" / "x"), "..", "a\x1bb"):
        edit(rec, name=name)  # an edited manifest: its name was never checked
        written = store.export(rec.id, out)
        assert written.parent == out and written.name.endswith(f"-{rec.id}.safetensors"), written
        assert "/" not in written.name and "\x1b" not in written.name
    assert [p for p in tmp_path.rglob(f"*-{rec.id}.safetensors") if p.parent != out] == []
    assert len(list(out.iterdir())) == 4


def test_an_export_with_a_bad_id_or_name_is_not_imported(store, tmp_path):
    rec = put(store, "pretrain", name="fine")
    good = store.export(rec.id, tmp_path / "good.safetensors")
    other = ModelStore(tmp_path / "other")
    for key, value in [("id", "../../X"), ("id", "/tmp/X"), ("id", "ABCDEF123456"), ("id", 7),
                       ("name", "../../x"), ("name", "k1@1"), ("name", "a\x1b[2Jb")]:
        bad = tmp_path / "bad.safetensors"
        craft_export(good, bad, **{key: value})
        with pytest.raises(StoreError, match=str(bad)) as e:
            other.import_(bad)
        assert ("not a store id" if key == "id" and isinstance(value, str) else
                "wrong type" if key == "id" else "is not allowed") in str(e.value)
    assert not (tmp_path / "X").exists() and not (tmp_path / "other" / "X").exists()
    assert other.list() == [] and not other.root.exists()
    assert other.import_(good).id == rec.id  # the file it was crafted from is fine


def test_one_bad_manifest_breaks_only_its_own_entry(store, monkeypatch):
    root = put(store, "pretrain", name="root")
    child = put(store, "finetune", parents=[root.id], name="child")
    deep, huge, typed = (put(store, "distill", parents=[child.id], name=n, seed=i) for i, n in enumerate("dht"))
    (deep.path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    (huge.path / "manifest.json").write_text(json.dumps({**huge.manifest, "pad": "x" * 300_000}))
    monkeypatch.setattr(store_mod, "MANIFEST_MAX_BYTES", 250_000)  # not to write the real limit's 8 MB
    edit(typed, created=5, lineage="not a dict")  # a number would break sorting every manifest
    listed = {m["id"]: m for m in store.list()}
    assert [listed[i]["name"] for i in (root.id, child.id)] == ["root", "child"]
    assert "nested too deeply" in listed[deep.id]["error"] and deep.id in listed[deep.id]["error"]
    assert "over 250000 bytes" in listed[huge.id]["error"]
    assert "lineage, created have the wrong type" in listed[typed.id]["error"]
    assert store.resolve("child") == child.id and store.resolve("child@1") == child.id
    lin = store.lineage("root")
    assert lin["descendants"] == [child.id]  # the broken ones are left out, not fatal
    for broken in (deep, huge, typed):
        with pytest.raises(StoreError, match=broken.id):
            store.lineage(broken.id)
        with pytest.raises(StoreError, match=broken.id):
            store.load(broken.id)
    assert store.rm(deep.id) == {"id": deep.id}  # a broken entry can still be removed
    # a manifest nested deep, but not deep enough for a RecursionError, is refused before anything recurses
    edit(child, config=json.loads("[" * 200 + "]" * 200))
    assert "nested more than 64 deep" in {m["id"]: m for m in store.list()}[child.id]["error"]


def test_a_lineage_cycle_is_reported_not_hidden(store):
    x, y = put(store, "pretrain", name="x"), put(store, "finetune", name="y")
    z = put(store, "distill", parents=[y.id], name="z")
    edit(x, lineage__parents=[y.id])
    edit(y, lineage__parents=[x.id])
    for ref in ("x", "y", "z"):
        with pytest.raises(StoreError, match="has a cycle") as e:
            store.lineage(ref)
        assert f"{x.id} (x)" in str(e.value) and f"{y.id} (y)" in str(e.value)
    edit(x, lineage__parents=[x.id])
    edit(y, lineage__parents=[])
    with pytest.raises(StoreError, match=rf"cycle, each model a parent of the next: {x.id} \(x\) -> {x.id} \(x\)"):
        store.lineage("x")
    lin = store.lineage("z")
    assert lin["ancestors"] == [y.id]
    lin["nodes"][y.id]["parents"] = [z.id]  # format_lineage checks what it is given too
    with pytest.raises(StoreError, match="has a cycle"):
        format_lineage(lin)


def test_format_lineage_escapes_control_characters(store):
    root = put(store, "pretrain", name="root")
    child = put(store, "finetune", parents=[root.id], name="child")
    edit(root, name="evil\x1b[2J\x1b]0;title\x07", dataset="d\nfake line", lineage__strategy="\u202eevil")
    text = format_lineage(store.lineage(child.id))
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text and len(text.splitlines()) == 2
    assert "evil\\x1b[2J\\x1b]0;title\\x07" in text and "d\\x0afake line" in text and "\\u202eevil" in text


def test_a_killed_saves_leftovers_are_removed_by_the_next_write(store):
    put(store, "pretrain")
    stale, fresh, trash = (store.models / n for n in (".tmp-0123456789ab-dead", ".tmp-0123456789ab-live",
                                                      ".rm-0123456789ab-dead"))
    for folder in (stale, fresh, trash):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    old = time.time() - 24 * 3600  # a day without a change: no save is that slow
    for path in (stale / "model.safetensors", stale, trash / "model.safetensors", trash):
        os.utime(path, (old, old))
    put(store, "pretrain", seed=1)
    assert not stale.exists() and not trash.exists()
    assert fresh.is_dir(), "a folder a save may be writing right now is kept"
    assert len(store.list()) == 2


def test_weights_with_a_broken_header_are_a_clean_error(store, tmp_path):
    rec = put(store, "pretrain", name="w")
    for blob in (struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 4) + b"{{{{", b"abc"):
        rec.weights_path.write_bytes(blob)
        edit(rec, weights={"file": "model.safetensors", "sha256": store_mod._sha256(blob), "bytes": len(blob)})
        for action in (lambda: store.export(rec.id, tmp_path), lambda: store.load(rec.id)):
            with pytest.raises(StoreError, match=f"model {rec.id}: its weights .* is not a valid safetensors file"):
                action()
    assert not list(tmp_path.glob("*.safetensors"))


def test_truncated_or_garbage_files_are_not_imported(store, tmp_path):
    rec = put(store, "pretrain", name="t")
    good = store.export(rec.id, tmp_path / "good.safetensors").read_bytes()
    torch.save(net().state_dict(), tmp_path / "good.pt")
    other = ModelStore(tmp_path / "other")
    for name, data in [("cut.safetensors", good[:-7]), ("half.safetensors", good[: len(good) // 2]),
                       ("tiny.safetensors", good[:5]), ("empty.safetensors", b""),
                       ("noise.safetensors", os.urandom(300)), ("cut.pt", (tmp_path / "good.pt").read_bytes()[:-9]),
                       ("noise.pth", os.urandom(300))]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StoreError, match=str(tmp_path / name)):
            other.import_(tmp_path / name, backbone=None if name.endswith(".safetensors") else "mlp")
    assert other.list() == []
