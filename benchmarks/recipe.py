"""The whole few-shot recipe timed, and the tap cache's views measured, on the learning demo's set
(apps/demo.py: the tiny pretrained CLIP, the four UNSEEN classes on SHIFTED_BACKGROUND, 16 shots, 16 test
images a class), with CoOp's 16-shot recipe (recipes.py `coop`: 200 epochs, SGD, warm-up + cosine).

    python -m benchmarks.recipe --out DIR --seeds 1 2 3                 # DIR/recipe.{json,md,png}
    python -m benchmarks.recipe --study views --out DIR --seeds 1 2 3   # DIR/tap_cache_views.{json,md}

`recipe`: coop, ladder without the cache, ladder with `tap_cache=auto`, ladder with `frozen=int8` and the
cache. `views`: ladder with augmentation, uncached and with tap_cache = 1, 2, 4, 8 stored views.
Each run is `ladder-clip train` in this process (engine.train), timed from the call to its return (data
listing, model load, cache build, every epoch and its commit, the test); the runs go seed by seed, the
configurations' order rotated per seed, so a shared machine's load falls on all of them alike, and
os.getloadavg() is recorded around each run; one untimed 1-epoch run of each configuration goes first.
The JSON is rewritten after every run (a partial study keeps what finished). torch runs on --threads
threads (1 by default: on a loaded 2-core machine one thread is the fastest and the steadiest for every
method)."""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

RECIPE = (("coop", "coop", {}),
          ("ladder", "ladder", {"tap_cache": "off"}),
          ("ladder + cache", "ladder", {"tap_cache": "auto"}),
          ("ladder int8 + cache", "ladder", {"frozen": "int8", "tap_cache": "auto"}))
VIEWS = (("uncached", "ladder", {"tap_cache": "off"}),
         *((f"V={v}", "ladder", {"tap_cache": v}) for v in (1, 2, 4, 8)))


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _data(work: str) -> str:
    from ladder_clip.apps.demo import SHOTS
    from ladder_clip.data.synthetic import make_imagefolder
    from ladder_clip.model.pretrain import SHIFTED_BACKGROUND, UNSEEN
    data = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(data, "train")):  # the demo's own set, as `ladder-clip demo` makes it
        make_imagefolder(data, [n.replace(" ", "_") for n in UNSEEN], train_per_class=SHOTS, test_per_class=16,
                         background=SHIFTED_BACKGROUND)
    return data


def _run(data: str, work: str, name: str, method: str, options: dict, seed: int, epochs, shots: int) -> dict:
    from ladder_clip.engine.config import TrainConfig
    from ladder_clip.engine.train import train
    out = os.path.join(work, f"{name.replace(' ', '').replace('+', '_').replace('=', '')}-{shots}shot-seed{seed}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no cache of an earlier study reused
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    r = train(TrainConfig(model="tiny-pretrained", data=data, method=method, shots=shots, seed=seed, out=out,
                          quiet=True, epochs=epochs, method_options=dict(options)))
    wall = time.perf_counter() - t0
    per_epoch = r["epoch_seconds"]
    steps = r["train_images"] * r["epochs"] / r["images_per_s"] if r["images_per_s"] else None
    return {"name": name, "method": method, "options": options, "seed": seed, "epochs": r["epochs"],
            "accuracy": r["accuracy"], "wall_s": wall, "tap_cache_build_s": r["tap_cache_seconds"],
            "epoch_s_mean": statistics.fmean(per_epoch) if per_epoch else None,
            "epoch_s_median": statistics.median(per_epoch) if per_epoch else None,
            "train_steps_s": steps, "commit_s_mean": statistics.fmean(r["commit_seconds"]) if r["commit_seconds"]
            else None, "cache_views": _views(out),
            "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg())}


def _views(out: str):
    from ladder_clip.engine import tapcache
    try:
        with open(os.path.join(out, tapcache.FOLDER, "meta.json"), encoding="utf-8") as f:
            return json.load(f)["layout"]["views"]
    except (OSError, ValueError, KeyError):
        return None


def _summary(runs: list, names: list) -> list:
    rows = []
    for n in names:
        rs = [r for r in runs if r["name"] == n]
        if not rs:
            continue
        acc = [r["accuracy"] for r in rs]
        row = {"name": n, "runs": len(rs), "accuracy_mean": statistics.fmean(acc),
               "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0}
        for k in ("wall_s", "tap_cache_build_s", "epoch_s_mean", "commit_s_mean", "train_steps_s"):
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = statistics.fmean(vals) if vals else None
        rows.append(row)
    return rows


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _provenance(doc: dict, load: str) -> list:
    """Each report's command and machine lines (markdown line breaks at their ends)."""
    m = doc["machine"]
    return [f"Command: `{doc['command']}`  ", f"Machine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']} on "
            f"{m['threads']} thread(s); load average (1 min) {load}.  "]


def _md_recipe(doc: dict) -> str:
    rows, base = doc["summary"], {r["name"]: r for r in doc["summary"]}
    coop, lad = base.get("coop"), base.get("ladder")
    lines = [f"# The whole few-shot recipe on the learning demo's set ({doc['date']})", "",
             *_provenance(doc, f"{doc['load_min']:.1f}..{doc['load_max']:.1f} over the runs (a shared machine)"),
             f"Recipe: CoOp's {doc['shots']}-shot ({doc['epochs']} epochs, SGD lr 0.002, batch 32, 1 warm-up epoch, "
             f"cosine); tiny-pretrained CLIP, 4 unseen classes x {doc['shots']} shots, 64 test images; "
             f"seeds {doc['seeds']}.", "",
             "| run | accuracy (mean ± sd) | wall s | cache build s | s / epoch | s / commit | steps s | "
             "wall vs coop | steps vs coop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{coop['wall_s'] / r['wall_s']:.2f}x" if coop else "-"
        st = f"{coop['train_steps_s'] / r['train_steps_s']:.2f}x" if coop and r["train_steps_s"] else "-"
        lines.append(f"| {r['name']} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {r['wall_s']:.1f} | "
                     f"{r['tap_cache_build_s']:.2f} | {r['epoch_s_mean']:.3f} | {r['commit_s_mean']:.3f} | "
                     f"{r['train_steps_s']:.2f} | {vs} | {st} |")
    lines += ["", "wall s: the whole `train` call (listing, model load, cache build, every epoch with its commit, the "
              "test). s / epoch: each epoch's wall time (data, steps, the peak meter's reset), without its commit; "
              "s / commit: each epoch's commit (state.py: files written and fsynced); steps s: "
              "the optimizer steps alone (forward, backward, update), summed over the run.", ""]
    if coop and lad:
        for n in ("ladder + cache", "ladder int8 + cache"):
            r = base.get(n)
            if r:
                lines.append(f"- {n}: {coop['wall_s'] / r['wall_s']:.2f}x sooner than coop (target 10x), accuracy "
                             f"{100 * (r['accuracy_mean'] - lad['accuracy_mean']):+.2f} points vs the uncached ladder "
                             "(target within 1).")
    return "\n".join(lines) + "\n"


def _md_views(doc: dict) -> str:
    lines = [f"# Tap cache: stored views V against uncached training ({doc['date']})", "",
             *_provenance(doc, f"{doc['load_min']:.1f}..{doc['load_max']:.1f}"),
             f"ladder with augmentation, CoOp's {doc['shots']}-shot recipe ({doc['epochs']} epochs) on the learning "
             f"demo's set ({doc['shots']} of its 16 training images a class); "
             f"seeds {doc['seeds']}; cache dtype bf16 (tap_cache_dtype=auto with augmentation).", "",
             "| run | accuracy per seed | mean ± sd | wall s | s / epoch | s / commit |", "|---|---|---|---|---|---|"]
    for r in doc["summary"]:
        per = ", ".join(f"{x['accuracy']:.4f}" for x in doc["runs"] if x["name"] == r["name"])
        lines.append(f"| {r['name']} | {per} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
                     f"{r['wall_s']:.1f} | {r['epoch_s_mean']:.3f} | {r['commit_s_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def _md_projection(doc: dict) -> str:
    lines = [f"# The recipe projected from step times at {doc['size']} ({doc['date']})", "",
             *_provenance(doc, f"{doc['loadavg_before'][0]:.1f} before, {doc['loadavg_after'][0]:.1f} after"),
             f"Random-weight CLIP {doc['size']} (benchmarks/train_step.py), {doc['classes']} classes, batch "
             f"{doc['batch']}; projected onto CoOp's {doc['shots']}-shot recipe: {doc['shots']} x {doc['classes']} "
             f"images, {doc['epochs']} epochs = {doc['steps']} steps; the cache holds {doc['views']} views "
             "(its build: views x batches x one frozen forward). Data loading and epoch commits are left out.", "",
             "| setup | step s (median) | recipe s (projected) | vs coop |", "|---|---|---|---|"]
    for k, v in doc["step_s"].items():
        lines.append(f"| {k} | {v:.3f} | {doc['recipe_s'][k]:.0f} | {doc['vs_coop'][k]:.2f}x |")
    lines += ["", "Frozen image forward of one batch: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in doc["frozen_forward_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def _png(doc: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = doc["summary"]
    names = [r["name"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    build = [r["tap_cache_build_s"] for r in rows]
    rest = [r["wall_s"] - r["tap_cache_build_s"] for r in rows]
    a.barh(names, rest, label="training + test")
    a.barh(names, build, left=rest, label="cache build")
    a.set_xlabel("wall time of the whole recipe, s (mean over seeds)")
    a.invert_yaxis()
    a.legend(loc="lower right")
    b.barh(names, [100 * r["accuracy_mean"] for r in rows], xerr=[100 * r["accuracy_std"] for r in rows])
    b.set_xlabel("test accuracy, % (mean ± sd over seeds)")
    b.invert_yaxis()
    lo = min(100 * r["accuracy_mean"] - 100 * r["accuracy_std"] for r in rows)
    b.set_xlim(max(0, lo - 5), 100)
    fig.suptitle(f"CoOp's {doc['shots']}-shot recipe ({doc['epochs']} epochs) on the demo set, "
                 f"{doc['machine']['cpus']} CPUs, seeds {doc['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _step_seconds(setups: dict, repeats: int) -> dict:
    """Each setup's median step time, the steps alternated across setups (one warm-up step each first)."""
    times = {k: [] for k in setups}
    for r in range(repeats + 1):
        for k, step in setups.items():
            t0 = time.perf_counter()
            step()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def projection(size: str, classes: int, shots: int, batch: int, views: int, repeats: int) -> dict:
    """One training step of coop, ladder, and the ladder on the tap cache's rows (side network only; fp32
    and int8 frozen), and one frozen image forward of a batch, at `size` (benchmarks/train_step.py's
    random-weight CLIP); projected onto CoOp's recipe for `shots` x `classes` images."""
    from torch.nn import functional as F

    from ladder_clip.engine.recipes import coop_epochs

    from .train_step import build
    setups, frozen_s = {}, {}
    for variant in ("coop", "ladder", "ladder+int8"):
        s = build(variant, size, classes, "cpu", batch)
        setups[variant] = s.step
        if variant.startswith("ladder"):
            m = s.method
            with torch.no_grad():
                m.frozen_image(s.x[:1])  # int8: quantised on first use, outside the timing
                t0 = time.perf_counter()
                cached = m.frozen_image(s.x)
                frozen_s[variant] = time.perf_counter() - t0

            def side_step(s=s, cached=cached):
                loss = F.cross_entropy(s.method(cached).float(), s.y)
                s.opt.zero_grad(set_to_none=True)
                loss.backward()
                s.opt.step()
            setups[variant + " cached"] = side_step
    step = _step_seconds(setups, repeats)
    images, epochs = shots * classes, coop_epochs(shots)
    steps = epochs * -(-images // batch)
    builds = {"ladder cached": views * -(-images // batch) * frozen_s["ladder"],
              "ladder+int8 cached": views * -(-images // batch) * frozen_s["ladder+int8"]}
    total = {k: steps * v + builds.get(k, 0.0) for k, v in step.items()}
    return {"size": size, "classes": classes, "shots": shots, "batch": batch, "views": views, "epochs": epochs,
            "steps": steps, "step_s": step, "frozen_forward_s": frozen_s, "cache_build_s": builds,
            "recipe_s": total, "vs_coop": {k: total["coop"] / v for k, v in total.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON, Markdown (and the recipe's PNG) files")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per seed and configuration")
    p.add_argument("--study", choices=("recipe", "views", "projection"), default="recipe",
                   help="recipe: coop / ladder / ladder + cache / int8 + cache; views: the cache's V = 1, 2, 4, 8; "
                   "projection: step times at --size, projected onto the recipe")
    p.add_argument("--shots", type=int, default=16, help="training images a class (the demo's set has 16)")
    p.add_argument("--epochs", type=int, default=None, help="None: the recipe's (CoOp: 200 for 16 shots)")
    p.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    p.add_argument("--work", default=None, help="folder for the data and the runs (None: "
                   "ladder-clip-recipe-STUDY in the temp folder)")
    p.add_argument("--size", default="vit_b16", help="projection: benchmarks/train_step.py's model size")
    p.add_argument("--classes", type=int, default=100, help="projection: classes")
    p.add_argument("--batch", type=int, default=32, help="projection: the recipe's batch (CoOp: 32)")
    p.add_argument("--repeats", type=int, default=2, help="projection: timed steps per setup (after a warm-up)")
    a = p.parse_args(argv)
    from ladder_clip.engine.recipes import coop_epochs
    torch.set_num_threads(a.threads)
    if a.study == "projection":
        from ladder_clip.engine.tapcache import AUTO_VIEWS
        load0 = os.getloadavg()
        doc = projection(a.size, a.classes, a.shots, a.batch, AUTO_VIEWS, a.repeats)
        doc.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command="python -m benchmarks.recipe " + " ".join(sys.argv[1:] if argv is None else argv),
                   machine=_machine(), loadavg_before=list(load0), loadavg_after=list(os.getloadavg()))
        os.makedirs(a.out, exist_ok=True)
        stem = f"recipe_projection_{a.size}_c{a.classes}"
        _write(os.path.join(a.out, f"{stem}.json"), json.dumps(doc, indent=1))
        _write(os.path.join(a.out, f"{stem}.md"), _md_projection(doc))
        print(_md_projection(doc))
        return 0
    os.makedirs(a.out, exist_ok=True)
    work = a.work or os.path.join(tempfile.gettempdir(), f"ladder-clip-recipe-{a.study}")
    os.makedirs(work, exist_ok=True)
    data = _data(work)
    configs = RECIPE if a.study == "recipe" else VIEWS
    stem = ("recipe" if a.study == "recipe" else "tap_cache_views") + ("" if a.shots == 16 else f"_{a.shots}shot")
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -m benchmarks.recipe " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": _machine(), "seeds": a.seeds, "shots": a.shots,
           "epochs": a.epochs or coop_epochs(a.shots), "runs": []}
    for name, method, options in configs:  # untimed: the first run of a method in a process pays its imports
        _run(data, os.path.join(work, "warm-up"), name, method, options, a.seeds[0], 1, a.shots)
    for k, seed in enumerate(a.seeds):
        order = configs[k % len(configs):] + configs[:k % len(configs)]  # rotated: no config always first
        for name, method, options in order:
            r = _run(data, work, name, method, options, seed, a.epochs, a.shots)
            print(f"{name} seed {seed}: accuracy {r['accuracy']:.4f}, wall {r['wall_s']:.1f} s, build "
                  f"{r['tap_cache_build_s']:.2f} s, {r['epoch_s_mean']:.3f} s/epoch, load {r['loadavg_before'][0]:.1f}",
                  flush=True)
            doc["runs"].append(r)
            doc["summary"] = _summary(doc["runs"], [c[0] for c in configs])
            loads = [x for r in doc["runs"] for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
            doc["load_min"], doc["load_max"] = min(loads), max(loads)
            _write(os.path.join(a.out, f"{stem}.json"), json.dumps(doc, indent=1))
            _write(os.path.join(a.out, f"{stem}.md"), (_md_recipe if a.study == "recipe" else _md_views)(doc))
    if a.study == "recipe":
        _png(doc, os.path.join(a.out, f"{stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
