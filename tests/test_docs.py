"""The docs cannot drift from the code: every code block marked runnable in README.md and docs/*.md
runs here (each block on its own, in a fresh namespace), and every script in examples/ runs as a
real subprocess. Mark a block by putting `<!-- runnable -->` on the line before its ```python fence.
A script runs with no arguments unless a line of its module docstring says what to pass, e.g.
`Test run: --tiny`."""
from __future__ import annotations

import ast
import functools
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
BLOCK = re.compile(r"<!-- runnable -->\s*\n```python\n(.*?)\n```", re.S)


def _runnable_blocks():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        blocks = BLOCK.findall(text)
        assert len(blocks) == text.count(MARKER), f"{page.name}: a {MARKER} marker is not followed by a ```python block"
        for i, code in enumerate(blocks):
            yield pytest.param(page, code, id=f"{page.name}-{i}")


@pytest.mark.parametrize(("page", "code"), list(_runnable_blocks()))
def test_runnable_doc_block(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page.name}:runnable", "exec"), {"__name__": "__doc_block__"})


def _test_args(script: Path) -> list[str]:
    """The arguments the script's docstring asks for with a `Test run: ...` line (none without one)."""
    found = re.search(r"^Test run: (.*)$", ast.get_docstring(ast.parse(script.read_text())) or "", re.M)
    return shlex.split(found.group(1)) if found else []


@functools.cache
def _run_example(script: Path) -> subprocess.CompletedProcess:
    """One run per script and session, shared by the tests that read its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, str(script), *_test_args(script)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_script_runs(script):
    r = _run_example(script)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lm_distill_example_reports_its_results():
    """The tiny run prints three finite held-out perplexities, a cache of at most 5% of the dense
    one, and the verdict."""
    r = _run_example(ROOT / "examples" / "lm_distill.py")
    assert r.returncode == 0, r.stdout + r.stderr
    ppl = dict(re.findall(r"^held-out perplexity, (.+): (\S+)$", r.stdout, re.M))
    assert sorted(ppl) == ["distilled student", "scratch student", "teacher"], r.stdout
    assert all(math.isfinite(float(v)) for v in ppl.values()), ppl
    ratio = re.search(r"([\d.]+)% of the dense float16 cache", r.stdout)
    assert ratio and float(ratio.group(1)) <= 5.0, r.stdout
    assert re.search(r"^distilled student beats scratch: (yes|no)$", r.stdout, re.M), r.stdout


def test_every_example_is_linked_from_the_docs():
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    for script in (ROOT / "examples").glob("*.py"):
        assert f"examples/{script.name}" in docs, f"{script.name} is not mentioned in README.md or docs/"


def test_strategy_page_documents_every_builtin_option():
    """docs/strategies.md has a section per built-in strategy whose table names every option with
    its type and default, so the page cannot fall behind the schema."""
    from reuse_core import plugins

    page = (ROOT / "docs" / "strategies.md").read_text()
    registry = plugins.strategies()
    builtin = [n for n in registry.names() if registry.entry(n).plugin == "reuse_core.builtin.strategies"]
    assert builtin, "no built-in strategies registered"
    for name in builtin:
        start = page.find(f"## `{name}`")
        assert start >= 0, f"docs/strategies.md has no section for {name!r}"
        end = page.find("\n## ", start + 1)
        section = page[start:end if end > 0 else None]
        for o in registry.get(name).options:
            default = "required" if o.required else ("none" if o.default is None else f"`{o.default}`")
            row = re.search(rf"^\| `{re.escape(o.flag)}` \| {o.type.__name__}\b[^|]* \| (.*?) \|", section, re.M)
            assert row, f"docs/strategies.md, {name}: no row for {o.flag}"
            assert row.group(1) == default, f"docs/strategies.md, {name} {o.flag}: default {row.group(1)} != {default}"
