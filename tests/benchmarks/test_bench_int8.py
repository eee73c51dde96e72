"""The training-step benchmark's int8 variants and the report's total-memory columns."""
import json

from benchmarks import report
from benchmarks import train_step as T
from ladder_clip import quantize as Q


def test_int8_variants_build_the_ladder_on_an_int8_clip_and_step():
    for variant, method in (("ladder+int8", "ladder"), ("ladder+apt+int8", "ladder+apt")):
        setup = T.build(variant, "tiny", 4, "cpu", 2)
        assert setup.method.name == method and setup.method.cfg["frozen"] == "int8"
        assert float(setup.step()) > 0 and Q.is_int8(setup.method.backbone)
    plain = T.build("ladder", "tiny", 4, "cpu", 2)
    plain.step()
    assert plain.method.cfg["frozen"] == "fp32" and not Q.is_int8(plain.method.backbone)


def test_worker_reports_runtime_and_weights():
    out = T.measure_in_subprocess("ladder+int8", "tiny", 4, "cpu", 2)
    fp32 = T.build("ladder", "tiny", 4, "cpu", 2).method.backbone
    assert out["variant"] == "ladder+int8" and 0 < out["runtime_bytes"] < out["process_resident_bytes"]
    assert 0 < out["weights_bytes"] < 0.5 * Q.weight_bytes(fp32)
    assert out["counted_bytes"] > out["weights_bytes"]  # the side network, caches and optimizer state too


def _bench(variant, median, **info):
    return {"group": "train step cpu small C=100 batch=32", "name": f"test[{variant}]", "stats": {"median": median},
            "extra_info": {"variant": variant, "suite": "train_step", **info}}


def test_report_shows_the_models_total_and_the_process_apart(tmp_path):
    mem = lambda peak, resident, weights, process: {"peak MB": peak, "resident MB": resident,  # noqa: E731
                                                    "total MB": peak + resident, "weights MB": weights,
                                                    "counted MB": resident - 1.0, "process peak MB": process}
    benches = [_bench("coop", 1.0, **mem(300.0, 100.0, 90.0, 900.0)),
               _bench("ladder+int8", 0.4, **mem(80.0, 40.0, 30.0, 540.0)),
               _bench("lst", 0.8, peak=1.0)]  # a row without the memory figures still renders
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"machine_info": {}, "datetime": "2026-12-01T10:00:00", "benchmarks": benches}))
    text = open(report.write_report([str(path)], str(tmp_path / "rep")), encoding="utf-8").read()
    lines = text.splitlines()
    head = [c.strip() for c in next(l for l in lines if l.startswith("| method")).strip("|").split("|")]
    cells = [c.strip() for c in next(l for l in lines if l.startswith("| **ladder+int8**")).strip("|").split("|")]
    row = dict(zip(head, cells))
    # totals: coop 400, ladder+int8 120 (30 %); whole processes: 900 and 540 (60 %)
    assert row["total (MB)"] == "120.0" and row["total vs coop"] == "30%" and row["counted (MB)"] == "39.0"
    assert row["process peak (MB)"] == "540.0" and cells[-1] == "60%"
    assert next(l for l in lines if l.startswith("| lst")).rstrip(" |").endswith("| - | - | - | - | -")
    assert "warmed runtime" in text and "runtime included" in text
