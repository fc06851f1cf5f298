"""The strategy option schema: the conversions and errors shared by the CLI, recipes and Python."""
from __future__ import annotations

import pytest

from reuse_core.strategy import REQUIRED, Option, OptionError, Strategy, StrategyResult, fraction, positive


def _strategy():
    return Strategy(
        name="toy",
        description="a toy",
        options=(
            Option("teacher", str, help="store ID of the teacher"),
            Option("epochs", int, 3, "training epochs", check=positive),
            Option("lr", float, 0.1, "learning rate", check=positive),
            Option("mode", str, "full", "how", choices=("full", "linear")),
            Option("freeze", bool, False, "freeze"),
            Option("classes", list, None, "class subset"),
            Option("alpha", float, 0.5, "weight", check=fraction),
        ),
        run=lambda ctx, opts: StrategyResult(),
    )


def test_defaults_and_conversion_from_strings():
    got = _strategy().resolve({"teacher": "abc", "epochs": "5", "lr": "1e-3", "freeze": "yes", "classes": "0,1,2"})
    assert got == {"teacher": "abc", "epochs": 5, "lr": 1e-3, "mode": "full", "freeze": True,
                   "classes": ["0", "1", "2"], "alpha": 0.5}


def test_typed_values_from_recipes_pass_through():
    got = _strategy().resolve({"teacher": "t", "epochs": 2, "lr": 1, "classes": [3, 4]})
    assert got["epochs"] == 2 and got["lr"] == 1.0 and isinstance(got["lr"], float) and got["classes"] == ["3", "4"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({}, "option 'teacher' is required (store ID of the teacher)"),
        ({"teacher": "t", "epoch": 3}, "unknown option 'epoch'; did you mean epochs?"),
        ({"teacher": "t", "epochs": "three"}, "option 'epochs': expected an integer, got 'three'"),
        ({"teacher": "t", "epochs": 2.5}, "option 'epochs': expected an integer, got 2.5"),
        ({"teacher": "t", "epochs": True}, "option 'epochs': expected an integer, got True"),
        ({"teacher": "t", "epochs": 0}, "option 'epochs': must be > 0, got 0"),
        ({"teacher": "t", "mode": "half"}, "option 'mode': expected one of full, linear, got 'half'"),
        ({"teacher": "t", "freeze": "maybe"}, "option 'freeze': expected true or false, got 'maybe'"),
        ({"teacher": "t", "alpha": 2}, "option 'alpha': must be in [0, 1], got 2.0"),
        ({"teacher": "t", "lr": "fast"}, "option 'lr': expected a number, got 'fast'"),
    ],
)
def test_bad_options_name_the_key(given, message):
    with pytest.raises(OptionError) as e:
        _strategy().resolve(given)
    assert str(e.value).startswith("strategy 'toy': ")
    assert message in str(e.value)


def test_errors_name_the_recipe_step_and_all_bad_keys():
    with pytest.raises(OptionError, match=r"^recipe step 'student': .*'epochs'.*'lr'"):
        _strategy().resolve({"teacher": "t", "epochs": -1, "lr": "x"}, where="recipe step 'student'")


def test_dashes_and_underscores_name_the_same_option():
    s = Strategy("s", "", (Option("label_budget", int, 10),), run=lambda c, o: StrategyResult())
    assert s.resolve({"label-budget": "4"}) == {"label_budget": 4}
    assert s.option("label_budget").flag == "--label-budget"


def test_schema_mistakes_fail_at_definition():
    with pytest.raises(TypeError, match="type must be one of"):
        Option("x", dict)
    with pytest.raises(ValueError, match="defined twice"):
        Strategy("s", "", (Option("x", int, 1), Option("x", int, 2)), run=lambda c, o: StrategyResult())


def test_describe_is_json_ready():
    import json

    d = _strategy().describe()
    json.dumps(d)
    assert d["options"][0] == {"name": "teacher", "type": "str", "default": None, "required": True,
                               "help": "store ID of the teacher", "choices": None, "ref": False}
    assert REQUIRED is not None and StrategyResult(models=["a", "b"]).model == "b"
