"""reuse_core.hookspecs: every hook has a contract docstring; the lifecycle signatures are the
ones the engine calls; the module and `import reuse_core` stay light."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest

import reuse_core
from reuse_core import hookspecs

HOOKS = [f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("reuse_")]

LIFECYCLE = {
    "reuse_run_start": ["strategy", "options", "run_dir"],
    "reuse_epoch_end": ["strategy", "epoch", "metrics"],
    "reuse_run_end": ["strategy", "result"],
    "reuse_adjust_loss": ["strategy", "loss", "model", "inputs", "targets", "outputs"],
}


def test_the_hooks_are_the_planned_ones():
    assert sorted(f.__name__ for f in HOOKS) == sorted(
        ["reuse_register_backbones", "reuse_register_strategies", "reuse_register_datasets", *LIFECYCLE]
    )
    for name, params in LIFECYCLE.items():
        assert list(inspect.signature(getattr(hookspecs, name)).parameters) == params


@pytest.mark.parametrize("hook", HOOKS, ids=lambda f: f.__name__)
def test_every_hook_has_a_contract(hook):
    doc = inspect.getdoc(hook)
    assert doc and "Called" in doc and ":return:" in doc, f"{hook.__name__}: say when it is called and what it returns"
    for param in inspect.signature(hook).parameters:
        assert f":param {param}:" in doc, f"{hook.__name__}: document {param}"
    assert "Every plugin's implementation is called" in doc  # how several plugins' answers combine
    assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(hook).parameters.values())
    assert hookspecs.hookspec.project_name == "reuse_core"
    assert getattr(hook, "reuse_core_spec") is not None


def test_markers_are_exported():
    assert reuse_core.hookimpl is hookspecs.hookimpl and reuse_core.hookspec is hookspecs.hookspec
    assert isinstance(reuse_core.hookimpl, pluggy.HookimplMarker) and reuse_core.hookimpl.project_name == "reuse_core"


def test_import_is_light():
    code = ("import sys, reuse_core, reuse_core.hookspecs; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('reuse_core')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['reuse_core', 'reuse_core.hookspecs']"


def documented_signature(hook) -> str:
    """The signature as docs/plugins.md spells it: annotations as written in hookspecs.py."""
    sig = inspect.signature(hook)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {hook.__name__}({params}) -> {sig.return_annotation}"


@pytest.mark.parametrize("hook", HOOKS, ids=lambda f: f.__name__)
def test_every_hook_is_documented_with_its_exact_signature(hook):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    assert f"```python\n{documented_signature(hook)}\n```" in docs
