"""The dependency rule of docs/architecture.md, checked on the source (``ast``, no imports run).

- No import cycles between the project's modules (module-level and function-level imports),
  counting imports that go through a package's ``__init__`` (its face): ``from pkg import sub``
  depends on ``pkg/__init__`` as well as on ``pkg.sub``, even inside ``pkg``.
- A submodule imports its siblings by module path, never through its own package's face.
- The subpackages of ``arhq_jax`` import only the subpackages below them (``LAYERS``).
- ``pallas_kernels`` imports only ``arhq_jax.numerics`` of the library (plus jax, numpy, itself).
- An import inside a function is only for an optional or heavy dependency (``ALLOWED_LAZY``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("arhq_jax", "pallas_kernels", "converters")
# Top-level names that may be imported inside a function: optional extras and heavy deps that
# the core does not need (torch, plotting, lm-eval, hub/tokenizer libraries, export consumers),
# GPU-only Pallas lowering, and stdlib data loaded on demand.
ALLOWED_LAZY = {
    "torch",
    "matplotlib",
    "lm_eval",
    "transformers",
    "compressed_tensors",
    "peft",
    "datasets",
    "pyarrow",
    "gguf",
    "orbax",
    "pydoc_data",
    "jax.experimental.pallas.triton",
    "arhq_jax.evaluation.lm_eval_backend",  # the "eval" extra's module: it imports lm_eval
}
# Library modules the kernels may import (``arhq_jax`` is the package __init__ that importing
# either runs first; it imports only the standard library).
KERNEL_DEPS = {
    "arhq_jax.numerics.formats",
    "arhq_jax.numerics.elements",
    "arhq_jax.numerics",
    "arhq_jax",
}
# The dependency rule of docs/architecture.md: each unit (a subpackage of ``arhq_jax``, or a
# top-level package) and the units it may import. ``arhq_jax`` itself (its face) imports only the
# standard library, so every unit may name it.
LAYERS = {
    "storage": set(),
    "numerics": set(),
    "pallas_kernels": {"numerics"},
    "linears": {"numerics", "pallas_kernels"},
    "models": {"numerics", "linears"},
    "parallel": {"numerics", "linears"},
    "decomposition": {"numerics", "linears", "models"},
    "calibration": {"numerics", "linears", "models", "parallel", "decomposition"},
    "methods": {"numerics", "linears", "models", "parallel", "decomposition", "calibration"},
    "converters": {"storage", "numerics", "linears", "models"},
    "checkpoint": {"storage", "numerics", "linears", "models", "methods", "converters"},
    "run": {
        *("storage", "numerics", "linears", "models", "parallel", "decomposition"),
        *("calibration", "methods", "checkpoint", "converters"),
    },
    "evaluation": {
        *("storage", "numerics", "linears", "models", "calibration", "checkpoint", "converters"),
    },
}
LAYERS["api"] = set(LAYERS)  # the one-call API (arhq_jax/api.py): over every unit but the CLI
LAYERS["cli"] = set(LAYERS)  # the shell may import every other unit


def _unit(module: str) -> str | None:
    """The unit of LAYERS a module belongs to (None for the ``arhq_jax`` face itself)."""
    parts = module.split(".")
    if parts[0] != "arhq_jax":
        return parts[0]
    return parts[1] if len(parts) > 1 else None


FACE = ":face"  # marks an import that reads a submodule through its package's __init__


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(p)] = p
    return out


def _imports(path: Path, name: str, modules: dict) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                out.extend((a.name, in_func, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                ours = base.split(".")[0] in PACKAGES or base in modules
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    if ours and sub in modules:
                        # ``from pkg import sub`` runs pkg's face and reads sub from it.
                        out.append((base + FACE, in_func, child.lineno))
                        out.append((sub, in_func, child.lineno))
                    else:
                        out.append((base if ours else sub, in_func, child.lineno))
            visit(child, func)

    visit(tree, False)
    return out


def _graph():
    """(modules, {module: imported project modules}, [(module, lazily imported, line)]).

    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those packages are
    edges too, except the importer's own ancestors (already being initialized)."""
    modules = _modules()
    edges, lazy = {}, []
    for name, path in modules.items():
        deps = set()
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own.add(name)
        for mod, in_func, line in _imports(path, name, modules):
            if mod.endswith(FACE):
                face = mod.removesuffix(FACE)
                if face != name:  # a package's own __init__ may name its submodules
                    deps.add(face)
                continue
            if in_func:
                lazy.append((name, mod, line))
            parts = mod.split(".")
            for k in range(1, len(parts) + 1):
                dep = ".".join(parts[:k])
                if dep in modules and dep != name and dep not in own:
                    deps.add(dep)
        edges[name] = deps
    return modules, edges, lazy


def _cycles(edges: dict) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    _, edges, _ = _graph()
    assert _cycles(edges) == []


def test_cycle_detection_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_the_face_of_a_package_is_an_edge_even_from_inside_it(tmp_path):
    """``from pkg import sub`` inside pkg is the cycle pkg/__init__ → … → the importer."""
    (tmp_path / "pkg").mkdir()
    src = tmp_path / "pkg" / "a.py"
    src.write_text("from pkg import b\nimport pkg.c as c\n")
    got = _imports(src, "pkg.a", {"pkg", "pkg.a", "pkg.b", "pkg.c"})
    assert got == [("pkg" + FACE, False, 1), ("pkg.b", False, 1), ("pkg.c", False, 2)]


def test_siblings_are_imported_by_module_path():
    modules, _, _ = _graph()
    bad = []
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        for mod, _, line in _imports(path, name, modules):
            if mod.endswith(FACE) and mod.removesuffix(FACE) in own:
                bad.append(f"{name}:{line} imports a sibling through {mod.removesuffix(FACE)}")
    assert bad == []


def test_every_module_sits_in_a_subpackage():
    modules, _, _ = _graph()
    flat = [n for n in modules if n.count(".") == 1 and n.startswith("arhq_jax.")]
    assert [n for n in flat if n.split(".")[1] not in LAYERS] == []
    assert {_unit(n) for n in modules} - {None} == set(LAYERS)


def test_subpackages_import_only_the_ones_below_them():
    _, edges, _ = _graph()
    bad = [
        f"{name} imports {dep}"
        for name, deps in edges.items()
        for dep in deps
        if _unit(dep) not in (None, _unit(name)) and _unit(dep) not in LAYERS[_unit(name)]
    ]
    assert bad == []


def test_the_layer_rule_is_acyclic():
    assert _cycles({u: set(d) for u, d in LAYERS.items()}) == []


def test_kernels_import_only_formats_and_elements():
    modules, edges, _ = _graph()
    for name, deps in edges.items():
        if name.split(".")[0] == "pallas_kernels":
            lib = {d for d in deps if d.split(".")[0] != "pallas_kernels"}
            assert lib <= KERNEL_DEPS, (name, lib - KERNEL_DEPS)
    # ... and nothing of the library outside the kernels' own users imports them but qlinear.
    assert edges["arhq_jax"] == set()
    users = {n for n, deps in edges.items() if any(d.startswith("pallas_kernels") for d in deps)}
    assert {u for u in users if not u.startswith("pallas_kernels")} == {
        "arhq_jax.linears.quantized"
    }


def test_function_level_imports_only_for_optional_dependencies():
    _, _, lazy = _graph()
    bad = [
        f"{name}:{line} imports {mod}"
        for name, mod, line in lazy
        if not any(mod == a or mod.startswith(a + ".") for a in ALLOWED_LAZY)
    ]
    assert bad == []


def test_the_graph_sees_function_level_imports(tmp_path):
    """The walker finds imports nested in functions and methods, and resolves relative ones."""
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text(
        "import os\nclass A:\n    def f(self):\n        from . import other\n"
        "def g():\n    if True:\n        import torch\n"
    )
    got = _imports(src, "pkg.mod", {"pkg.other": None})
    assert got == [("os", False, 1), ("pkg.other", True, 4), ("torch", True, 7)]
