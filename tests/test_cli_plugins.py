"""`reuse plugins|backbones|strategies|datasets`, in-process (tests/test_plugin_install.py runs
them as subprocesses with third-party plugins installed)."""
from __future__ import annotations

import json

import pytest

from reuse_core import plugins
from reuse_core.cli import main
from reuse_core.plugins import PluginError, PluginInfo

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
        assert {"distribution", "version", "hooks", "error"} <= rows[0].keys()
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
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "HOOKS", "STATUS"]
    assert lines[1].split() == ["reuse_core.builtin.backbones", "reuse-core", infos[0].version, "register_backbones", "ok"]
    assert lines[-1].split()[:5] == ["bad", "reuse-bad", "1.0", "-", "ERROR:"]
    assert lines[-1].endswith("ERROR: failed to import: ImportError: nope")


def test_strict_failure_is_one_message_and_exit_1(monkeypatch, capsys):
    def fail():
        raise PluginError("reuse-core plugin 'x' (y 1): failed to import: boom\n(fatal because REUSE_CORE_STRICT_PLUGINS=1)")

    monkeypatch.setattr(plugins, "get_plugin_manager", fail)
    assert main(["backbones", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("reuse: reuse-core plugin 'x' (y 1): failed to import: boom")
