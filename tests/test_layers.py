"""The package's import layers, read from the source with `ast` (nothing is imported).

Lower layers never import higher ones; no module imports itself back through others; imports of this package
sit at module top, except in cli.py (the assembly point) and lab/cli.py (the lab's subcommands), which import
what they run so that `guard-train --help` and a refused argument return before torch loads. The lab
(guard_train/lab) is a client of the core: no core module imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "guard_train"

# Longest matching prefix wins. Why the exceptions sit where they do:
# - config.params / config.paths are the typed-parameter and path-check helpers every layer declares with;
# - data.images (array <-> tensor conversions) is used by metrics and guidance alike;
# - data.dedup clusters SSCD embeddings, so it sits above metrics;
# - config (schema, loader) names the guidance schedulers and methods a config may choose, and collects the
#   training mitigations' sections: so training.mitigations (each file declares its config section and its hooks)
#   sits below it, with the loop's hook protocols (training.hooks) and base sampler (training.sampler) below that.
LAYERS: dict[str, int] = {
    "guard_train.config.params": 0, "guard_train.config.paths": 0, "guard_train.data.images": 0,
    "guard_train.models": 0,
    "guard_train.data": 1, "guard_train.attention": 1,
    "guard_train.guidance": 2, "guard_train.metrics": 2,
    "guard_train.training.hooks": 1, "guard_train.training.sampler": 1,
    "guard_train.data.dedup": 3, "guard_train.training.mitigations": 3, "guard_train.config": 3,
    "guard_train.training": 4, "guard_train.eval": 4,
    "guard_train.callbacks": 5,
    "guard_train.lab": 6,
    "guard_train.cli": 7, "guard_train": 7,
}
LAZY_ALLOWED = {"guard_train.cli", "guard_train.lab.cli"}  # the CLI and the lab's commands


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported guard_train module, at module top?, line) for every import of this package in the file; a
    `from pkg import name` where `name` is a submodule counts as importing the submodule."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name, id(n) in top, n.lineno) for a in n.names if a.name.startswith("guard_train")]
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("guard_train"):
            for a in n.names:
                sub = f"{n.module}.{a.name}"
                is_sub = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PKG.parent / Path(*sub.split("."))).is_dir()
                out.append((sub if is_sub else n.module, id(n) in top, n.lineno))
    return out


def graph() -> dict[str, list[tuple[str, bool, int]]]:
    return {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer():
    for mod in graph():
        assert any(mod == p or mod.startswith(p + ".") for p in LAYERS), mod


def test_no_upward_import():
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}) at line {line}"
           for a, deps in graph().items() for b, _, line in deps if layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_core_never_imports_the_lab():
    bad = [f"{a} imports {b}" for a, deps in graph().items() if not a.startswith(("guard_train.lab", "guard_train.cli"))
           and a != "guard_train" for b, _, _ in deps if b.startswith("guard_train.lab")]
    assert not bad, bad


def test_imports_at_module_top():
    bad = [f"{a}: line {line} imports {b} inside a function" for a, deps in graph().items()
           if a not in LAZY_ALLOWED for b, top, line in deps if not top]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    full = graph()
    g = {a: {b for b, _, _ in deps if b in full and b != a} for a, deps in full.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules fire: a metrics module that imports the training loop is upward; one importing inside a function
    is lazy."""
    f = tmp_path / "m.py"
    f.write_text("from guard_train.training.loop import Trainer\n\ndef g():\n    import guard_train.data.loaders\n")
    found = imports(f)
    assert ("guard_train.training.loop", True, 1) in found and ("guard_train.data.loaders", False, 4) in found
    assert layer("guard_train.training.loop") > layer("guard_train.metrics.copy")
    assert layer("guard_train.data.dedup") == 3 and layer("guard_train.data.loaders") == 1
