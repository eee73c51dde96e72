"""Turn pytest-benchmark JSON files of this suite into a Markdown report and PNG bar charts.

    python -m benchmarks.report bench-results/train.json [bench-results/kernels.json ...] --out DIR

Writes DIR/report.md (the machine, the library versions, every training-step case as a table of memory,
time, images/s and trainable parameters with ratios against CoOp and the plain-PyTorch LST peer, and
every kernel case with its ratios against the eager reference and torch.compile), and one chart per
training-step case (DIR/train_step_<case>.png: memory and time per method) plus DIR/kernels.png.
Every file is written to a temporary name first and renamed, so a reader never sees half a report.
"""
import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict

TRAIN_ORDER = ["coop", "coop+compile", "vpt", "maple", "lst", "lst+compile", "rlp", "apt", "ladder", "ladder+apt",
               "ladder+int8", "ladder+apt+int8"]
OURS = {"rlp", "apt", "ladder", "ladder+apt", "ladder+int8", "ladder+apt+int8", "ladder-side", "ladder+int8-side"}


def load(paths, skipped=None):
    """[(machine_info, datetime, benchmark)] from every file; a file that is not pytest-benchmark JSON
    raises ValueError naming it, or, when `skipped` is a list, is named there and left out (a partial
    report of a run that was cut short)."""
    rows = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            benches = data["benchmarks"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            message = f"{path}: not a pytest-benchmark JSON file ({type(exc).__name__}: {exc})"
            if skipped is None:
                raise ValueError(message) from None
            skipped.append(message)
            continue
        for b in benches:
            rows.append((data.get("machine_info", {}), data.get("datetime", "?"), b))
    return rows


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def train_cases(rows):
    cases = defaultdict(dict)
    for _, _, b in rows:
        info = b.get("extra_info", {})
        if info.get("suite") == "train_step" and b.get("stats"):
            cases[b["group"]][info["variant"]] = (b["stats"]["median"], info)
    return cases


def kernel_cases(rows):
    cases = defaultdict(dict)
    for _, _, b in rows:
        info = b.get("extra_info", {})
        if info.get("suite") != "train_step" and b.get("stats") and "variant" in info:
            cases[b["group"]][info["variant"]] = (b["stats"]["median"], info)
    return cases


def _total(info):
    """The model's total (MB): resident + peak above it (train_step.py's definition); files written before
    it was recorded have none."""
    return info.get("total MB")


def _process(info):
    """The whole process's (CPU) or all allocations' (CUDA) peak (MB), runtime included."""
    return info.get("process peak MB", info.get("peak total MB"))


def _share(x, ref):
    return f"{x / ref:.0%}" if x is not None and ref else "-"


def train_table(variants) -> list:
    order = [v for v in TRAIN_ORDER if v in variants] + sorted(set(variants) - set(TRAIN_ORDER))
    coop, lst = variants.get("coop"), variants.get("lst")
    heads = ["method", "peak above resident (MB)", "vs coop", "resident (MB)", "total (MB)",
             "saved for backward (MB)", "step (ms)", "vs coop", "vs lst", "images/s", "trainable", "text tokens",
             "first step (s)", "compile warm-up (s)", "total vs coop", "weights (MB)", "counted (MB)",
             "process peak (MB)", "vs coop"]
    out = ["| " + " | ".join(heads) + " |", "| --- |" + " ---: |" * (len(heads) - 1)]
    for v in order:
        t, info = variants[v]
        peak = info.get("peak MB")
        mem_vs = f"{peak / coop[1]['peak MB']:.0%}" if coop and peak and coop[1].get("peak MB") else "-"
        tokens = (info.get("shapes") or {}).get("text tokens (longest class)")
        cells = [f"**{v}**" if v in OURS else v, _fmt(peak), mem_vs, _fmt(info.get("resident MB")),
                 _fmt(_total(info)), _fmt(info.get("saved MB")), f"{t * 1e3:,.1f}",
                 f"{coop[0] / t:.2f}x" if coop else "-", f"{lst[0] / t:.2f}x" if lst else "-",
                 _fmt(info.get("images/s")), _fmt(info.get("trainable")), _fmt(tokens),
                 _fmt(info.get("first step s"), 2), _fmt(info.get("compile warm-up s"), 2)]
        # The total (the model's resident + peak), and apart from it the whole process, which a
        # device must also hold: on CPU it includes the Python/torch runtime every method shares.
        total, coop_total = _total(info), _total(coop[1]) if coop else None
        proc, coop_proc = _process(info), _process(coop[1]) if coop else None
        cells += [_share(total, coop_total), _fmt(info.get("weights MB")), _fmt(info.get("counted MB")),
                  _fmt(proc), _share(proc, coop_proc)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def kernel_table(cases) -> list:
    """One row per case and variant: the call's wall time (pytest-benchmark's median) beside, on CUDA, the
    kernels' own time and launch count (profiler) and both against the traffic model's floor."""
    out = ["| case | variant | wall (ms) | kernels (ms) | launches | vs eager | vs torch.compile "
           "| vs concatenated SDPA | kernels vs eager | kernels vs torch.compile | saved (MB) | peak (MB) "
           "| floor (us) | wall x floor | kernels x floor |",
           "| --- | --- |" + " ---: |" * 13]
    for case in sorted(cases):
        vs = cases[case]
        ref = {k: vs[k][0] for k in ("eager", "compiled", "concat") if k in vs}
        ref_k = {k: vs[k][1].get("kernel ms") for k in ("eager", "compiled") if k in vs}
        for v in sorted(vs, key=lambda v: (not v.startswith("lk"), v)):
            t, info = vs[v]
            ours = v.startswith("lk")

            def ratio(k, t=t, ours=ours, ref=ref):
                return f"{ref[k] / t:.2f}x" if k in ref and ours else "-"

            def kratio(k, kt=info.get("kernel ms"), ours=ours, ref_k=ref_k):
                return f"{ref_k[k] / kt:.2f}x" if ours and kt and ref_k.get(k) else "-"
            out.append(f"| {case} | {v} | {t * 1e3:,.3f} | {_fmt(info.get('kernel ms'), 3)} | "
                       f"{_fmt(info.get('kernels per call'))} | {ratio('eager')} | {ratio('compiled')} | "
                       f"{ratio('concat')} | {kratio('eager')} | {kratio('compiled')} | "
                       f"{_fmt(info.get('saved MB'), 2)} | {_fmt(info.get('peak MB'), 2)} | "
                       f"{_fmt(info.get('floor us'), 1)} | {_fmt(info.get('wall x floor'), 2)} | "
                       f"{_fmt(info.get('x floor'), 2)} |")
    return out


def _atomic(path, write):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-",
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def train_chart(case, variants, path):
    plt = _pyplot()
    order = [v for v in TRAIN_ORDER if v in variants] + sorted(set(variants) - set(TRAIN_ORDER))
    colours = ["tab:orange" if v in OURS else "tab:gray" for v in order]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(order) + 1.6))
    for ax, key, label in ((axes[0], "peak MB", "peak memory above resident (MB)"),
                           (axes[1], None, "step time (ms)")):
        vals = [variants[v][1].get(key) or 0 for v in order] if key else [variants[v][0] * 1e3 for v in order]
        ax.barh(order, vals, color=colours)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        for y, x in enumerate(vals):
            ax.text(x, y, f" {x:,.0f}" if x >= 10 else f" {x:.2f}", va="center", fontsize=8)
        ax.margins(x=0.18)
    fig.suptitle(f"{case} (orange: ladder_kernels methods)", fontsize=10)
    _save(plt, fig, path)


def kernel_chart(cases, path):
    rows = []
    for case in sorted(cases):
        vs = cases[case]
        for v, (t, _) in vs.items():
            if v.startswith("lk"):
                rows.append((f"{case} [{v}]", vs["eager"][0] / t if "eager" in vs else 0,
                             vs["compiled"][0] / t if "compiled" in vs else 0))
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.4))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r[1] for r in rows], height=0.4, label="vs eager reference")
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="vs torch.compile")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up (reference time / ladder_kernels time)")
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def machine_lines(rows) -> list:
    seen, out = set(), []
    for m, when, _ in rows:
        key = json.dumps([m.get("cuda_device"), m.get("cpu_model"), m.get("torch"), m.get("triton"), when[:10]])
        if key in seen:
            continue
        seen.add(key)
        dev = m.get("cuda_device") or "no CUDA GPU"
        smoke = " (SMOKE run: tiny shapes, one round; the timings mean nothing)" if m.get("smoke") else ""
        out.append(f"- {when[:19]}: GPU {dev}; CPU {m.get('cpu_model') or m.get('processor')} "
                   f"({m.get('cpu', {}).get('count', '?')} cores); torch {m.get('torch')}, triton "
                   f"{m.get('triton')}, python {m.get('python_version')}; backends "
                   f"{', '.join(m.get('ladder_kernels_backends') or [])}{smoke}")
    return out


def write_report(paths, out_dir, appendices=(), partial=False) -> str:
    """report.md from the benchmark JSON files; `appendices` are Markdown files (the static gate table of
    benchmarks/static_gate.py, the traffic model of benchmarks/traffic.py) added at the end as they are.
    `partial`: unreadable JSON files are named in the report instead of failing it (gpu_check.sh rewrites
    the report after every step, so that a run cut short still leaves one)."""
    skipped = [] if partial else None
    rows = load(paths, skipped)
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# ladder_kernels benchmark report", "", "Runs:", *(machine_lines(rows) or ["- (no results yet)"]), ""]
    lines += [f"- left out: {m}" for m in skipped or []]
    for case, variants in sorted(train_cases(rows).items()):
        info = next(iter(variants.values()))[1]
        png = f"{slug(case)}.png"
        train_chart(case, variants, os.path.join(out_dir, png))
        shapes = {k: v for k, v in (info.get("shapes") or {}).items() if not k.startswith("text tokens")}
        note = (f"Shapes: {json.dumps(shapes)} (text tokens per method in the table); precision "
                f"{info.get('precision')}; memory: {info.get('memory kind')}; resident: the model's (frozen "
                "weights as stored, int8 ones packed; side network, prompts, caches, optimizer state), "
                "measured as the RSS before the step above a warmed runtime and the input batch (CPU) or "
                "the allocations before it less the batch (CUDA); peak: above it over one step; total: "
                "resident + peak; counted: the resident tensors' bytes added up, as a check; process "
                "peak: the whole process (CPU, runtime included) or all allocations (CUDA), what a device "
                "must hold besides. Ratios: how much of "
                "CoOp's memory; CoOp's (and LST's) step time / this one's. Bold: this package's methods.")
        lines += [f"## {case}", "", note, "", *train_table(variants), "", f"![{case}]({png})", ""]
    kernels = kernel_cases(rows)
    if kernels:
        lines += ["## Kernels", "", "Ratio = reference time / ladder_kernels time, same run, same inputs. Wall: the "
                  "whole call as a user's loop sees it (host path, launches, synchronisation); kernels (CUDA): the "
                  "summed durations of the GPU kernels the call launched (torch.profiler), which is what the "
                  "floor (benchmarks/traffic.py) bounds.", "",
                  *kernel_table(kernels), ""]
        if kernel_chart(kernels, os.path.join(out_dir, "kernels.png")):
            lines += ["![kernels](kernels.png)", ""]
    for extra in appendices:
        with open(extra, encoding="utf-8") as f:
            body = f.read().strip()
        lines += [re.sub(r"(?m)^# ", "## ", body), ""]  # their titles become sections of the report
    path = os.path.join(out_dir, "report.md")
    text = "\n".join(lines)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(path, write)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*", help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--out", default="bench-results/report", help="output folder (default: %(default)s)")
    ap.add_argument("--append", nargs="*", default=[], metavar="MD",
                    help="Markdown files to add at the end (static_gate.md, traffic.md)")
    ap.add_argument("--partial", action="store_true",
                    help="name unreadable JSON files in the report instead of failing, and allow none at all")
    a = ap.parse_args(argv)
    if not a.json and not a.partial:
        ap.error("give at least one JSON file (or --partial)")
    try:
        path = write_report(a.json, a.out, [f for f in a.append if os.path.isfile(f)], a.partial)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
