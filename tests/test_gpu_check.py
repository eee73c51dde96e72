"""benchmarks/gpu_check.sh, the one GPU check: in CI (no GPU) its steps' commands must exist (--dry-run;
a full smoke run takes minutes on CI's 2 cores), and its CUDA toolkit search must see through an nvcc
wrapper that lives outside the toolkit (the failure a bare GPU machine showed: torch looked for the CUDA
headers next to the wrapper)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def test_dry_run_finds_every_step(tmp_path):
    res = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for step in ("kernel benchmarks", "training-step benchmarks", "report", "static gate table", "traffic model",
                 "--benchmark-json=", "-k not compile"):
        assert step in res.stdout, step
    if not torch.cuda.is_available():
        assert "NO CUDA GPU HERE" in res.stdout and "SMOKE SIZE" in res.stdout
    assert "MISSING" not in res.stdout


def test_bad_arguments():
    res = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["bash", SCRIPT, "x", "--fast"], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=60)
    assert res.returncode == 2 and "--fast" in res.stderr


def _fake_toolkit(root):
    os.makedirs(os.path.join(root, "include"))
    os.makedirs(os.path.join(root, "bin"))
    open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    nvcc = os.path.join(root, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    os.chmod(nvcc, 0o755)


def test_finds_the_toolkit_behind_an_nvcc_wrapper(tmp_path):
    """nvcc on the PATH is a wrapper in a folder of its own (no include/ beside it); only `nvcc --dryrun`
    names the real toolkit (its TOP line). The search must return that toolkit."""
    toolkit = tmp_path / "opt" / "cuda-13.0"
    _fake_toolkit(str(toolkit))
    wrap = tmp_path / "wrappers" / "bin"
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm'\necho '#$ TOP={toolkit}/bin/..'\n")
    os.chmod(wrap / "nvcc", 0o755)
    env = _env(PATH=f"{wrap}:{os.environ['PATH']}")
    res = subprocess.run(["bash", SCRIPT, "--find-cuda"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == os.path.realpath(toolkit)
    # CUDA_HOME, when it is a toolkit, wins; when it is not (a stale path), the search goes on.
    other = tmp_path / "other"
    _fake_toolkit(str(other))
    res = subprocess.run(["bash", SCRIPT, "--find-cuda"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(env, CUDA_HOME=str(other)))
    assert res.stdout.strip() == os.path.realpath(other)
    res = subprocess.run(["bash", SCRIPT, "--find-cuda"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(env, CUDA_HOME=str(tmp_path / "gone")))
    assert res.stdout.strip() == os.path.realpath(toolkit)
