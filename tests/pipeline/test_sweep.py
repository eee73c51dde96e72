"""`ladder-clip sweep` and `ladder-clip summarize`: a 2 datasets x (zeroshot, coop) x 2 seeds sweep of the
tiny CLIP on generated image folders (one train subprocess a run), skipped on restart; a sweep killed by
SIGTERM stops its child and the next one resumes the run, while a failing run is reported and the sweep
goes on; the summary's numbers against the metrics.json files, recomputed here; bad input."""
import contextlib
import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import helpers
from ladder_clip.cli import main

SEEDS = (1, 2)


def _quiet_main(argv):
    """main() with its stdout captured (module fixtures have no capsys): (exit status, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def _sweep_args(datasets, out, *extra, seeds=SEEDS):
    return ["sweep", "--model", "tiny", "--datasets", *datasets, "--methods", "zeroshot", "coop", "--shots", "1",
            "--seeds", *map(str, seeds), "--epochs", "1", "--opt", "coop:n_ctx=4", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return [helpers.image_folder(root / "shapes", train_per_class=1, test_per_class=2),
            helpers.image_folder(root / "colours", classes=("red_circle", "green_square", "blue_cross"),
                                 train_per_class=1, test_per_class=2, seed=11)]


@pytest.fixture(scope="module")
def swept(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    code, text = _quiet_main(_sweep_args(datasets, out, "--jobs", "2"))  # two at a time (the kill test: one)
    assert code == 0, text
    return out, text


def _runs(out):
    """{folder under out: metrics.json} of every run, read here independently of summarize."""
    found = {}
    for folder, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if d != "state"]
        if "metrics.json" in names:
            found[os.path.relpath(folder, out)] = json.loads(open(os.path.join(folder, "metrics.json")).read())
    return found


def test_one_run_folder_per_run_and_restart_skips_them(swept, datasets):
    out, text = swept
    expected = {f"{d}/zeroshot" for d in ("shapes", "colours")} | \
        {f"{d}/coop/1shot/seed{s}" for d in ("shapes", "colours") for s in SEEDS}
    runs = _runs(out)
    assert set(runs) == expected, runs.keys()
    for name, m in runs.items():
        assert m["method"] == name.split("/")[1] and m["test_images"] == (4 if name.startswith("shapes") else 6)
        if m["method"] == "coop":
            assert m["epochs"] == 1 and m["seed"] == int(name[-1]) and m["shots"] == 1 and m["config"]["n_ctx"] == 4
        assert (out / name / "train.log").is_file() and (out / name / "sweep-run.json").is_file()
    assert text.count("sweep: start ") == 6 and "6 done, 0 failed, 0 skipped, 0 left" in text, text
    logs = {n: (out / n / "train.log").read_text() for n in expected}
    code, again = _quiet_main(_sweep_args(datasets, out))
    assert code == 0 and again.count("sweep: skip ") == 6 and "sweep: start" not in again, again
    assert {n: (out / n / "train.log").read_text() for n in expected} == logs  # no child started


def test_dry_run_prints_the_plan_and_writes_nothing(datasets, tmp_path):
    code, text = _quiet_main(_sweep_args(datasets, tmp_path / "plan", "--dry-run", seeds=(1, 2, 3)))
    assert code == 0 and "8 runs, 8 to run" in text and text.count(" -m ladder_clip train ") == 8, text
    assert "--seed 3" in text and "--opt n_ctx=4" in text and not (tmp_path / "plan").exists()
    args = _sweep_args(datasets, tmp_path / "plan", "--dry-run", "--base-to-new", seeds=(1,))
    args.remove("--shots"), args.remove("1")  # base-to-new's default: CoCoOp's 16 shots
    code, text = _quiet_main(args)
    b2n = os.path.join(str(tmp_path / "plan"), "base2new", "colours", "coop", "16shot", "seed1")
    assert code == 0 and f"{b2n}: trains" in text and text.count("--base-to-new") == 4, text
    # CoOp's datasets by name (their layouts are tests/pipeline/test_datasets_coop.py's): under --data ROOT,
    # or NAME=DIR; the run folders take CoOp's names
    (tmp_path / "DATA" / "dtd").mkdir(parents=True)
    (tmp_path / "DATA" / "dtd" / "split_zhou_DescribableTextures.json").write_text("{}")
    code, text = _quiet_main(["sweep", "--model", "tiny", "--data", str(tmp_path / "DATA"), "--datasets", "textures",
                              "--methods", "coop", "--shots", "4", "--seeds", "1", "--out", str(tmp_path / "p2"),
                              "--dry-run"])
    assert code == 0 and f"--dataset dtd --data {tmp_path / 'DATA'}" in text, text
    assert f"{tmp_path / 'p2' / 'dtd' / 'coop' / '4shot' / 'seed1'}: trains" in text


def test_summarize_matches_the_metrics_files(swept, capsys):
    out, _ = swept
    assert main(["summarize", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "summary.csv", encoding="utf-8")))
    runs = _runs(out)
    by_group = {}
    for name, m in runs.items():
        shots = 0 if m["method"] == "zeroshot" else m["shots"]
        by_group.setdefault((name.split("/")[0], m["method"], shots), []).append(m)
    table = {(r["dataset"], r["method"], int(r["shots"])): r for r in rows}
    assert set(table) == set(by_group) | {("average", "zeroshot", 0), ("average", "coop", 1)}
    for key, ms in by_group.items():
        acc = [100 * m["accuracy"] for m in ms]
        row = table[key]
        assert float(row["accuracy_pct"]) == pytest.approx(statistics.mean(acc), abs=1e-4)
        assert float(row["accuracy_std_pct"]) == pytest.approx(statistics.pstdev(acc), abs=1e-4)
        assert row["seeds"] == ",".join(str(m["seed"]) for m in sorted(ms, key=lambda m: m["seed"]))
        if key[1] == "coop":
            peak = statistics.mean(m["peak_memory_bytes"] for m in ms) / 2 ** 20
            assert float(row["peak_memory_mib"]) == pytest.approx(peak, abs=1e-4)
            speed = statistics.mean(m["images_per_s"] for m in ms)
            assert float(row["images_per_s"]) == pytest.approx(speed, rel=1e-4, abs=1e-4)
            assert int(row["trainable_parameters"]) == ms[0]["trainable_parameters"] and row["epochs"] == "1"
        cell = f"{statistics.mean(acc):.2f}" + ("" if key[1] == "zeroshot" else f" ± {statistics.pstdev(acc):.2f}")
        row_md = f"| {key[0]} | zeroshot | {cell} |  |" if key[1] == "zeroshot" else f"| {key[0]} | coop |  | {cell} |"
        assert row_md in printed, (row_md, printed)
    for method, shots in (("zeroshot", 0), ("coop", 1)):
        means = [statistics.mean(100 * m["accuracy"] for m in ms) for k, ms in by_group.items()
                 if k[1:] == (method, shots)]
        assert float(table[("average", method, shots)]["accuracy_pct"]) == pytest.approx(statistics.mean(means),
                                                                                            abs=1e-4)
    assert (out / "summary.md").read_text(encoding="utf-8") in printed
    assert (out / "accuracy_vs_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def _metrics(folder, method, seed, acc, base=None, new=None, epochs=2, shots=4, **more):
    folder.mkdir(parents=True)
    m = {"method": method, "model": "tiny", "accuracy": acc, "test_images": 10, "shots": shots,
         "epochs": epochs, "seed": seed, "recipe": {"name": "coop", "epochs": epochs}, "augment": True,
         "precision": "fp32",
         "peak_memory_bytes": 2 ** 20 * seed, "peak_memory_kind": "peak RSS (VmHWM)", "images_per_s": 10.0 * seed,
         "trainable_parameters": 512, "config": {}, "classnames": ["a", "b"], **more}
    if base is not None:
        m.update(base_accuracy=base, new_accuracy=new, harmonic_mean=2 * base * new / (base + new))
    (folder / "metrics.json").write_text(json.dumps(m))


def test_summarize_base_to_new_mixed_settings_and_broken_runs(tmp_path, capsys, monkeypatch):
    """Any folder tree: HM is that of the seed-averaged base and new (not the mean of the runs' HMs), the
    average's HM that of the averaged base and new; mixed epochs flagged; damaged runs listed, not fatal;
    without matplotlib one line and the tables."""
    b2n = {"pets": [(0.9, 0.3), (0.7, 0.5)], "cars": [(0.6, 0.6), (0.8, 0.2)]}
    for ds, pairs in b2n.items():
        for seed, (base, new) in enumerate(pairs, 1):
            _metrics(tmp_path / "base2new" / ds / f"seed{seed}", "ladder", seed, base, base, new, shots=16)
    _metrics(tmp_path / "pets" / "coop" / "seed1", "coop", 1, 0.5, epochs=2)
    _metrics(tmp_path / "pets" / "coop" / "seed2", "coop", 2, 0.7, epochs=5)
    (tmp_path / "pets" / "coop" / "seed3").mkdir()
    (tmp_path / "pets" / "coop" / "seed3" / "metrics.json").write_text('{"method": "coop", "accura')
    (tmp_path / "pets" / "ladder" / "seed1" / "state").mkdir(parents=True)
    # runs of this version's train record --dataset and the data folder: named by them, wherever they are
    _metrics(tmp_path / "hand" / "a", "coop", 1, 0.25, data="/x/flowers")
    _metrics(tmp_path / "hand" / "b", "coop", 2, 0.75, data="/x/flowers")
    _metrics(tmp_path / "hand" / "c", "coop", 1, 0.5, data="/y/flowers")  # another folder of that name
    _metrics(tmp_path / "hand" / "d", "coop", 1, 0.5, data="/z/oxford_pets", dataset="oxford_pets")
    # a linear probe's C is searched per run (metrics' config): a sweep's runs compare what they were given
    for seed, c in ((1, 0.5), (2, 2.0)):
        folder = tmp_path / "dtd" / "linear-probe" / f"seed{seed}"
        _metrics(folder, "linear-probe", seed, 0.5, config={"C": c})
        (folder / "sweep-run.json").write_text(json.dumps({"dataset": "dtd", "train": [
            "--method", "linear-probe", "--seed", str(seed), "--opt", "C=auto"]}))
    for name in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["summarize", str(tmp_path), "--out", str(tmp_path / "tables")]) == 0
    printed = capsys.readouterr().out
    rows = {(r["protocol"], r["dataset"], r["method"]): r
            for r in csv.DictReader(open(tmp_path / "tables" / "summary.csv", encoding="utf-8"))}

    def hm(b, n):
        return 2 * b * n / (b + n)

    means = {}
    for ds, pairs in b2n.items():
        base, new = statistics.mean(100 * b for b, _ in pairs), statistics.mean(100 * n for _, n in pairs)
        means[ds] = base, new
        row = rows[("base-to-new", ds, "ladder")]
        assert float(row["base_pct"]) == pytest.approx(base) and float(row["new_pct"]) == pytest.approx(new)
        assert float(row["base_std_pct"]) == pytest.approx(statistics.pstdev(100 * b for b, _ in pairs))
        assert float(row["harmonic_mean_pct"]) == pytest.approx(hm(base, new), abs=1e-4)
        assert float(row["harmonic_mean_pct"]) != pytest.approx(statistics.mean(100 * hm(b, n) for b, n in pairs))
    base, new = statistics.mean(b for b, _ in means.values()), statistics.mean(n for _, n in means.values())
    avg = rows[("base-to-new", "average", "ladder")]
    assert float(avg["harmonic_mean_pct"]) == pytest.approx(hm(base, new), abs=1e-4)
    assert f"| {hm(base, new):.2f} |" in printed
    coop = rows[("few-shot", "pets", "coop")]  # the dataset: the path less the layout's parts
    assert coop["seeds"] == "1,2" and "mixed epochs: 2 vs 5" in coop["notes"] and "mixed epochs: 2 vs 5" in printed
    assert "coop/seed3: metrics.json unreadable: not JSON" in printed and "ladder/seed1: no metrics.json" in printed
    assert rows[("few-shot", "dtd", "linear-probe")]["seeds"] == "1,2"
    assert rows[("few-shot", "dtd", "linear-probe")]["notes"] == ""
    assert rows[("few-shot", "/x/flowers", "coop")]["seeds"] == "1,2"
    assert float(rows[("few-shot", "/x/flowers", "coop")]["accuracy_pct"]) == pytest.approx(50.0)
    assert rows[("few-shot", "/y/flowers", "coop")]["seeds"] == "1" and ("few-shot", "oxford_pets", "coop") in rows
    assert "matplotlib is not installed" in printed and not (tmp_path / "tables" / "accuracy_vs_shots.png").exists()
    assert (tmp_path / "tables" / "summary.md").is_file()


def _children(marker):
    """Processes whose command line holds `marker` (the run folders' path)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and "train" in cmd:
            found.append(pid)
    return found


def test_killed_sweep_stops_its_child_and_resumes_it_failed_runs_reported(datasets, tmp_path, capsys):
    out = tmp_path / "killed-sweep"
    run = out / "shapes" / "coop" / "1shot" / "seed1"
    argv = _sweep_args(datasets[:1], out, seeds=(1,))
    argv[argv.index("zeroshot")] = "coop"  # coop alone (twice: the sweep keeps one)
    argv[argv.index("--epochs") + 1] = "1000"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "ladder_clip", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (run / "state").is_dir() or not [n for n in os.listdir(run / "state") if n.startswith("epoch-")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143 and "stopping 1 running run" in stdout, (stdout, stderr)
    assert not _children(str(out))  # the sweep waited for its child
    epoch = max(int(n.split("-")[1]) for n in os.listdir(run / "state") if n.startswith("epoch-"))
    assert not (run / "metrics.json").exists()

    # a run that fails (no readable training image) is reported, its log kept, and the sweep goes on to
    # resume the killed run
    broken = helpers.image_folder(tmp_path / "broken")
    for p in (tmp_path / "broken" / "train").rglob("*.png"):
        p.write_bytes(b"not an image")
    argv = _sweep_args([broken, datasets[0]], out, seeds=(1,))
    argv[argv.index("zeroshot")] = "coop"
    argv[argv.index("--epochs") + 1] = str(epoch + 1)  # resume may lengthen a run
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "FAILED broken/coop/1shot/seed1 (exit 2)" in printed and "ladder-clip: error:" in printed
    assert printed.index("FAILED broken") < printed.index("start shapes/coop/1shot/seed1 (--resume)"), printed
    assert "1 trained, 0 skipped, 1 failed" in printed
    assert "error:" in (out / "broken" / "coop" / "1shot" / "seed1" / "train.log").read_text()
    last = (run / "train.log").read_text().split("=== ")[-1]
    assert last.splitlines()[0].endswith("--resume")
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == epoch + 1 and len(m["loss_curve"]) == epoch + 1


def test_bad_input_is_one_error_line(tmp_path, datasets, capsys, monkeypatch):
    helpers.one_error(capsys, main(["summarize", str(tmp_path / "nowhere")]), "RUNS", "no such folder")
    (tmp_path / "empty").mkdir()
    helpers.one_error(capsys, main(["summarize", str(tmp_path / "empty")]), "no metrics.json found")
    base = ["sweep", "--model", "tiny", "--out", str(tmp_path / "o"), "--datasets", datasets[0]]
    helpers.one_error(capsys, main(base + ["--methods", "coop", "nosuch"]), "unknown method 'nosuch'")
    helpers.one_error(capsys, main(base + [str(tmp_path / "gone"), "--methods", "coop"]), "gone", "ImageFolder")
    helpers.one_error(capsys, main(base + [datasets[0], "--methods", "coop"]), "two datasets named")
    helpers.one_error(capsys, main(base + [f"nosuch={tmp_path}", "--methods", "coop"]), "'nosuch': unknown dataset")
    helpers.one_error(capsys, main(base + [f"dtd={tmp_path}", "--methods", "coop"]), "split_zhou_DescribableTextures")
    named = ["sweep", "--model", "tiny", "--out", str(tmp_path / "o"), "--data", str(tmp_path), "--methods", "coop"]
    helpers.one_error(capsys, main(named + ["--datasets", "imagenet-a"]), "test-only")
    helpers.one_error(capsys, main(base + ["--methods", "coop", "--opt", "coop:nosuch=1"]), "coop", "nosuch")
    helpers.one_error(capsys, main(base + ["--methods", "coop", "--opt", "rlp:rank=1"]), "not in --methods")
    helpers.one_error(capsys, main(base + ["--methods", "coop", "--shots", "-1"]), "--shots")
    helpers.one_error(capsys, main(base + ["--methods", "coop", "--jobs", "0"]), "--jobs")
    helpers.one_error(capsys, main(base + ["--methods", "coop", "--gpus", "2"]), "--gpus", "--device cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    helpers.one_error(capsys, main(base + ["--methods", "coop", "--device", "cuda"]), "no GPU is visible")
    assert not (tmp_path / "o").exists()


def test_help_shows_the_defaults(capsys):
    assert main(["sweep", "--help"]) == 0
    text = capsys.readouterr().out
    assert "default: 1 2 4 8 16" in text and "default: 1 2 3" in text and "default: cpu" in text
    assert main(["summarize", "--help"]) == 0 and "default: RUNS" in capsys.readouterr().out


def test_one_run_per_visible_gpu(datasets, tmp_path, monkeypatch, capsys):
    """--device cuda: as many runs at a time as visible GPUs, each child seeing one (CUDA_VISIBLE_DEVICES), the
    children stood in for here (this machine may have no GPU): each writes its metrics.json and exits 0."""
    from ladder_clip.apps import sweep

    live, seen = set(), []

    class FakeChild:
        def __init__(self, argv, env, **kw):
            out = argv[argv.index("--out") + 1]
            value = {k: argv[argv.index(k) + 1] for k in ("--method", "--shots", "--seed")}
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump({"method": value["--method"], "shots": int(value["--shots"]),
                           "seed": int(value["--seed"]), "accuracy": 0.5}, f)
            self.polls, self.returncode = 0, None
            live.add(self)
            seen.append((env["CUDA_VISIBLE_DEVICES"], argv[argv.index("--device") + 1], len(live)))

        def poll(self):
            self.polls += 1
            if self.polls > 2:
                live.discard(self)
                self.returncode = 0
            return self.returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", FakeChild)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    argv = _sweep_args(datasets, tmp_path / "gpus", "--device", "cuda")
    argv[argv.index("zeroshot")] = "coop"
    assert main(argv) == 0
    assert "4 runs on 2 GPUs (3, 5)" in capsys.readouterr().out
    assert sorted(g for g, _, _ in seen) == ["3", "3", "5", "5"] and {d for _, d, _ in seen} == {"cuda"}
    assert max(n for _, _, n in seen) == 2
