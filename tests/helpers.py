"""What the test groups share (imported as `helpers`: tests/ is on sys.path through its conftest): which
backend can run an op here, torch on one thread, and the pipeline tests' generated image folders."""
import contextlib

import pytest
import torch


def backend_or_skip(op: str, backend: str, device: str) -> str:
    """`backend` if it can run `op` on `device` here; a skip naming the reason otherwise. CI lists the
    backends it must have in LADDER_KERNELS_EXPECT_BACKENDS and test_backends_expected fails if one is
    missing, so these skips cannot hide a broken build."""
    from ladder_kernels import _dispatch

    reason = _dispatch.why_not(op, backend, torch.device(device).type)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op} on {device}: {reason}")
    return backend


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block: the C++ kernels' bits must not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def image_folder(root, classes=("red_circle", "blue_square"), train_per_class=2, test_per_class=1, size=36,
                 seed=7) -> str:
    """train/<class>/*.png and test/<class>/*.png of generated shapes under `root`; returns it as a str.
    The defaults are the folder a pipeline test module trains on unless it sets DATA (tests/pipeline/conftest.py)."""
    from ladder_clip.synthetic import make_imagefolder

    make_imagefolder(str(root), list(classes), train_per_class=train_per_class, test_per_class=test_per_class,
                     size=size, seed=seed)
    return str(root)


def one_error(capsys, code, *needles) -> str:
    """The CLI exited with status 2 and printed exactly one `ladder-clip: error:` line holding `needles`;
    returns stderr."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ladder-clip: error:")]
    assert code == 2 and len(errors) == 1, (code, err)
    assert all(n in errors[0] for n in needles), (needles, errors[0])
    return err
