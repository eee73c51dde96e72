"""The pipeline's source layout (issues 14 and 20): one memory.py in the project; ladder_clip in layers
(base < data < model < methods < engine < apps), each module importing only from its own layer or those
below, at module level and inside functions, with no import cycle; no private name of one module used
from another; `ladder-clip` importing nothing heavy before main() runs."""
import ast
import graphlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/ -> the repository
PIPELINE = os.path.join(ROOT, "python", "ladder_clip")
LAYERS = ("base", "data", "model", "methods", "engine", "apps")
# The package itself (lazy names), `python -m ladder_clip`, and the old flat paths kept as aliases: above
# every layer, and nothing in a layer may import them.
TOP = len(LAYERS)


def _sources():
    for folder, _, names in os.walk(PIPELINE):
        for name in sorted(names):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _module(path: str) -> str:
    parts = os.path.relpath(path, os.path.dirname(PIPELINE))[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: str):
    """(line, imported module, names or None) of every import of ladder_clip in the file, wherever it is
    (module level, functions, branches): `from . import x` as the module x (when x is one), else its
    package; importlib.import_module / alias() calls with a literal name count as well."""
    mod = _module(path)
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read())
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.rsplit(".", n.level - 1)[0] if n.level > 1 else package
                target = f"{base}.{n.module}" if n.module else base
            else:
                target = n.module or ""
            if target == "ladder_clip" or target.startswith("ladder_clip."):
                yield n.lineno, target, [a.name for a in n.names]
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name == "ladder_clip" or a.name.startswith("ladder_clip."):
                    yield n.lineno, a.name, None
        elif isinstance(n, ast.Call):
            fn = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            if fn in ("import_module", "alias"):
                names = [a.value for a in n.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                for name in names if fn == "alias" else names[:1]:
                    target = package + name if name.startswith(".") else name
                    if target.startswith("ladder_clip"):
                        yield n.lineno, target, None


def _graph():
    """{module: {module it imports: first line}}, over ladder_clip's own modules; `from pkg import x`
    depends on pkg.x when that is a module, else on pkg."""
    paths = {_module(p): p for p in _sources()}
    graph = {}
    for mod, path in paths.items():
        deps = {}
        for line, target, names in _imports(path):
            found = [f"{target}.{a}" for a in names or [] if f"{target}.{a}" in paths]
            if not found or len(found) < len(names or []):
                found.append(target)
            for d in found:
                if d in paths and d != mod:
                    deps.setdefault(d, line)
        graph[mod] = deps
    return paths, graph


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def test_one_memory_py():
    found = [os.path.relpath(os.path.join(d, f), ROOT) for top in ("python", "ladder_kernels")
             for d, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs if f == "memory.py"]
    assert len(found) <= 1 and not any(p.startswith("python") for p in found), found


def test_every_module_is_in_a_layer():
    """Only the package, __main__, the aliases' helper and the old paths (aliases) live outside a layer,
    and an old path is only an alias (it defines nothing)."""
    paths, graph = _graph()
    for mod, path in paths.items():
        if _layer(mod) < TOP or mod in ("ladder_clip", "ladder_clip.__main__", "ladder_clip._alias"):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defined and any(i.endswith("_alias") for i in graph[mod]), \
            f"{mod}: a module outside the layers {LAYERS} must be an alias of a moved module"


def test_imports_follow_the_layers():
    """Every import of a ladder_clip module, at module level or inside a function, goes to the same layer or
    one below: base < data < model < methods < engine < apps (the aliases above all)."""
    paths, graph = _graph()
    bad = [f"{os.path.relpath(paths[m], ROOT)}:{line} {m} ({LAYERS[_layer(m)]}) imports {d} "
           f"({LAYERS[_layer(d)] if _layer(d) < TOP else 'an alias / the package'})"
           for m, deps in graph.items() for d, line in deps.items() if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    """No cycle among ladder_clip's modules, counting function-level imports (the ones that closed
    backbone <-> pretrain and methods/ladder -> quantize -> train -> methods)."""
    _, graph = _graph()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(reversed(exc.args[1]))}")


def test_no_private_helper_used_across_modules():
    """`mod._name` where `mod` is a ladder_clip module this file imported (e.g. `S._top` from side.py), and
    `from .mod import _name` (e.g. `from .synthetic import _draw`), wherever the import is."""
    bad = []
    for path in _sources():
        tree = ast.parse(open(path, encoding="utf-8").read())
        modules = {a.asname or a.name for n in ast.walk(tree)
                   if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("ladder_clip"))
                   for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules \
                    and n.attr.startswith("_") and not n.attr.startswith("__"):
                bad.append(f"{os.path.relpath(path, ROOT)}:{n.lineno} {n.value.id}.{n.attr}")
        for line, target, names in _imports(path):
            private = [a for a in names or [] if a.startswith("_") and not a.startswith("__") and a != "_alias"]
            bad += [f"{os.path.relpath(path, ROOT)}:{line} from {target} import {a}" for a in private]
    assert not bad, bad


def test_the_layout_check_sees_function_level_imports_and_private_names(tmp_path):
    """The checks above on a made-up file: an import inside a function is read, and so is a private name."""
    global PIPELINE
    pkg = tmp_path / "ladder_clip"
    (pkg / "base").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "base" / "__init__.py").write_text("")
    (pkg / "base" / "x.py").write_text("def f():\n    from ..engine.train import train\n"
                                       "    from ..data.synthetic import _draw\n")
    saved, PIPELINE = PIPELINE, str(pkg)
    try:
        found = list(_imports(str(pkg / "base" / "x.py")))
    finally:
        PIPELINE = saved
    assert [(t, n) for _, t, n in found] == [("ladder_clip.engine.train", ["train"]),
                                            ("ladder_clip.data.synthetic", ["_draw"])]
    assert _layer("ladder_clip.engine.train") > _layer("ladder_clip.base.x")


def test_cli_imports_only_the_standard_library_before_main():
    code = "import sys, ladder_clip.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
