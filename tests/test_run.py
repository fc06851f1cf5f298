"""Running strategies from Python and the command line: the same option errors as recipes, the
generated --help, the run directory, and `import reuse_core` staying free of torch."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import reuse_core
from reuse_core import cli, recipe
from reuse_core.cli.run import strategy_parser
from reuse_core.strategy import OptionError

GOOD = {"backbone": "small-cnn", "classes": "0-1", "label_budget": "5", "epochs": "1"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REUSE_CORE_STORE", str(tmp_path / "store"))


def _flags(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)]


@pytest.mark.parametrize(("bad", "message", "as_flags"), [
    ({"epochs": "three"}, "option 'epochs': expected an integer, got 'three'",
     "option --epochs: expected an integer, got 'three'"),
    ({"epoch": "3"}, "unknown option 'epoch'; did you mean epochs?", "unknown option --epoch; did you mean --epochs?"),
    ({"optimizer": "lion"}, "option 'optimizer': expected one of sgd, adam, adamw, got 'lion'",
     "option --optimizer: expected one of sgd, adam, adamw, got 'lion'"),
    ({"classes": "zero"}, "option 'classes': expected class indices or ranges like 0-4, got 'zero'",
     "option --classes: expected class indices or ranges like 0-4, got 'zero'"),
])
def test_a_bad_option_gets_the_same_error_from_cli_recipe_and_python(bad, message, as_flags, capsys, tmp_path):
    """The same check and wording everywhere; the command line names options as its flags."""
    options = {**GOOD, **bad}
    with pytest.raises(OptionError) as e:
        reuse_core.run("pretrain", **options)
    python = str(e.value)
    assert python == f"strategy 'pretrain': {message}"

    assert cli.main(["run", "pretrain", *_flags(options)]) == 2
    assert capsys.readouterr().err == f"reuse: error: strategy 'pretrain': {as_flags}\n"

    toml = "[[step]]\nname = \"s\"\nstrategy = \"pretrain\"\n" + "".join(f'{k} = "{v}"\n' for k, v in options.items())
    (tmp_path / "r.toml").write_text(toml)
    with pytest.raises(recipe.RecipeError) as e:
        recipe.check(recipe.load(tmp_path / "r.toml"))
    assert str(e.value) == f"{tmp_path / 'r.toml'}, step 's': {message}"
    assert cli.main(["run", str(tmp_path / "r.toml")]) == 2
    assert capsys.readouterr().err == f"reuse: error: {e.value}\n"
    assert not (tmp_path / "runs").exists()


def test_a_missing_required_option_is_named(capsys):
    assert cli.main(["run", "finetune"]) == 2
    assert "reuse: error: strategy 'finetune': option --model is required" in capsys.readouterr().err


def test_strategy_help_lists_every_option_with_type_default_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "distill", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: reuse run distill" in out and "Hinton" in out
    assert "examples:\n  reuse run distill --teacher digits-0-4 --student-backbone mlp" in out
    for flag in ("--teacher", "--temperature", "--cache-teacher", "--no-cache-teacher", "--label-budget",
                 "--student-backbone", "--store", "--run-dir", "--device", "--resume", "--quiet"):
        assert flag in out, flag
    assert "[float; default: 4.0]" in out and "[str; required]" in out
    assert "--optimizer {sgd,adam,adamw}" in out and "--classes ITEM [ITEM ...]" in out


def test_run_without_a_target_lists_the_strategies(capsys):
    assert cli.main(["run"]) == 2
    out = capsys.readouterr().out
    for name in ("pretrain", "finetune", "distill"):
        assert name in out


def test_flags_keep_raw_values_for_the_schema():
    from reuse_core import plugins

    p = strategy_parser("distill", plugins.strategies().get("distill"), cli.build_parser().parse_args(["run"]))
    ns = p.parse_args(["--no-cache-teacher", "--classes", "5-7", "9", "--temperature", "2"])
    assert (ns.opt_cache_teacher, ns.opt_classes, ns.opt_temperature) == (False, ["5-7", "9"], "2")


def test_cli_runs_a_strategy_and_names_its_run_directory(capsys, tmp_path):
    rc = cli.main(["run", "pretrain", *_flags(GOOD), "--run-dir", str(tmp_path / "d"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"run directory: {tmp_path / 'd'}" in out and "pretrain: model " in out
    assert (tmp_path / "d" / "result.json").exists()


def test_cli_runs_a_recipe_with_set(capsys, tmp_path):
    (tmp_path / "r.toml").write_text('[[step]]\nname = "a"\nstrategy = "pretrain"\nbackbone = "mlp"\n'
                                     'classes = ["0-1"]\nlabel_budget = 5\nepochs = 4\n')
    assert cli.main(["run", str(tmp_path / "r.toml"), "--set", "epochs=1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "a " in out and "run directory: runs/r-" in out
    assert cli.main(["run", str(tmp_path / "r.toml"), "--set", "epochs"]) == 2
    assert "--set wants KEY=VALUE" in capsys.readouterr().err


def test_import_reuse_core_does_not_import_torch_and_run_is_callable():
    code = ("import sys, reuse_core; assert 'torch' not in sys.modules, 'torch imported'; "
            "import reuse_core.run; assert callable(reuse_core.run) and reuse_core.run.RunContext")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_submodules_resolve_lazily_as_attributes():
    """`import reuse_core` alone gives the whole toolkit on first use; the authoring surface stays torch-free."""
    code = ("import sys, reuse_core, reuse_core.strategy; assert 'torch' not in sys.modules, 'torch imported'; "
            "from reuse_core.strategy import Option, Strategy, data_options, train_options; "
            "assert 'torch' not in sys.modules, 'the schema imported torch'; "
            "import torch; "
            "loss = reuse_core.ops.distill_kl_loss(torch.randn(4, 5), torch.randn(4, 5)); assert loss.ndim == 0; "
            "assert reuse_core.nn.DistillationLoss and reuse_core.store.ModelStore and reuse_core.engine.fit; "
            "assert reuse_core.strategy.RunContext is reuse_core.run.RunContext; "
            "assert {'ops', 'nn', 'store', 'engine', 'strategy'} <= set(dir(reuse_core))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_builtin_help_example_is_a_command_that_parses_and_resolves():
    import shlex

    from reuse_core import plugins

    registry = plugins.strategies()
    for name in registry.names():
        if registry.entry(name).plugin != "reuse_core.builtin.strategies":
            continue
        strategy = registry.get(name)
        assert strategy.examples, f"{name} has no example command"
        for example in strategy.examples:
            words = shlex.split(example)
            assert words[:3] == ["reuse", "run", name] and "..." not in example, example
            ns, extra = strategy_parser(name, strategy, argparse.Namespace(
                store=None, run_dir=None, device=None, resume=False, quiet=False)).parse_known_args(words[3:])
            assert extra == [], example
            strategy.resolve({k[4:]: v for k, v in vars(ns).items() if k.startswith("opt_")}, flags=True)


def test_the_result_prints_scalars_readably_and_each_model_once(capsys):
    from reuse_core.cli.run import _print_result
    from reuse_core.strategy import StrategyResult

    _print_result("cascade", StrategyResult(metrics={"test_mean_seconds": 2.5e-05, "calibration": [{"t": 1.0}],
                                                     "exits": {"0": 3}, "members": 2}, models=["abc"],
                                            run_dir="runs/x"), quiet=False)
    out = capsys.readouterr().out
    assert "2.5e-05" in out and "{" not in out and "[" not in out and "members" in out
    assert cli.main(["run", "pretrain", "--backbone", "mlp", "--epochs", "1", "--label-budget", "3"]) == 0
    out = capsys.readouterr().out
    model = out.split("pretrain: model ")[1].split()[0]
    assert out.count(model) == 1, out


def test_shipped_recipes_are_listed_and_run_by_name_from_any_folder(capsys):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "digits-transfer" in out and "cifar10-seed-cnn" in out
    assert cli.main(["run", "digits-transfer", "--set", "epochs=1", "--set", "label_budget=2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "transfer" in out and "run directory: runs/digits-transfer-" in out
