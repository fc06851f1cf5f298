"""The docs cannot drift from the code: every code block marked runnable in README.md and docs/*.md
runs here (each block on its own, in a fresh namespace), and every script in examples/ runs as a
real subprocess. Mark a block by putting `<!-- runnable -->` on the line before its ```python fence."""
from __future__ import annotations

import os
import re
import subprocess
import sys
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


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_script_runs(script, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_example_is_linked_from_the_docs():
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    for script in (ROOT / "examples").glob("*.py"):
        assert f"examples/{script.name}" in docs, f"{script.name} is not mentioned in README.md or docs/"
