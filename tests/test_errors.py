"""Bad command lines get one line, ``reuse: error: ...``, naming the option or file, and exit
with 2 (bad usage) or 1 (failed at run time); never a traceback (REUSE_CORE_DEBUG=1 keeps it)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from reuse_core import cli
from reuse_core import run as reuse_run

MLP = ["run", "pretrain", "--backbone", "mlp", "--epochs", "1", "--label-budget", "3", "--quiet"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")

# (command line, exit status, what the message must name); "{tmp}" is the test's folder
CASES = [
    ([*MLP, "--classes", "0-99"], 2, "option --classes: dataset 'digits': the dataset has classes 0-9; there is no class 10"),
    ([*MLP, "--classes", "5-3"], 2, "option --classes: the range '5-3' is reversed (write 3-5)"),
    ([*MLP, "--lable-budget", "3"], 2, "unknown option --lable-budget; did you mean --label-budget?"),
    ([*MLP, "--backbone-config", "hiden=[64]"], 2, "option --backbone-config: backbone 'mlp' has no setting 'hiden' "
                                                   "(its settings: input_size, hidden)"),
    ([*MLP, "--backbone-config", "hidden=[64"], 2, "option --backbone-config: the value of hidden is not valid JSON"),
    ([*MLP, "--backbone-config", "hidden=[-1]"], 2, "option --backbone-config: backbone 'mlp' cannot be built with "
                                                    "{'hidden': [-1]}: RuntimeError"),
    ([*MLP, "--name", "../x"], 2, "option --name: the model name '../x' is not allowed"),
    ([*MLP, "--dataset-config", "size=3"], 2, "option --dataset-config: dataset 'digits' has no setting 'size'"),
    ([*MLP, "--backbone", "resnet9000"], 2, "unknown backbone 'resnet9000'"),
    pytest.param([*MLP, "--device", "cuda"], 1, "device 'cuda': torch sees no CUDA device here", marks=NO_GPU),
    ([*MLP, "--device", "tpu7"], 1, "device 'tpu7' is not a device torch knows"),
    (["run", "pretrain", "--backbone", "seed-cnn", "--dataset", "cifar10", "--data-root", "{tmp}/no-cifar"], 1,
     "{tmp}/no-cifar"),
    (["run", "pretrian"], 2, "unknown strategy 'pretrian'; did you mean pretrain?"),
    (["run", "finetune", "--model", "no-such-model", "--quiet"], 1, "no model 'no-such-model' in the store"),
    (["run", "finetune"], 2, "option --model is required"),
    (["run", "{tmp}/missing.toml"], 2, "{tmp}/missing.toml: cannot read the recipe"),
    ([*MLP, "--resume"], 1, "nothing to resume: no unfinished 'pretrain' run of this strategy with these options"),
    (["models", "show", "no-such-model"], 1, "no model 'no-such-model'"),
    (["bench", "--ops", "no_such_op"], 2, "unknown op(s) no_such_op"),
    (["bench", "--repeats", "x"], 2, "reuse bench: argument --repeats: invalid int value: 'x'"),
    ([*MLP, "--epochs"], 2, "reuse run pretrain: argument --epochs: expected one argument"),
    (["models", "show"], 2, "reuse models show: the following arguments are required: ID"),
    (["no-such-verb"], 2, "invalid choice: 'no-such-verb'"),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REUSE_CORE_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("REUSE_CORE_DEBUG", raising=False)


@pytest.mark.parametrize(("argv", "status", "names"), CASES)
def test_a_bad_command_line_gets_one_clear_line(argv, status, names, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, out = _run(argv, capsys)
    assert got == status, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("reuse: error: ")]
    assert errors and names.replace("{tmp}", str(tmp_path)) in errors[0], out


def test_a_tampered_checkpoint_is_named_on_resume(capsys, tmp_path):
    reuse_run.run("pretrain", run_dir=tmp_path / "r", quiet=True, backbone="mlp", epochs=1, label_budget=3)
    (tmp_path / "r" / "result.json").unlink()  # as if it had been killed after its checkpoint
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    got, out = _run(["run", "pretrain", "--resume", "--run-dir", str(tmp_path / "r"), "--quiet"], capsys)
    assert got == 1 and "Traceback" not in out
    assert f"reuse: error: {tmp_path / 'r' / 'checkpoint.pt'} cannot be read back" in out and "remove it" in out


def test_a_recipe_reports_every_problem_at_once(capsys, tmp_path):
    (tmp_path / "bad.toml").write_text('''
[defaults]
epoch = 3

[[step]]
name = "a"
strategy = "pretrain"
backbone = "mlp"
lr = -1

[[step]]
name = "b"
strategy = "finetune"
model = "zzz"
mode = "half"

[[step]]
strategy = "pretrain"
backbone = "mlp"
''')
    got, out = _run(["run", str(tmp_path / "bad.toml")], capsys)
    assert got == 2 and "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("reuse: error: ")]
    for expected in ("step 3: needs a name", "step 'a': option 'lr': must be > 0", "step 'b': option 'mode'",
                     "step 'b': option 'model': 'zzz' is no earlier step", "[defaults]: 'epoch' is an option of no step"):
        assert sum(expected in e for e in errors) == 1, (expected, out)


def test_debug_keeps_the_traceback(tmp_path):
    env = {"REUSE_CORE_DEBUG": "1", "REUSE_CORE_STORE": str(tmp_path / "store"), "PATH": ""}
    r = subprocess.run([sys.executable, "-m", "reuse_core", "run", "finetune", "--model", "nope", "--quiet"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "StoreError" in r.stderr


def test_an_internal_error_is_one_line_naming_its_type(capsys, monkeypatch):
    monkeypatch.setattr(reuse_run, "run", lambda *a, **k: (_ for _ in ()).throw(TypeError("boom")))
    got, out = _run([*MLP], capsys)
    assert got == 1 and "Traceback" not in out
    assert "reuse: error: TypeError: boom (an internal error; REUSE_CORE_DEBUG=1 shows the traceback" in out


def test_interrupting_a_run_prints_the_command_that_continues_it(capsys, tmp_path, monkeypatch):
    from reuse_core import plugins

    class StopAfterFirstEpoch:
        def reuse_epoch_end(self, **kw):
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return lambda **kw: None

    relay = plugins.lifecycle_relay
    monkeypatch.setattr(plugins, "lifecycle_relay", StopAfterFirstEpoch)
    got, out = _run([*MLP[:4], "--epochs", "2", "--store", str(tmp_path / "s")], capsys)
    assert got == 130
    [line] = [line for line in out.splitlines() if "interrupted" in line]
    command = line.split("continue with: ")[1]
    assert command.startswith("reuse run pretrain --resume --run-dir runs/pretrain-") and "--store" in command
    monkeypatch.setattr(plugins, "lifecycle_relay", relay)
    got, out = _run(command.split()[1:] + ["--quiet"], capsys)
    assert got == 0 and "pretrain: model" in out


def test_a_damaged_cifar_folder_is_named(capsys, tmp_path):
    folder = tmp_path / "c10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]:
        (folder / name).write_bytes(b"\x07" * 3073 + b"\x00")  # one record and a stray byte
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    got, out = _run(["run", "pretrain", "--backbone", "seed-cnn", "--dataset", "cifar10", "--data-root",
                     str(tmp_path / "c10"), "--quiet"], capsys)
    assert got == 1 and "Traceback" not in out
    [line] = [line for line in out.splitlines() if line.startswith("reuse: error: ")]
    assert str(folder) in line, out
