"""`reuse models ...` on a real store folder: every action, --json, --store and $REUSE_CORE_STORE,
and the errors a user sees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reuse_core import cli
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
    assert lines[0].split()[:4] == ["ID", "NAME", "BACKBONE", "STRATEGY"]
    assert [line.split()[0] for line in lines[1:]] == [root.id, ft.id, st.id]
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
