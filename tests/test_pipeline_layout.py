"""The pipeline's source layout (issue 14): one memory.py in the project, no private helper of one module
used from another, `ladder-clip` importing nothing heavy before main() runs."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "python", "ladder_clip")


def _sources():
    for folder, _, names in os.walk(PIPELINE):
        for name in names:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_one_memory_py():
    found = [os.path.relpath(os.path.join(d, f), ROOT) for top in ("python", "ladder_kernels")
             for d, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs if f == "memory.py"]
    assert len(found) <= 1 and not any(p.startswith("python") for p in found), found


def test_no_private_helper_used_across_modules():
    """`mod._name` where `mod` is a ladder_clip module this file imported (e.g. `S._top` from side.py)."""
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
    assert not bad, bad


def test_cli_imports_only_the_standard_library_before_main():
    code = "import sys, ladder_clip.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
