"""fastkd's imports run one way: every ``import`` in fastkd/ (read with ``ast``, those inside functions too) goes to
a module of its own layer or a lower one, and no chain of imports comes back to where it started.

The layers, lowest first (DESIGN.md: data flows data → models → losses (→ functional → ops → kernels) → train):

0. helpers several layers use: the precision rule, input checks, torch.distributed helpers, the cache folder, the native
   library's loader, the backend table;
1. Triton kernels, which import nothing of fastkd;
2. the ops' reference modules (one per op family) and the registration helper, fastkd.ops._library;
3. the backends' modules, ``fastkd/ops/<family>_<backend>.py``: only another backend module may import one
   (fastkd.ops loads them by file name, an import this test cannot see: that is how they stay out of the
   reference modules and out of CPU-only processes);
4. the functional losses; 5. the loss modules, the datasets, the models; 6. the public API (``fastkd``);
7. training; 8. the command line.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastkd"
BACKENDS = ("native", "triton")

HELPERS = ("fastkd._precision", "fastkd._checks", "fastkd._dist", "fastkd._native", "fastkd._cache", "fastkd.backends")
LAYERS = [  # (layer, the module prefixes in it); a module's layer is that of its longest matching prefix
    (0, HELPERS),
    (1, ("fastkd.kernels",)),
    (2, ("fastkd.ops",)),
    (4, ("fastkd.functional",)),
    (5, ("fastkd.losses", "fastkd.data", "fastkd.models")),
    (6, ("fastkd",)),
    (7, ("fastkd.train",)),
    (8, ("fastkd.cli", "fastkd.__main__", "fastkd.doctor")),
]
BACKEND_LAYER = 3

# (importer, imported): imports that close a cycle but run inside a function, after both modules are loaded
ALLOWED_CYCLES = {
    ("fastkd.train.loggers", "fastkd.train.recipe"):
        "the recipe module imports the loggers' table at its top; the MLflow logger needs recipe.dotted only "
        "when a run starts",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_backend_module(name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    return parent == "fastkd.ops" and leaf.rpartition("_")[2] in BACKENDS


def layer(name: str) -> int:
    if is_backend_module(name):
        return BACKEND_LAYER
    matches = [(len(prefix), rank) for rank, prefixes in LAYERS for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return max(matches)[1]


def imports(name: str) -> set[str]:
    """The fastkd modules ``name`` imports anywhere in its file (a ``from X import y`` of a submodule y is y)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m == "fastkd" or m.startswith("fastkd.")}


GRAPH = {name: imports(name) for name in MODULES}


def test_every_import_goes_down_or_sideways():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a)]
    assert not upward, "imports that run up a layer:\n" + "\n".join(sorted(upward))


def test_backend_modules_are_imported_by_no_other_layer():
    found = [f"{a} imports {b}" for a, targets in GRAPH.items() for b in targets
             if is_backend_module(b) and not is_backend_module(a)]
    assert not found, "\n".join(sorted(found))


def test_kernels_import_nothing_of_fastkd():
    found = [f"{a} imports {b}" for a, targets in GRAPH.items() if layer(a) == 1 for b in targets]
    assert not found, "\n".join(found)


def test_no_import_cycle():
    edges = {a: {b for b in targets if (a, b) not in ALLOWED_CYCLES} for a, targets in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_allowed_cycles_are_imports_inside_functions():
    """An allowed edge must be a lazy import (inside a function), else it would run at import time."""
    for importer, imported in ALLOWED_CYCLES:
        tree = ast.parse(MODULES[importer].read_text())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        assert imported in GRAPH[importer] and imported not in top, (importer, imported)


def test_a_cpu_only_import_never_imports_triton():
    """The Triton backend's modules load only where Triton can run (a GPU, or the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = "import sys, fastkd, fastkd.functional; print('triton' in sys.modules, 'fastkd.ops.crd_triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
