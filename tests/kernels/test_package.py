"""The package as a user meets it: import cost, lk.backends(), and the backends this install must have."""
import os
import subprocess
import sys

import pytest

import ladder_kernels as lk


def test_import_touches_neither_cuda_nor_triton():
    code = ("import sys, torch, ladder_kernels as lk; "
            "print('triton' in sys.modules, torch.cuda.is_initialized())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_backends_report_every_backend_with_a_reason():
    status = lk.backends()
    assert set(status) == set(lk.BACKENDS) == {"triton", "cuda", "cpu", "torch"}
    assert status["torch"].available
    for name, s in status.items():
        assert isinstance(s.available, bool) and s.detail, name


def test_backends_expected():
    """CI sets LADDER_KERNELS_EXPECT_BACKENDS (e.g. "cpu,triton,torch"): a backend that failed to build
    or install fails here instead of turning its tests into silent skips."""
    expected = [b for b in os.environ.get("LADDER_KERNELS_EXPECT_BACKENDS", "").split(",") if b]
    if not expected:
        pytest.skip("LADDER_KERNELS_EXPECT_BACKENDS is not set")
    status = lk.backends()
    missing = {b: status[b].detail for b in expected if not status[b].available}
    assert not missing, f"expected backends are unavailable: {missing}"


def test_missing_extension_falls_back_to_torch_with_a_reason(tmp_path):
    """A build without a compiler leaves an importable package on the plain PyTorch path."""
    code = ("import sys; sys.modules['ladder_kernels._C'] = None\n"
            "import torch, ladder_kernels as lk\n"
            "s = lk.backends()['cpu']\n"
            "x = torch.randn(3, 5); w = torch.randn(2, 5); side = torch.randn(3, 2)\n"
            "out = lk.gated_fusion(side, x, w)\n"
            "ref = lk.reference.gated_fusion(side, x, w)\n"
            "print(s.available, torch.allclose(out, ref, atol=1e-6), 'did not load' in s.detail)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"], out.stdout + out.stderr



def test_renamed_backend_key_still_reads_with_a_deprecation_warning():
    """"cpp" was renamed "cpu" (both are C++; the name now says where it runs)."""
    with pytest.warns(DeprecationWarning, match="'cpp' is now called 'cpu'"):
        status = lk.backends()["cpp"]
    assert status == lk.backends()["cpu"]
    with pytest.raises(KeyError):  # an unknown name is still a plain missing key
        lk.backends()["cuda_please"]


def test_renamed_backend_still_runs_with_a_deprecation_warning():
    import torch

    if not lk.backends()["cpu"].available:  # CI lists cpu in LADDER_KERNELS_EXPECT_BACKENDS
        pytest.skip(lk.backends()["cpu"].detail)
    side, tap, weight = torch.randn(3, 2), torch.randn(3, 5), torch.randn(2, 5)
    with pytest.warns(DeprecationWarning, match="'cpp' is now called 'cpu'"):
        old = lk.gated_fusion(side, tap, weight, backend="cpp")
    assert torch.equal(old, lk.gated_fusion(side, tap, weight, backend="cpu"))


def test_backends_follow_their_interface():
    """Every module the table names exists and has the primitives of its op's interface, with the same
    parameter names (backends/interface.py); Triton's needs triton, which CI has."""
    import importlib
    import inspect

    from ladder_kernels.backends import TABLE
    from ladder_kernels.backends.interface import INTERFACES

    for op, row in TABLE.items():
        protocol = INTERFACES[op]
        wanted = {n: inspect.signature(f) for n, f in vars(protocol).items() if inspect.isfunction(f)}
        for backend in row:
            if backend == "triton" and importlib.util.find_spec("triton") is None:
                continue
            if backend in ("cpu", "cuda") and lk._ext.LOAD_ERROR is not None:
                continue
            mod = importlib.import_module(f"ladder_kernels.backends.{backend}.{op}")
            for name, sig in wanted.items():
                fn = getattr(mod, name)
                if inspect.isfunction(fn):  # the compiled ones are torch op overloads: schema-checked by opcheck
                    assert list(inspect.signature(fn).parameters) == list(sig.parameters)[1:], (backend, op, name)


def test_import_graph_has_no_cycles():
    """Modules of ladder_kernels import each other in one direction only (ops -> backends -> _common)."""
    import ast
    import pathlib

    root = pathlib.Path(lk.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        mod = ".".join(("ladder_kernels",) + path.relative_to(root).with_suffix("").parts)
        mod = mod.removesuffix(".__init__")
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                if node.module:  # `from . import x` imports x, not its (already importing) parent
                    deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ladder_kernels"):
                deps.add(node.module)
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
