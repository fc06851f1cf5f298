"""`reuse demo` in a reduced setting (2 seeds, 1 epoch a step): the same recipes and code path as the
full demo, writing its table, report.md, metrics.json and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from reuse_core import cli, demo

UNTRAINED = {"cascade", "soup", "uniform-soup", "merge-linear", "merge-task-arithmetic", "merge-ties"}


def test_reduced_demo_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--seeds", "2", "--epochs-scale", "0.01", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean +- sd over 2 seeds" in printed and f"report, metrics and plots: {out}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["key"] for s in metrics["sections"]] == [s.key for s in demo.SECTIONS]
    for sec in metrics["sections"]:
        for row in sec["rows"]:
            trained = row["step"] not in UNTRAINED  # these combine stored models: no epochs, no curve
            assert len(row["test_accuracy"]) == 2 and 0 <= row["mean"] <= 1 and len(row["val_curves"][0]) == trained
            assert row["label"] in printed
        for c in sec["comparisons"]:
            assert c["seeds"] == 2 and f"{c['method']} beats {c['baseline']}" in printed
    report = (out / "report.md").read_text()
    assert "![curves.png](curves.png)" in report and "recipes/digits-distill.toml" in report
    for png in ("curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each section is its recipe's run; the distill section reuses the transfer section's models
    assert (out / "seed-1" / "transfer" / "steps" / "teacher" / "result.json").exists()
    assert not (out / "seed-1" / "distill" / "steps" / "teacher").exists()
    store = out / "store" / "models"
    made = {step for sec in demo.SECTIONS for _, step in sec.rows} | {"scratch", "selfsup"}  # each once per seed
    made = len(made - {"cascade"}) + 4  # the cascade saves no model; the ensemble its 4 members too
    made += 2 * 2  # the transfer curve: fine-tuned and from scratch at 1 and 2 labels per class
    assert len(list(store.iterdir())) == 2 * made
    curve = metrics["combination"]["transfer"]["gains"]["full"]
    assert sorted(curve, key=int) == ["1", "2", "5"] and all(g["seeds"] == 2 for g in curve.values())
    assert "self-supervised fine-tuned vs from scratch at 1 label per class" in printed
    assert "![transfer_curve.png](transfer_curve.png)" in report and (out / "transfer_curve.png").is_file()
    combination = metrics["combination"]
    assert len(combination["ensemble"]["best_member"]) == len(combination["cascade"]["compute_vs_expensive"]) == 2
    assert "ensemble beats its best member" in printed and "![cascade.png](cascade.png)" in report
    assert (out / "cascade.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the merge section exports its best model in int8 per seed (files, not store entries)
    assert [e["size_ratio"] <= 0.3 for e in combination["merge"]["int8"]] == [True, True]
    assert all(Path(e["file"]).is_file() for e in combination["merge"]["int8"]) and "int8 export of the model" in printed


def test_bad_demo_flags_exit_2(capsys):
    assert cli.main(["demo", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
