"""Start-up: registering the plugins and listing what they provide never imports torchvision
(over a second: ``torchvision.ops`` pulls in ``torch._dynamo``); building a torchvision backbone
does. Each check runs in a fresh interpreter, since this test process has imported torchvision
long ago."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# What must stay out of sys.modules until a torchvision model (or an imagefolder dataset) is built.
LAZY = ("torchvision", "torch._dynamo", "triton")  # each costs 0.1-1.3 s of start-up


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter with only the built-in plugins; it prints one JSON
    line last, returned parsed."""
    env = {**os.environ, "REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_listing_the_plugins_does_not_import_torchvision():
    out = run_python(f"""
        import json, sys
        from reuse_core import plugins

        pm = plugins.get_plugin_manager()
        counts = {{kind: len(getattr(pm, kind).describe()) for kind in ("backbones", "strategies", "datasets")}}
        print(json.dumps({{"counts": counts, "loaded": [m for m in {LAZY!r} if m in sys.modules]}}))
    """)
    assert out["counts"]["backbones"] >= 84 and out["counts"]["strategies"] >= 1 and out["counts"]["datasets"] >= 4
    assert out["loaded"] == []


@pytest.mark.parametrize("argv", [["backbones", "--json"], ["strategies"], ["datasets"], ["run", "pretrain", "--help"]],
                         ids=" ".join)
def test_listing_commands_and_help_do_not_import_torchvision(argv):
    out = run_python(f"""
        import contextlib, io, json, sys
        from reuse_core.cli import main

        with contextlib.redirect_stdout(io.StringIO()) as text:
            try:
                rc = main({argv!r})
            except SystemExit as e:  # --help
                rc = e.code
        print(json.dumps({{"rc": rc, "chars": len(text.getvalue()), "loaded": [m for m in {LAZY!r} if m in sys.modules]}}))
    """)
    assert out["rc"] in (0, None) and out["chars"] > 0
    assert out["loaded"] == []


def test_building_a_torchvision_backbone_imports_it_then():
    out = run_python("""
        import json, sys
        import torch
        from reuse_core import backbone, plugins

        assert "resnet18" in plugins.backbones()
        before = "torchvision" in sys.modules
        model = backbone.build("resnet18", num_classes=3).eval()
        with torch.no_grad():
            shape = list(model(torch.randn(2, 3, 32, 32)).shape)
        print(json.dumps({"before": before, "after": "torchvision" in sys.modules, "shape": shape,
                          "head": model.head_name, "type": type(model).__module__}))
    """)
    assert out == {"before": False, "after": True, "shape": [2, 3], "head": "fc", "type": "torchvision.models.resnet"}
