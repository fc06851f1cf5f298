"""The third-party path, proven with real pip installs into a temporary folder (never the user's
environment): the example plugin (plugins/reuse-example) and a deliberately broken distribution,
found through their entry points by `reuse` subprocesses run with PYTHONPATH."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from reuse_core import backbone
from reuse_core.plugins import BUILTIN_PLUGINS, ReusePluginManager
from tests.test_plugins import BROKEN_MODULES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "reuse-example"

BROKEN_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "reuse-broken"
version = "6.6.6"

[project.entry-points.reuse_core]
{entry_points}

[tool.setuptools]
packages = ["reuse_broken"]
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder with reuse-example and reuse-broken pip-installed into it."""
    tmp = tmp_path_factory.mktemp("plugins")
    # Build from copies: setuptools writes build/ and *.egg-info next to the sources.
    example = shutil.copytree(EXAMPLE, tmp / "reuse-example", ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    broken = tmp / "reuse-broken"
    (broken / "reuse_broken").mkdir(parents=True)
    (broken / "reuse_broken" / "__init__.py").write_text("")
    for name, src in BROKEN_MODULES.items():
        (broken / "reuse_broken" / f"{name}.py").write_text(textwrap.dedent(src))
    eps = "\n".join(f'{name} = "reuse_broken.{name}"' for name in BROKEN_MODULES)
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT.format(entry_points=eps))
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(example), str(broken)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return target


def env_with(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REUSE_CORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def runs(site) -> dict[str, subprocess.CompletedProcess]:
    """The `reuse` commands the tests check, started together (each spends most of its time
    importing torch), plus the example plugin's own test suite."""
    commands = {
        "plugins": (["plugins", "--json"], {}),
        "backbones": (["backbones", "--json"], {}),
        "strict": (["plugins", "--json"], {"REUSE_CORE_STRICT_PLUGINS": "1"}),
    }
    procs = {
        key: subprocess.Popen([sys.executable, "-m", "reuse_core", *args], cwd=site.parent, env=env_with(site, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, (args, extra) in commands.items()
    }
    procs["example_tests"] = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        cwd=EXAMPLE, env=env_with(site, REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[key] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def test_reuse_plugins_lists_the_example_and_reports_the_broken(runs):
    r = runs["plugins"]
    assert r.returncode == 0, r.stderr
    plugins = by_name(json.loads(r.stdout))
    assert list(plugins)[: len(BUILTIN_PLUGINS)] == list(BUILTIN_PLUGINS)
    assert all(plugins[b]["error"] is None for b in BUILTIN_PLUGINS)
    example = plugins["example"]
    assert (example["distribution"], example["version"], example["error"]) == ("reuse-example", "0.1.0", None)
    assert "reuse_register_backbones" in example["hooks"] and example["description"].startswith("The reuse-core plugin module")
    for name in BROKEN_MODULES:
        assert plugins[name]["distribution"] == "reuse-broken" and plugins[name]["version"] == "6.6.6"
    assert plugins["broken_import"]["error"] == "failed to import: ModuleNotFoundError: No module named 'reuse_core_no_such_module'"
    assert plugins["broken_raises"]["error"].startswith("reuse_register_backbones raised ValueError: boom in register")
    assert plugins["broken_taken"]["error"] == ("backbone 'seed-cnn' from plugin 'broken_taken' is already registered "
                                                "by plugin 'reuse_core.builtin.backbones'; the first registration is kept")
    assert plugins["broken_args"]["error"].startswith("is invalid and was skipped: Plugin 'broken_args'")
    assert "which is not a reuse-core hook" in plugins["broken_typo"]["error"]
    # each report also reaches stderr, one clean line per failure
    assert r.stderr.count("reuse: warning: reuse-core plugin 'broken_") == 5, r.stderr
    assert "reuse: warning: reuse-core plugin 'broken_import' (reuse-broken 6.6.6): failed to import" in r.stderr


def test_reuse_backbones_shows_the_plugins_backbones_and_the_builtins(runs):
    r = runs["backbones"]
    assert r.returncode == 0, r.stderr
    backbones = by_name(json.loads(r.stdout))
    assert backbones["example-resnet"]["plugin"] == "example"
    assert backbones["example-resnet"]["description"].startswith("a small residual CNN")
    assert backbones["seed-cnn"]["plugin"] == "reuse_core.builtin.backbones"  # the impostor was refused
    assert backbones["broken-taken-own"]["plugin"] == "broken_taken"  # the rest of that plugin loaded
    assert "half-registered" not in backbones and "resnet18" in backbones


def test_strict_mode_makes_the_broken_plugin_fatal(runs):
    r = runs["strict"]
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("reuse: error: reuse-core plugin 'broken_")
    assert "(fatal because REUSE_CORE_STRICT_PLUGINS=1)" in r.stderr


def test_autoload_off_loads_the_builtins_only(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = ReusePluginManager().load()
    assert [i.name for i in pm.plugin_infos()] == list(BUILTIN_PLUGINS) and "example-resnet" not in pm.backbones


def test_the_example_plugins_own_tests_pass(runs):
    r = runs["example_tests"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert " passed" in r.stdout and "failed" not in r.stdout and "skipped" not in r.stdout


def test_the_installed_backbone_builds_through_the_registry(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(RuntimeWarning):  # the broken plugins in the same folder
        pm = ReusePluginManager().load()
    monkeypatch.setattr("reuse_core.plugins.get_plugin_manager", lambda: pm)
    model = backbone.build("example-resnet", num_classes=6, in_channels=1, width=8)
    assert type(model).__module__ == "reuse_example.resnet"
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 6)
    for name in ("reuse_example", "reuse_example.plugin", "reuse_example.resnet", "reuse_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
