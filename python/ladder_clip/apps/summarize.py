"""`ladder-clip summarize RUNS`: the tables of engine/summary.py printed and written (summary.md,
summary.csv, atomically) and accuracy vs shots drawn (accuracy_vs_shots.png: one panel per dataset and
the average, a line per method, zero-shot as a star at 0 shots, as CoOp's figure) when matplotlib is
importable."""
import os

from ..base import files
from ..engine import summary as S

PNG = "accuracy_vs_shots.png"


def add_arguments(p) -> None:
    p.add_argument("runs", metavar="RUNS", help="a sweep's --out, or any folder tree holding runs' metrics.json")
    p.add_argument("--out", help="write summary.md, summary.csv and the plot here (default: RUNS)")
    p.add_argument("--no-plot", action="store_true", help="tables only (default: draw the plot when matplotlib "
                   "is installed)")


def _text_writer(text: str):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return write


def run(args) -> int:
    results, problems = S.collect(args.runs)
    groups = S.group(results)
    md, table = S.markdown(groups, args.runs, problems), S.csv_text(groups)
    out = args.out or args.runs
    files.check_out_folder(out)
    print(md, end="")
    written = []
    for name, text in (("summary.md", md), ("summary.csv", table)):
        files.atomic_write(os.path.join(out, name), _text_writer(text))
        written.append(os.path.join(out, name))
    curves = S.curves(groups)
    if args.no_plot:
        pass
    elif not curves:
        print("summarize: no few-shot runs, so no accuracy vs shots plot")
    else:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            print("summarize: matplotlib is not installed, so no plot (pip install matplotlib); tables written")
        else:
            path = os.path.join(out, PNG)
            files.atomic_write(path, lambda tmp: _plot(curves, tmp, Figure, FigureCanvasAgg))
            written.append(path)
    if problems:
        print(f"summarize: {len(problems)} run folder(s) left out (listed above)")
    print(f"summarize: {len(results)} runs in {sum(not g.average_of for g in groups)} groups; wrote "
          f"{', '.join(written)}")
    return 0


def _plot(curves: dict, path: str, Figure, FigureCanvasAgg) -> None:
    """CoOp's figure: shots on an even scale (0 1 2 4 8 16), a panel per dataset then the average."""
    shots = sorted({k for methods in curves.values() for pts in methods.values() for k, _, _ in pts})
    x = {k: i for i, k in enumerate(shots)}
    methods = sorted({m for ms in curves.values() for m in ms}, key=lambda m: (m != "zeroshot", m))
    cols = min(4, len(curves))
    rows = -(-len(curves) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for i, (name, per) in enumerate(curves.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for m in methods:
            pts = sorted(per.get(m, []))
            if not pts:
                continue
            xs, ys = [x[k] for k, _, _ in pts], [v for _, v, _ in pts]
            if m == "zeroshot":
                ax.plot(xs, ys, linestyle="none", marker="*", markersize=12, color=colours[m], label=m)
            else:
                ax.plot(xs, ys, marker="o", markersize=4, color=colours[m], label=m)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(shots)), [str(k) for k in shots])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.savefig(path, format="png")
