"""benchmarks.report turns pytest-benchmark JSON into a Markdown report and PNG charts."""
import json
import os

import pytest

from benchmarks import report


def _bench(group, variant, median, **info):
    return {"group": group, "name": f"test[{variant}]", "stats": {"median": median},
            "extra_info": {"variant": variant, **info}}


def _file(tmp_path, benches, name="b.json"):
    data = {"machine_info": {"cuda_device": "NVIDIA H100 80GB HBM3", "cpu_model": "EPYC", "torch": "2.11.0",
                             "triton": "3.6.0", "python_version": "3.11", "cpu": {"count": 16},
                             "ladder_kernels_backends": ["cpp", "cuda", "torch", "triton"]},
            "datetime": "2026-11-22T10:00:00", "benchmarks": benches}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_report_tables_and_charts(tmp_path):
    case = "train step cuda vit_b16 C=1000 batch=32"
    figures = lambda t, mb: {"peak MB": mb, "resident MB": 600.0, "peak total MB": 600.0 + mb,  # noqa: E731
                             "saved MB": 1.0, "trainable": 10, "first step s": 0.1, "images/s": 32 / t,
                             "shapes": {"batch": 32}, "precision": "bf16"}
    train = [_bench(case, v, t, suite="train_step", **figures(t, mb))
             for v, t, mb in (("coop", 0.1, 1000.0), ("lst", 0.2, 400.0), ("ladder", 0.02, 100.0))]
    kern = [_bench("gated M=1 fwd", "lk", 0.001), _bench("gated M=1 fwd", "eager", 0.003),
            _bench("gated M=1 fwd", "compiled", 0.002)]
    out = tmp_path / "rep"
    path = report.write_report([_file(tmp_path, train), _file(tmp_path, kern, "k.json")], str(out))
    text = open(path, encoding="utf-8").read()
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11.0" in text and "triton 3.6.0" in text
    row = next(line for line in text.splitlines() if line.startswith("| **ladder**"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "100.0" and cells[2] == "10%"            # memory, and its share of CoOp's
    assert cells[6] == "20.0" and cells[7] == "5.00x" and cells[8] == "10.00x"   # ms, vs coop, vs lst
    krow = next(line for line in text.splitlines() if line.startswith("| gated M=1 fwd | lk"))
    assert "3.00x" in krow and "2.00x" in krow
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == ["kernels.png", "train_step_cuda_vit_b16_c_1000_batch_32.png"]
    for f in pngs:
        with open(out / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({f})" in text
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_report_rejects_a_file_that_is_not_benchmark_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a pytest-benchmark JSON"):
        report.write_report([str(bad)], str(tmp_path / "rep"))
    assert report.main([str(bad), "--out", str(tmp_path / "rep")]) == 2


def test_partial_report_of_a_run_cut_short(tmp_path):
    """gpu_check.sh rewrites the report after every step: with no JSON yet, or one a killed step left
    unreadable, it still writes one, naming what it left out; without --partial a bad file is an error."""
    gate = tmp_path / "gate.md"
    gate.write_text("# Static GPU gate\n\nAll pass.\n")
    out = tmp_path / "rep"
    assert report.main(["--partial", "--out", str(out), "--append", str(gate)]) == 0
    text = (out / "report.md").read_text()
    assert "(no results yet)" in text and "## Static GPU gate" in text
    bad = tmp_path / "cut.json"
    bad.write_text('{"benchmarks": [')
    good = _file(tmp_path, [_bench("vit fwd", "lk", 1e-4, **{"kernel ms": 0.01, "x floor": 2.0}),
                            _bench("vit fwd", "eager", 3e-4, **{"kernel ms": 0.05})])
    assert report.main(["--partial", good, str(bad), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert f"left out: {bad}" in text
    row = next(line for line in text.splitlines() if line.startswith("| vit fwd | lk |"))
    assert "| 3.00x |" in row and "| 5.00x |" in row  # wall and kernel time against eager's
    assert report.main([str(bad), "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        report.main(["--out", str(out)])  # no JSON and no --partial
