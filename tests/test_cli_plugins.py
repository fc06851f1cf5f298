"""`reuse plugins|backbones|strategies|datasets`, in-process (tests/test_plugin_install.py runs
them as subprocesses with third-party plugins installed)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reuse_core import plugins
from reuse_core.cli import main
from reuse_core.plugins import PluginError, PluginInfo
from tests.test_plugin_install import env_with, site  # noqa: F401 (site: the pip-installed plugins fixture)

VERBS = ("plugins", "backbones", "strategies", "datasets")


@pytest.mark.parametrize("verb", VERBS)
def test_help_explains_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: reuse {verb} [-h] [--json]" in out and "examples:" in out and f"  reuse {verb}\n" in out


@pytest.mark.parametrize("verb", VERBS)
def test_json_is_an_array_of_named_described_objects(verb, capsys):
    assert main([verb, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    for row in rows:
        assert isinstance(row["name"], str) and isinstance(row["description"], str)
    if verb == "plugins":
        assert {"distribution", "version", "hooks", "error", "load_seconds", "slow"} <= rows[0].keys()
    if verb == "backbones":
        assert by_name(rows)["inception_v3"]["min_input_size"] == 75
    if verb == "datasets":
        assert {"digits", "cifar10", "cifar100", "imagefolder"} <= set(by_name(rows))


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_text_tables(capsys):
    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "MIN", "INPUT", "PLUGIN", "DESCRIPTION"]
    row = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert row["inception_v3"][:4] == ["inception_v3", "inception", "75", "reuse_core.builtin.backbones"]
    assert row["vit_b_16"][2] == "=224" and row["resnet18"][2] == "-"
    assert main(["datasets"]) == 0
    assert any(ln.split()[:3] == ["digits", "embedded", "10"] for ln in capsys.readouterr().out.splitlines())


def test_plugins_text_shows_errors(monkeypatch, capsys):
    pm = plugins.get_plugin_manager()
    broken = PluginInfo("bad", "reuse-bad", "1.0", hooks=[], error="failed to import: ImportError: nope")
    infos = [*pm.plugin_infos(), broken]
    monkeypatch.setattr(pm, "plugin_infos", lambda: infos)
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "HOOKS", "LOAD", "STATUS"]
    first = lines[1].split()
    assert first[:4] + first[5:] == ["reuse_core.builtin.backbones", "reuse-core", infos[0].version, "register_backbones", "ok"]
    assert first[4] == f"{infos[0].load_seconds:.2f}s"
    assert lines[-1].split()[:6] == ["bad", "reuse-bad", "1.0", "-", "0.00s", "ERROR:"]
    assert lines[-1].endswith("ERROR: failed to import: ImportError: nope")


def test_strict_failure_is_one_message_and_exit_1(monkeypatch, capsys):
    def fail():
        raise PluginError("reuse-core plugin 'x' (y 1): failed to import: boom (fatal because REUSE_CORE_STRICT_PLUGINS=1)")

    monkeypatch.setattr(plugins, "get_plugin_manager", fail)
    assert main(["backbones", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ("reuse: error: reuse-core plugin 'x' (y 1): failed to import: boom "
                                             "(fatal because REUSE_CORE_STRICT_PLUGINS=1)\n")


def test_plugins_epilog_explains_the_load_column(capsys):
    with pytest.raises(SystemExit):
        main(["plugins", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f'"(slow)" marks a plugin over {plugins.SLOW_LOAD_SECONDS:g} s' in out and "load_seconds in --json" in out


def test_strict_mode_in_reuse_run_is_one_line_naming_the_plugin(site):
    """`reuse run` loads the plugins outside the listings' own handling: strict mode still gives
    one line, not a PluginError traceback."""
    r = subprocess.run([sys.executable, "-m", "reuse_core", "run", "pretrain", "--help"], cwd=site.parent,
                       env=env_with(site, REUSE_CORE_STRICT_PLUGINS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("reuse: error: reuse-core plugin 'broken_") and "(reuse-broken 6.6.6)" in r.stderr
    assert r.stderr.rstrip("\n").endswith("(fatal because REUSE_CORE_STRICT_PLUGINS=1)") and r.stderr.count("\n") == 1
