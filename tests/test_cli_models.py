"""`reuse models ...` on a real store folder: every action, --json, --store and $REUSE_CORE_STORE,
and the errors a user sees."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reuse_core import cli
from reuse_core import store as store_mod
from reuse_core.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]


def reuse(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def family(tmp_path):
    """A store holding pretrained -> fine-tuned -> distilled."""
    store = ModelStore(tmp_path / "store")

    def put(strategy, parents, name):
        return store.save(torch.nn.Linear(4, 3), backbone="mlp", config={"input_size": 4}, dataset="digits",
                          classes=["a", "b", "c"], metrics={"val_accuracy": 0.875}, parents=parents,
                          strategy=strategy, options={"epochs": 1}, name=name)

    root = put("pretrain", [], "teacher")
    ft = put("finetune", [root.id], "finetuned")
    st = put("distill", [ft.id], "student")
    return store, root, ft, st


def test_list_show_and_json(capsys, family):
    store, root, ft, st = family
    code, out, _ = reuse(capsys, "models", "--store", str(store.root), "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["ID", "NAME", "VERSION", "BACKBONE", "STRATEGY"]
    assert [line.split()[0] for line in lines[1:]] == [root.id, ft.id, st.id]
    assert lines[1].split()[1:3] == ["teacher", "teacher@1"]
    assert "val_accuracy=0.8750" in lines[1] and "distill" in lines[3]

    code, out, _ = reuse(capsys, "models", "list", "--store", str(store.root), "--json")
    assert code == 0 and [m["id"] for m in json.loads(out)] == [root.id, ft.id, st.id]

    code, out, _ = reuse(capsys, "models", "--store", str(store.root), "show", st.id[:5])
    assert code == 0 and f"id        {st.id}" in out and "(checked: ok)" in out and ft.id in out
    code, out, _ = reuse(capsys, "models", "--store", str(store.root), "show", "student", "--json")
    assert code == 0 and json.loads(out) == st.manifest


def test_store_comes_from_the_environment(capsys, family, monkeypatch):
    store, root, *_ = family
    monkeypatch.setenv("REUSE_CORE_STORE", str(store.root))
    code, out, _ = reuse(capsys, "models", "show", root.id)
    assert code == 0 and "teacher" in out


def test_lineage_prints_the_chain_roots_first(capsys, family):
    store, root, ft, st = family
    code, out, _ = reuse(capsys, "models", "--store", str(store.root), "lineage", "finetuned")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("pretrain") and root.id in lines[0]
    assert lines[1].startswith("└─ finetune") and lines[1].endswith("<- this model")
    assert lines[2].startswith("   └─ distill") and st.id in lines[2]
    code, out, _ = reuse(capsys, "models", "--store", str(store.root), "lineage", st.id, "--json")
    assert json.loads(out)["ancestors"] == [ft.id, root.id]


def test_export_import_and_rm(capsys, family, tmp_path):
    store, root, ft, st = family
    out_file = tmp_path / "student.safetensors"
    code, out, _ = reuse(capsys, "models", "--store", str(store.root), "export", "student", str(out_file))
    assert code == 0 and str(out_file) in out and out_file.is_file()

    other = tmp_path / "other"
    code, out, _ = reuse(capsys, "models", "--store", str(other), "import", str(out_file), "--json")
    assert code == 0 and json.loads(out)["id"] == st.id
    code, out, _ = reuse(capsys, "models", "--store", str(other), "lineage", st.id)
    assert out.count("[not in this store]") == 2 and "distill" in out

    code, out, _ = reuse(capsys, "models", "--store", str(store.root), "rm", ft.id)
    assert code == 0 and f"removed {ft.id}" in out and st.id in out  # says who descends from it
    assert [m["id"] for m in store.list()] == [root.id, st.id]


def test_errors_are_clear_and_exit_non_zero(capsys, family, tmp_path):
    store, root, *_ = family
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "show", "nope")
    assert code == 1 and "no model 'nope'" in err
    weights = store.get(root.id).weights_path
    weights.write_bytes(weights.read_bytes()[:-4])
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "show", root.id)
    assert code == 1 and "do not match the sha256" in err
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "export", root.id, str(tmp_path / "x.st"))
    assert code == 1 and not (tmp_path / "x.st").exists()
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "import", str(tmp_path / "missing.pt"))
    assert code == 1 and "no such file" in err
    (tmp_path / "w.safetensors").write_bytes((ROOT / "pyproject.toml").read_bytes())
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "import", str(tmp_path / "w.safetensors"))
    assert code == 1 and "not a readable safetensors file" in err
    code, _, err = reuse(capsys, "models", "--store", str(store.root))
    assert code == 2 and "list, show, lineage" in err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["models", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out and "reuse models lineage" in out
    for action in ("list", "show", "lineage", "export", "import", "rm"):
        assert f"    {action} " in out


def test_the_console_entry_runs_the_verb(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), REUSE_CORE_STORE=str(tmp_path / "empty"))
    r = subprocess.run([sys.executable, "-m", "reuse_core", "models", "list"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and f"no models in {tmp_path / 'empty'}" in r.stdout


def test_import_external_weights_for_a_backbone(capsys, tmp_path):
    from reuse_core.backbone import build

    state = build("small-cnn", 4, in_channels=1).state_dict()
    path = tmp_path / "cnn.pt"
    torch.save(state, path)
    store = str(tmp_path / "store")
    code, out, _ = reuse(capsys, "models", "--store", store, "import", str(path), "--backbone", "small-cnn",
                         "--config", "in_channels=1", "--classes", "zero,one,two,three", "--name", "mine", "--json")
    assert code == 0, out
    m = json.loads(out)
    assert m["classes"] == ["zero", "one", "two", "three"] and m["config"] == {"in_channels": 1}
    assert m["name"] == "mine" and m["lineage"]["strategy"] == "import"
    code, _, err = reuse(capsys, "models", "--store", store, "import", str(path), "--backbone", "small-cnn")
    assert code == 1 and "do not fit backbone 'small-cnn'" in err and "3 input channels" in err
    code, _, err = reuse(capsys, "models", "--store", store, "import", str(path), "--config", "oops")
    assert code == 1 and "--config takes KEY=VALUE" in err


# ------------------------------------------------------------------ versions, and stores edited by hand


def one_error_line(code: int, err: str, *words: str) -> None:
    """What a user sees when a command fails: a non-zero status and one clean line naming the thing."""
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("reuse: error: models "), err
    for word in words:
        assert word in err, (word, err)


def edit(store: ModelStore, mid: str, **changes) -> None:
    path = store.models / mid / "manifest.json"
    m = json.loads(path.read_text())
    for key, value in changes.items():
        outer, _, inner = key.partition("__")
        (m[outer] if inner else m)[inner or outer] = value
    path.write_text(json.dumps(m))


def test_a_name_given_again_is_a_new_version(capsys, family, tmp_path):
    store, root, ft, st = family
    again = store.save(torch.nn.Linear(4, 3), backbone="mlp", config={"input_size": 4}, dataset="digits",
                       classes=["a", "b", "c"], metrics={}, parents=[st.id], strategy="distill", options={},
                       name="teacher")
    s = ["models", "--store", str(store.root)]
    code, out, _ = reuse(capsys, *s, "list")
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert code == 0 and rows[root.id] == ["teacher", "teacher@1"] and rows[again.id] == ["teacher", "teacher@2"]
    code, out, _ = reuse(capsys, *s, "show", "teacher")
    assert code == 0 and f"id        {again.id}" in out and "name      teacher  (teacher@2)" in out
    code, out, _ = reuse(capsys, *s, "show", "teacher@1", "--json")
    assert code == 0 and json.loads(out)["id"] == root.id
    code, out, _ = reuse(capsys, *s, "lineage", "teacher@1")
    assert code == 0 and out.splitlines()[0].endswith("<- this model") and again.id in out
    code, out, _ = reuse(capsys, *s, "export", "teacher@1", str(tmp_path))
    assert code == 0 and (tmp_path / f"teacher-{root.id}.safetensors").is_file()
    code, _, err = reuse(capsys, *s, "show", "teacher@3")
    one_error_line(code, err, "'teacher@3'", "teacher@1 (the oldest) to teacher@2")
    code, out, _ = reuse(capsys, *s, "rm", "teacher@2")
    assert code == 0 and f"removed {again.id} (teacher)" in out
    code, out, _ = reuse(capsys, *s, "show", "teacher")
    assert code == 0 and f"id        {root.id}" in out


def test_bad_names_and_crafted_exports_are_refused(capsys, family, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save as st_save

    store, root, *_ = family
    path = tmp_path / "w.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "import", str(path), "--backbone", "mlp",
                         "--name", "../../x")
    one_error_line(code, err, "'../../x'", "is not allowed")
    good = store.export(root.id, tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        manifest = json.loads(f.metadata()[store_mod.EXPORT_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st_save(tensors, metadata={store_mod.EXPORT_KEY: json.dumps({**manifest, "id": "../../X"})}))
    code, _, err = reuse(capsys, "models", "--store", str(tmp_path / "other"), "import", str(bad))
    one_error_line(code, err, str(bad), "'../../X'", "not a store id")
    assert not (tmp_path / "X").exists() and not (tmp_path / "other").exists()
    for name, data in [("cut.safetensors", good.read_bytes()[:-5]), ("junk.pt", b"\x80\x02junk")]:
        (tmp_path / name).write_bytes(data)
        code, _, err = reuse(capsys, "models", "--store", str(tmp_path / "other"), "import", str(tmp_path / name),
                             "--backbone", "mlp")
        one_error_line(code, err, str(tmp_path / name))


def test_export_of_a_model_named_like_a_path_stays_in_the_folder(capsys, family, tmp_path):
    store, root, *_ = family
    out = tmp_path / "a" / "b"
    out.mkdir(parents=True)
    edit(store, root.id, name="../../escaped")
    code, printed, _ = reuse(capsys, "models", "--store", str(store.root), "export", root.id, str(out))
    assert code == 0 and [p.name for p in out.iterdir()] == [f".._.._escaped-{root.id}.safetensors"]
    assert not list(tmp_path.glob("escaped*")) and str(out) in printed


def test_a_broken_manifest_breaks_only_its_entry(capsys, family):
    store, root, ft, st = family
    (store.models / ft.id / "manifest.json").write_text("{\"a\": " * 100_000 + "1" + "}" * 100_000)
    s = ["models", "--store", str(store.root)]
    code, out, _ = reuse(capsys, *s, "list")
    [row] = [line for line in out.splitlines() if line.startswith(ft.id)]
    assert code == 0 and row.split()[1:5] == ["BROKEN", "-", "model", ft.id + ":"] and "nested too deeply" in row
    assert "teacher@1" in out and "student@1" in out
    code, out, _ = reuse(capsys, *s, "show", "student")
    assert code == 0 and st.id in out
    code, out, _ = reuse(capsys, *s, "lineage", "teacher")
    assert code == 0 and out.splitlines()[0].endswith("<- this model")
    code, _, err = reuse(capsys, *s, "lineage", ft.id)
    one_error_line(code, err, ft.id, "nested too deeply")
    code, out, _ = reuse(capsys, *s, "rm", ft.id)
    assert code == 0 and f"removed {ft.id}" in out


def test_a_lineage_cycle_fails_naming_the_models(capsys, family):
    store, root, ft, st = family
    edit(store, root.id, lineage__parents=[ft.id])
    code, out, err = reuse(capsys, "models", "--store", str(store.root), "lineage", "student")
    one_error_line(code, err, "has a cycle", root.id, ft.id, "(teacher)", "(finetuned)")
    assert out == ""
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "lineage", "student", "--json")
    one_error_line(code, err, "has a cycle")


def test_control_characters_in_names_are_escaped(capsys, family):
    store, root, ft, st = family
    evil = "x\x1b[2J\x1b]0;pwned\x07\nfake row"
    edit(store, root.id, name=evil, dataset="\x1b[31mred", lineage__strategy="\u202erts")
    s = ["models", "--store", str(store.root)]
    for args in (["list"], ["show", root.id], ["lineage", st.id], ["rm", root.id]):
        code, out, err = reuse(capsys, *s, *args)
        assert code == 0 and out, (args, err)
        assert not any(c in out for c in "\x1b\x07\u202e"), (args, out)
        assert "x\\x1b[2J" in out and "\\x0afake row" in out, (args, out)
    code, _, err = reuse(capsys, *s, "lineage", "\x1b[2Jnope")
    one_error_line(code, err, "no model")
    assert "\x1b" not in err


def test_export_of_weights_with_a_broken_header_is_a_clean_error(capsys, family, tmp_path):
    store, root, *_ = family
    blob = struct.pack("<Q", 1 << 40) + b"{}"
    (store.models / root.id / "model.safetensors").write_bytes(blob)
    edit(store, root.id, weights={"file": "model.safetensors", "sha256": store_mod._sha256(blob), "bytes": 10})
    code, _, err = reuse(capsys, "models", "--store", str(store.root), "export", root.id, str(tmp_path / "t.st"))
    one_error_line(code, err, root.id, "is not a valid safetensors file", "header too large")
    assert not (tmp_path / "t.st").exists()


def test_the_backbone_hint_names_a_real_command(capsys, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    code, _, err = reuse(capsys, "models", "--store", str(tmp_path / "s"), "import", str(path))
    one_error_line(code, err, "`reuse backbones` lists the registered ones")
    with pytest.raises(SystemExit):
        cli.main(["models", "import", "--help"])
    out = capsys.readouterr().out
    assert "reuse backbones" in " ".join(out.split()) and "plugins list" not in out
    with pytest.raises(SystemExit):
        cli.main(["backbones", "--help"])  # the command the hint names exists
    capsys.readouterr()
