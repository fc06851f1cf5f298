"""The house's imports run one way, and plugins use only the public surface.

Every module's imports are read with ``ast`` (imports inside functions count; those under
``if TYPE_CHECKING:`` never run, so they are left out of the cycle check but still follow the
direction). The direction, top to bottom:
cli -> runner -> built-in plugins -> authoring surface -> engine, store, registry, data -> nn -> ops -> _C.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reuse_core"

# Top to bottom; a module belongs to the layer of its longest matching prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("reuse_core.cli", "reuse_core.__main__", "reuse_core.demo", "reuse_core.bench", "reuse_core.doctor")),
    ("runner", ("reuse_core.run", "reuse_core.recipe")),
    ("built-in plugins", ("reuse_core.builtin",)),
    ("authoring surface", ("reuse_core.strategy",)),
    ("engine, store, registry, data", ("reuse_core.engine", "reuse_core.store", "reuse_core.registry",
                                       "reuse_core.data", "reuse_core.plugins", "reuse_core.backbone",
                                       "reuse_core.combine", "reuse_core.files")),
    ("nn", ("reuse_core.nn",)),
    ("ops", ("reuse_core.ops",)),
    ("_C", ("reuse_core._C",)),
)
# The package itself (``__version__``, ``hookimpl``) and the hook specifications sit beside the layers:
# anything may import them, and they import nothing of the project (the package only hookspecs).
BESIDE = ("reuse_core", "reuse_core.hookspecs")


@dataclass(frozen=True)
class Import:
    source: str       # the importing module
    target: str       # the imported module (a name imported from a module counts as that module)
    names: tuple[str, ...]
    line: int
    type_checking: bool

    def __str__(self) -> str:
        what = f"{self.target} ({', '.join(self.names)})" if self.names else self.target
        return f"{self.source}:{self.line} imports {what}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    rel = Path(*name.split("."))
    return (root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists() or name.endswith("._C")


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, root: Path, project: str = "reuse_core") -> list[Import]:
    """Every import of ``project`` in the file at ``path`` (``root``: the folder holding the package)."""
    source = module_name(path, root) if path.is_relative_to(root / project) else path.name
    tree = ast.parse(path.read_text(), str(path))
    guarded = _type_checking_lines(tree)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names = tuple(a.name for a in node.names)
            subs = [n for n in names if _is_module(f"{base}.{n}", root)]
            targets = [(f"{base}.{n}", ()) for n in subs]
            if len(subs) < len(names):
                targets.append((base, tuple(n for n in names if n not in subs)))
        else:
            continue
        for target, names in targets:
            if target == project or target.startswith(project + "."):
                out.append(Import(source, target, names, node.lineno, node.lineno in guarded))
    return out


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def project_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(path, ROOT)]


def test_every_module_has_a_layer():
    modules = {module_name(p, ROOT) for p in PACKAGE.rglob("*.py")}
    assert sorted(m for m in modules if m not in BESIDE and layer_of(m) is None) == []


def test_imports_run_down_the_layers():
    against = []
    for imp in project_imports():
        if imp.target in BESIDE:
            continue
        if imp.source in BESIDE:
            if not (imp.source == "reuse_core" and imp.target == "reuse_core.hookspecs"):
                against.append(f"{imp}: {imp.source} imports nothing of the project but the hook specifications")
            continue
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if dst < src:
            against.append(f"{imp}: {LAYERS[src][0]} -> {LAYERS[dst][0]} runs up")
    assert against == []


def test_hookspecs_imports_nothing_of_the_project():
    assert [str(i) for i in imports_of(PACKAGE / "hookspecs.py", ROOT)] == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for imp in project_imports():
        if not imp.type_checking and imp.target != "reuse_core" and imp.source != imp.target:
            edges.setdefault(imp.source, set()).add(imp.target)
    assert find_cycle(edges) is None


def test_the_checker_sees_function_imports_cycles_and_upward_arrows(tmp_path):
    """The checks above could fail: a planted upward import inside a function and a planted cycle are found."""
    pkg = tmp_path / "reuse_core"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("def f():\n    from reuse_core.cli import main\n")
    (pkg / "ops" / "a.py").write_text("from . import b\n")
    (pkg / "ops" / "b.py").write_text("from reuse_core.ops.a import x\nif TYPE_CHECKING:\n    import reuse_core.run\n")
    found = {(i.source, i.target, i.type_checking) for p in pkg.rglob("*.py") for i in imports_of(p, tmp_path)}
    assert ("reuse_core.ops", "reuse_core.cli", False) in found
    assert ("reuse_core.ops.b", "reuse_core.run", True) in found
    assert layer_of("reuse_core.cli") < layer_of("reuse_core.ops")
    edges = {"reuse_core.ops.a": {"reuse_core.ops.b"}, "reuse_core.ops.b": {"reuse_core.ops.a"}}
    assert find_cycle(edges) == ["reuse_core.ops.a", "reuse_core.ops.b", "reuse_core.ops.a"]


# ---------------------------------------------------------------------------- the public surface

def private_parts(imp: Import) -> list[str]:
    """What of an import is private: a module or name whose own name starts with ``_`` (dunders such
    as ``__version__`` are public), or anything inside ``reuse_core.builtin``."""
    parts = [*imp.target.split("."), *imp.names]
    bad = [p for p in parts if p.startswith("_") and not (p.startswith("__") and p.endswith("__"))]
    if imp.target == "reuse_core.builtin" or imp.target.startswith("reuse_core.builtin."):
        bad.append("reuse_core.builtin")
    return bad


def _python_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def test_plugins_and_builtins_import_only_public_names():
    """plugins/ is third-party code: nothing private. The built-ins may use each other (the package
    is private to itself) but nothing else private."""
    bad = []
    for path in _python_files("plugins"):
        bad += [f"{i}: {', '.join(private_parts(i))}" for i in imports_of(path, ROOT) if private_parts(i)]
    for path in _python_files("reuse_core/builtin"):
        for i in imports_of(path, ROOT):
            parts = [p for p in private_parts(i) if p != "reuse_core.builtin"]
            if parts:
                bad.append(f"{i}: {', '.join(parts)}")
    assert bad == []


@pytest.mark.parametrize("folder", ["reuse_core", "plugins", "examples", "benchmarks", "tests"])
def test_nothing_outside_builtin_imports_from_it(folder):
    bad = []
    for path in _python_files(folder):
        if path.is_relative_to(PACKAGE / "builtin") or path.is_relative_to(ROOT / "tests" / "builtin"):
            continue  # the built-ins themselves, and their own white-box tests
        bad += [str(i) for i in imports_of(path, ROOT) if "reuse_core.builtin" in private_parts(i)]
    assert bad == []


def test_the_private_check_sees_private_modules_and_names(tmp_path):
    (tmp_path / "reuse_core" / "ops").mkdir(parents=True)
    (tmp_path / "reuse_core" / "ops" / "_ext.py").write_text("")
    plugin = tmp_path / "plugin.py"
    plugin.write_text("from reuse_core.ops import _ext\nfrom reuse_core.strategy import _helper, Option\n"
                      "from reuse_core import __version__\nimport reuse_core.builtin.strategies.distill\n")
    found = {tuple(private_parts(i)) for i in imports_of(plugin, tmp_path) if private_parts(i)}
    assert found == {("_ext",), ("_helper",), ("reuse_core.builtin",)}

