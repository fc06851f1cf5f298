"""reuse_core.registry: add/get/entry/names/describe, taken names, unknown names, rollback."""
from __future__ import annotations

import pytest

from reuse_core.registry import Entry, NameTakenError, Registry, UnknownNameError, plural


def filled() -> Registry[int]:
    reg: Registry[int] = Registry("backbone")
    with reg.adding_as("plugin-a"):
        reg.add("resnet18", 18, description="eighteen", family="resnet", min_input_size=None)
        reg.add("resnet34", 34)
    reg.add("alexnet", 1)
    return reg


def test_add_get_entry_names_describe():
    reg = filled()
    assert reg.get("resnet18") == 18 and "resnet34" in reg and "vgg" not in reg and len(reg) == 3
    assert reg.names() == ["alexnet", "resnet18", "resnet34"]
    assert reg.entry("resnet18") == Entry("resnet18", 18, "eighteen", "plugin-a", {"family": "resnet", "min_input_size": None})
    assert reg.entry("alexnet").plugin == "<direct>"
    assert reg.describe()[1] == {"name": "resnet18", "description": "eighteen", "plugin": "plugin-a",
                                 "family": "resnet", "min_input_size": None}


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownNameError) as exc:
        filled().get("resnet19")
    assert isinstance(exc.value, KeyError)
    assert str(exc.value) == ("unknown backbone 'resnet19'; did you mean resnet18, resnet34? "
                              "(3 backbones are registered; `reuse backbones` lists them)")
    with pytest.raises(KeyError, match=r"^unknown backbone 'zzz' \(3 backbones"):
        filled().entry("zzz")


def test_taken_name_names_both_plugins_and_keeps_the_first():
    reg = filled()
    with reg.adding_as("plugin-b"), pytest.raises(NameTakenError) as exc:
        reg.add("resnet18", 99)
    assert str(exc.value) == ("backbone 'resnet18' from plugin 'plugin-b' is already registered by plugin 'plugin-a'; "
                              "the first registration is kept")
    assert (exc.value.existing_plugin, exc.value.new_plugin) == ("plugin-a", "plugin-b")
    assert reg.get("resnet18") == 18


def test_on_taken_reports_instead_of_raising():
    reg, seen = filled(), []
    with reg.adding_as("plugin-b", seen.append):
        reg.add("resnet18", 99)
        reg.add("vgg11", 11)
    assert [e.name for e in seen] == ["resnet18"]
    assert reg.get("resnet18") == 18 and reg.entry("vgg11").plugin == "plugin-b"


def test_a_failing_block_leaves_nothing_behind():
    reg = filled()
    with pytest.raises(RuntimeError, match="half-way"), reg.adding_as("plugin-c"):
        reg.add("vgg11", 11)
        raise RuntimeError("half-way")
    assert "vgg11" not in reg and reg.names() == ["alexnet", "resnet18", "resnet34"]
    reg.add("vgg11", 11)  # the plugin context is restored
    assert reg.entry("vgg11").plugin == "<direct>"


@pytest.mark.parametrize("name", ["", None, 3])
def test_names_must_be_non_empty_strings(name):
    with pytest.raises(ValueError, match="a strategy name must be a non-empty string"):
        Registry("strategy").add(name, object())


def test_plural_of_each_kind():
    assert [plural(k) for k in ("backbone", "strategy", "dataset")] == ["backbones", "strategies", "datasets"]
    with pytest.raises(UnknownNameError, match=r"\(0 strategies are registered; `reuse strategies` lists them\)"):
        Registry("strategy").get("x")
