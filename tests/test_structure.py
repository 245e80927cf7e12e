"""The tree keeps the shape of the design: no import cycles between modules, no private name
imported from another module, no module over 700 lines, and test-only code outside the package.

Imports are read with `ast` (every import statement, including those inside functions, which is
where lazy imports live), so a cycle hidden behind a function-level import is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"embq": ROOT / "embq", "embq_serving": ROOT / "serving" / "embq_serving"}
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for root in PACKAGES.values():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, target: str, names: list[str]) -> list[tuple[str, str | None]]:
    """(imported module, name or None) pairs of `from target import names` inside `module`:
    a name that is itself a submodule counts as importing that submodule."""
    out = []
    for name in names:
        sub = f"{target}.{name}"
        out.append((sub, None) if sub in MODULES else (target, name))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """Every (module, imported name or None, line) that `module` imports from our packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for target, name in _resolve(module, base, [a.name for a in node.names]):
                found.append((target, name, node.lineno))
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_is_found():
    assert "embq.api" in MODULES and "embq.runtime.tbe" in MODULES
    assert "embq_serving.predictor" in MODULES


def test_no_import_cycles():
    edges = {m: sorted({t for t, _, _ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}
    # a package's __init__ importing its own submodules lazily is not a cycle of code
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {name} from {target}"
           for m, found in GRAPH.items() for target, name, line in found
           if name and name.startswith("_") and not name.startswith("__") and target != m]  # fmt: skip
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by responsibility"


def test_no_module_is_named_after_a_dependency():
    shadowing = {"torchrec", "torch", "faiss", "fbgemm_gpu", "numpy", "datasets", "safetensors"}
    names = {m.rsplit(".", 1)[-1] for m in MODULES}
    assert not names & shadowing


def test_test_only_references_live_under_tests():
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        for name in ("def exhaustive_ranges", "def kmeans1d_exact", "def toy_dlrm"):
            assert name not in text, f"{module} defines {name}; it belongs in tests/"
