"""reuse_core.plugins: built-ins first, guarded loading, strict mode, the lifecycle relay.

Loading failures are exercised here in-process with plugin modules written to a temporary folder;
tests/test_plugin_install.py does the same through real pip installs and entry points.
"""
from __future__ import annotations

import json
import sys
import textwrap
import warnings

import pytest
import torch

from reuse_core import hookimpl, plugins
from reuse_core.cli import main
from reuse_core.plugins import BUILTIN_PLUGINS, PluginError, PluginHookError, ReusePluginManager
from reuse_core.registry import UnknownNameError

# Plugin modules that fail in each way the manager must survive (also used by the pip-installed
# broken distribution in test_plugin_install.py).
BROKEN_MODULES = {
    "broken_import": """
        '''Fails to import.'''
        import reuse_core_no_such_module
    """,
    "broken_raises": """
        '''Adds a backbone, then raises.'''
        from reuse_core import hookimpl

        @hookimpl
        def reuse_register_backbones(registry):
            registry.add("half-registered", object())
            raise ValueError("boom in register")
    """,
    "broken_taken": """
        '''Takes a built-in name and adds one of its own.'''
        from reuse_core import hookimpl
        from reuse_core.builtin.backbones import SeedCNN

        @hookimpl
        def reuse_register_backbones(registry):
            registry.add("seed-cnn", SeedCNN, description="an impostor")
            registry.add("broken-taken-own", SeedCNN, description="still registered", family="x", min_input_size=32)
    """,
    "broken_args": """
        '''Asks for an argument the hook does not have.'''
        from reuse_core import hookimpl

        @hookimpl
        def reuse_register_backbones(registry, colour):
            pass
    """,
    "broken_typo": """
        '''Misspells a hook name, and registers a dataset correctly.'''
        from reuse_core import hookimpl
        from reuse_core.data.digits import digits

        @hookimpl
        def reuse_register_backbone(registry):
            pass

        @hookimpl
        def reuse_register_datasets(registry):
            registry.add("typo-digits", digits)
    """,
}


# Plugins that misbehave beyond raising an Exception: they exit, print or take their time.
MISBEHAVING_MODULES = {
    "exits_on_import": """
        '''Calls sys.exit on import.'''
        import sys
        sys.exit(7)
    """,
    "exits_in_register": """
        '''Adds a strategy, then calls sys.exit in its register hook.'''
        import sys
        from reuse_core import hookimpl

        @hookimpl
        def reuse_register_strategies(registry):
            registry.add("exits-half-registered", object())
            sys.exit(3)
    """,
    "prints_while_loading": """
        '''Prints on import and in its register hook.'''
        from reuse_core import hookimpl

        print("hello from import")

        @hookimpl
        def reuse_register_backbones(registry):
            print("hello from register")
    """,
    "slow_register": """
        '''Sleeps in its register hook.'''
        import time
        from reuse_core import hookimpl

        @hookimpl
        def reuse_register_datasets(registry):
            time.sleep(1.1)
    """,
}


def write_modules(folder, modules: dict[str, str]) -> None:
    for name, src in modules.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(src))


@pytest.fixture
def broken_on_path(tmp_path, monkeypatch):
    """BROKEN_MODULES and MISBEHAVING_MODULES importable; yields the names of the former."""
    write_modules(tmp_path, {**BROKEN_MODULES, **MISBEHAVING_MODULES})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tuple(BROKEN_MODULES)
    for name in (*BROKEN_MODULES, *MISBEHAVING_MODULES):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_builtins_load_first_and_cleanly():
    pm = plugins.get_plugin_manager()
    assert pm is plugins.get_plugin_manager()  # cached
    infos = pm.plugin_infos()
    assert [i.name for i in infos[: len(BUILTIN_PLUGINS)]] == list(BUILTIN_PLUGINS)
    for info in infos[: len(BUILTIN_PLUGINS)]:
        assert info.error is None and info.distribution == "reuse-core" and info.hooks and info.description
    assert "seed-cnn" in plugins.backbones() and "digits" in plugins.datasets()
    assert plugins.backbones().entry("seed-cnn").plugin == "reuse_core.builtin.backbones"


def test_strategies_registry_works_while_empty_of_builtins():
    reg = plugins.strategies()
    assert reg.kind == "strategy" and isinstance(reg.describe(), list)
    with pytest.raises(UnknownNameError, match="unknown strategy 'nope'"):
        reg.get("nope")


def test_broken_plugins_are_reported_and_the_rest_works(broken_on_path):
    with pytest.warns(RuntimeWarning) as record:
        pm = ReusePluginManager(autoload=False, strict=False).load(BUILTIN_PLUGINS + broken_on_path)
    errors = {i.name: i.error for i in pm.plugin_infos()}
    assert errors["reuse_core.builtin.backbones"] is None
    assert errors["broken_import"] == "failed to import: ModuleNotFoundError: No module named 'reuse_core_no_such_module'"
    assert errors["broken_raises"] == ("reuse_register_backbones raised ValueError: boom in register "
                                       "(its backbones were not registered)")
    assert errors["broken_taken"] == ("backbone 'seed-cnn' from plugin 'broken_taken' is already registered by plugin "
                                      "'reuse_core.builtin.backbones'; the first registration is kept")
    assert errors["broken_args"].startswith("is invalid and was skipped: Plugin 'broken_args' for hook "
                                            "'reuse_register_backbones' hookimpl definition: reuse_register_backbones(registry, colour)")
    assert "{'colour'}" in errors["broken_args"]
    assert errors["broken_typo"] == ("implements 'reuse_register_backbone', which is not a reuse-core hook "
                                     "(it is never called); did you mean reuse_register_backbones, reuse_register_datasets, "
                                     "reuse_register_strategies?")
    assert len(record) == 5 and all("reuse-core plugin 'broken_" in str(w.message) for w in record)
    # The failing parts are skipped, everything else is there.
    assert "half-registered" not in pm.backbones
    assert pm.backbones.entry("seed-cnn").plugin == "reuse_core.builtin.backbones"
    assert pm.backbones.entry("broken-taken-own").plugin == "broken_taken"
    assert pm.datasets.entry("typo-digits").plugin == "broken_typo"
    assert "resnet18" in pm.backbones and "digits" in pm.datasets
    assert pm.get_plugin("broken_args") is None  # not half-registered


@pytest.mark.parametrize("module, message", [
    ("broken_import", "failed to import: ModuleNotFoundError"),
    ("broken_raises", "reuse_register_backbones raised ValueError: boom in register"),
    ("broken_taken", "backbone 'seed-cnn' from plugin 'broken_taken' is already registered"),
    ("broken_args", "is invalid and was skipped: Plugin 'broken_args'"),
    ("broken_typo", "implements 'reuse_register_backbone', which is not a reuse-core hook"),
    ("exits_on_import", "failed to import: SystemExit(7)"),
    ("exits_in_register", "reuse_register_strategies raised SystemExit(3)"),
])
def test_strict_mode_makes_each_failure_fatal(broken_on_path, module, message):
    with pytest.raises(PluginError, match="fatal because REUSE_CORE_STRICT_PLUGINS=1") as exc:
        ReusePluginManager(autoload=False, strict=True).load(BUILTIN_PLUGINS + (module,))
    assert f"reuse-core plugin '{module}' (reuse-core " in str(exc.value) and message in str(exc.value)


def test_a_plugin_calling_sys_exit_is_reported_and_the_rest_works(broken_on_path):
    with pytest.warns(RuntimeWarning) as record:
        pm = ReusePluginManager(autoload=False, strict=False).load(
            BUILTIN_PLUGINS + ("exits_on_import", "exits_in_register", "broken_typo"))
    errors = {i.name: i.error for i in pm.plugin_infos()}
    assert errors["exits_on_import"] == "failed to import: SystemExit(7)"
    assert errors["exits_in_register"] == ("reuse_register_strategies raised SystemExit(3) "
                                           "(its strategies were not registered)")
    messages = [str(w.message) for w in record]
    assert "reuse-core plugin 'exits_on_import' (reuse-core " in messages[0] and messages[0].endswith("SystemExit(7)")
    assert "exits-half-registered" not in pm.strategies and "pretrain" in pm.strategies
    assert pm.datasets.entry("typo-digits").plugin == "broken_typo"  # loaded after the exits


def test_what_plugins_print_while_loading_goes_to_stderr(broken_on_path, monkeypatch, capsys):
    monkeypatch.setattr(plugins, "get_plugin_manager",
                        lambda: ReusePluginManager(autoload=False).load(BUILTIN_PLUGINS + ("prints_while_loading",)))
    assert main(["backbones", "--json"]) == 0
    captured = capsys.readouterr()
    assert "resnet18" in {b["name"] for b in json.loads(captured.out)}  # stdout is nothing but the JSON
    assert "hello from import\nhello from register\n" in captured.err


def test_load_times_are_recorded_and_slow_plugins_marked(broken_on_path, monkeypatch, capsys):
    pm = ReusePluginManager(autoload=False, strict=True).load(BUILTIN_PLUGINS + ("slow_register",))
    infos = {i.name: i for i in pm.plugin_infos()}
    assert infos["slow_register"].load_seconds >= 1.1 and infos["slow_register"].slow
    assert all(0 < infos[b].load_seconds < plugins.SLOW_LOAD_SECONDS and not infos[b].slow for b in BUILTIN_PLUGINS)
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: pm)
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "HOOKS", "LOAD", "STATUS"]
    load = {ln.split()[0]: ln.split()[4:-1] for ln in lines[1:]}
    assert load["slow_register"][0].endswith("s") and float(load["slow_register"][0][:-1]) >= 1.1
    assert load["slow_register"][1:] == ["(slow)"] and load["reuse_core.builtin.backbones"][1:] == []
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["slow_register"]["load_seconds"] >= 1.1 and rows["slow_register"]["slow"] is True
    assert rows["reuse_core.builtin.datasets"]["slow"] is False


def test_environment_switches(monkeypatch):
    monkeypatch.setenv("REUSE_CORE_STRICT_PLUGINS", "1")
    monkeypatch.setenv("REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD", "yes")
    pm = ReusePluginManager()
    assert pm.strict and not pm.autoload
    monkeypatch.delenv("REUSE_CORE_STRICT_PLUGINS")
    monkeypatch.setenv("REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD", "0")
    pm = ReusePluginManager()
    assert not pm.strict and pm.autoload


class Recorder:
    """A plugin object implementing every lifecycle hook, some with fewer arguments."""

    def __init__(self, name, fail_in=None):
        self.name, self.fail_in, self.calls = name, fail_in, []

    def _record(self, hook, **kw):
        self.calls.append((hook, kw))
        if hook == self.fail_in:
            raise RuntimeError(f"{self.name} broke")

    @hookimpl
    def reuse_run_start(self, strategy, options, run_dir):
        self._record("reuse_run_start", strategy=strategy, options=options, run_dir=run_dir)

    @hookimpl
    def reuse_epoch_end(self, epoch, metrics):
        self._record("reuse_epoch_end", epoch=epoch, metrics=metrics)

    @hookimpl
    def reuse_run_end(self, result):
        self._record("reuse_run_end", result=result)

    @hookimpl
    def reuse_adjust_loss(self, loss, outputs):
        self._record("reuse_adjust_loss")
        return outputs.pow(2).mean() * 0.5 if self.name == "a" else None


def manager_with(*recorders) -> ReusePluginManager:
    pm = ReusePluginManager(autoload=False).load(builtins=())
    for r in recorders:
        pm.register(r, name=r.name)
    return pm


def test_lifecycle_relay_calls_every_plugin_with_its_arguments():
    a, b = Recorder("a"), Recorder("b")
    relay = plugins.lifecycle_relay(manager_with(a, b))
    relay.reuse_run_start(strategy="finetune", options={"lr": 0.1}, run_dir="/tmp/run")
    relay.reuse_epoch_end(strategy="finetune", epoch=1, metrics={"val_accuracy": 0.5})
    outputs = torch.randn(4, 3)
    terms = relay.reuse_adjust_loss(strategy="finetune", loss=torch.tensor(1.0), model=torch.nn.Identity(),
                                    inputs=torch.randn(4, 2), targets=torch.zeros(4), outputs=outputs)
    relay.reuse_run_end(strategy="finetune", result={"best_val_accuracy": 0.5})
    assert len(terms) == 1 and torch.allclose(terms[0], outputs.pow(2).mean() * 0.5)  # b returned None
    for r in (a, b):
        assert r.calls == [
            ("reuse_run_start", {"strategy": "finetune", "options": {"lr": 0.1}, "run_dir": "/tmp/run"}),
            ("reuse_epoch_end", {"epoch": 1, "metrics": {"val_accuracy": 0.5}}),
            ("reuse_adjust_loss", {}),
            ("reuse_run_end", {"result": {"best_val_accuracy": 0.5}}),
        ]
    with pytest.raises(TypeError):
        relay.reuse_run_end("finetune", {})  # keyword arguments only, as the engine calls them


def test_a_raising_lifecycle_hook_stops_the_call_naming_the_plugin():
    a, b = Recorder("a"), Recorder("b", fail_in="reuse_epoch_end")
    relay = plugins.lifecycle_relay(manager_with(a, b))
    with pytest.raises(PluginHookError) as exc:
        relay.reuse_epoch_end(strategy="distill", epoch=3, metrics={})
    assert str(exc.value) == "plugin 'b' (?) failed in reuse_epoch_end: RuntimeError: b broke"
    assert exc.value.plugin == "b" and exc.value.hook == "reuse_epoch_end"
    assert isinstance(exc.value.__cause__, RuntimeError)
    # pluggy calls the last registered first: b raised before a ran, nothing half-applied after it.
    assert a.calls == [] and len(b.calls) == 1


def test_no_warnings_from_a_clean_load():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReusePluginManager(autoload=False).load()
