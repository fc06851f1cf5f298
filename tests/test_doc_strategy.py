"""The complete third-party strategy of docs/strategies.md ("A complete third-party strategy"):
its files are taken from the page, pip-installed into a temporary folder, found through their
entry point and run by `reuse run` subprocesses, so the page cannot drift from what works."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from reuse_core.store import ModelStore
from tests.test_layering import imports_of, private_parts

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "strategies.md"
FILE = re.compile(r"<!-- plugin-file: (\S+) -->\s*\n```\w+\n(.*?)\n```", re.S)
MODULE = "reuse_smooth/plugin.py"


def reuse(*args: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REUSE_CORE_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), REUSE_CORE_STRICT_PLUGINS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "reuse_core", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_the_documented_strategy_installs_and_runs(tmp_path):
    files = dict(FILE.findall(PAGE.read_text()))
    assert set(files) == {MODULE, "pyproject.toml"}, "the page shows the plugin module and its pyproject.toml"
    assert len(files[MODULE].splitlines()) <= 50, "the documented strategy stays within 50 lines"
    src = tmp_path / "reuse-smooth"
    for name, text in [*files.items(), ("reuse_smooth/__init__.py", "")]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text + "\n")
    assert [str(i) for i in imports_of(src / MODULE, src) if private_parts(i)] == [], "public imports only"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)

    listed = json.loads(reuse("strategies", "--json", site=site, cwd=tmp_path).stdout)
    assert {"name": "smooth-finetune", "plugin": "smooth"}.items() <= next(
        s for s in listed if s["name"] == "smooth-finetune").items()
    store = tmp_path / "store"
    reuse("run", "pretrain", "--store", str(store), "--backbone", "small-cnn", "--classes", "0-4", "--epochs", "1",
          "--label-budget", "10", "--name", "teacher", "--quiet", site=site, cwd=tmp_path)
    out = reuse("run", "smooth-finetune", "--store", str(store), "--model", "teacher", "--classes", "5-9",
                "--label-budget", "5", "--epochs", "2", "--smoothing", "0.2", "--quiet", site=site, cwd=tmp_path)
    model = re.search(r"^smooth-finetune: model (\w+)$", out.stdout, re.M).group(1)
    manifest = ModelStore(store).manifest(model)
    assert manifest["lineage"]["parents"] == [ModelStore(store).resolve("teacher")]
    assert manifest["lineage"]["strategy"] == "smooth-finetune" and manifest["lineage"]["options"]["smoothing"] == 0.2
    assert manifest["classes"] == ["5", "6", "7", "8", "9"] and manifest["backbone"] == "small-cnn"
