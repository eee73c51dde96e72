"""The papers' tables from the metrics.json files under a folder (`ladder-clip summarize`): accuracy mean
+- std over seeds per dataset x method x shots and its average over datasets; base / new / harmonic mean
for base-to-new runs; the memory and speed that metrics.json records. Pure: files in, text out (the CLI
in apps/summarize.py writes them and draws the plot).

Conventions, as the CoOp family's: accuracies in %; +- is the standard deviation over seeds with numpy's
default (population, ddof=0), as Dassl's tools/parse_test_res.py computes it; the harmonic mean of a
group is that of its seed-averaged base and new accuracies, and the average row's that of the
dataset-averaged base and new (CoCoOp's tables). zeroshot trains nothing: it is shown at 0 shots."""
import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..base.errors import UserError

METRICS = "metrics.json"
RECORD = "sweep-run.json"  # apps/sweep.py's record of a run: its dataset's name
FEW, B2N = "few-shot", "base-to-new"
# a folder holding one of these but no metrics.json is a run that did not finish
RUN_MARKS = ("state", "train.log", "prompt.safetensors", RECORD)
_LAYOUT = re.compile(r"seed_?\d+|\d+_?shots?|shots?_?\d+|base2new|fewshot|few-shot", re.IGNORECASE)


@dataclass
class Result:
    path: str  # the run's folder, relative to RUNS
    dataset: str
    by_folder: bool  # `dataset` is the data folder's name (two folders of one name are told apart by path)
    data: Optional[str]  # the data folder, as metrics.json records it
    method: str
    shots: int
    seed: int
    protocol: str
    accuracy: float
    base: Optional[float]
    new: Optional[float]
    peak_bytes: Optional[int]
    peak_kind: Optional[str]
    images_per_s: Optional[float]
    trainable: Optional[int]
    epochs: Optional[int]
    settings: Dict[str, str]  # what must agree within a group (mixed settings are flagged)
    given: Optional[str] = None  # a sweep's run: the train arguments it was given, less --seed


@dataclass
class Group:
    protocol: str
    dataset: str
    method: str
    shots: int
    runs: List[Result]
    notes: List[str] = field(default_factory=list)
    parts: List["Group"] = field(default_factory=list)  # an average row's per-dataset groups

    @property
    def average_of(self) -> int:
        return len(self.parts)

    def values(self, key: str) -> List[float]:
        return [getattr(r, key) for r in self.runs]


def mean(v: List[float]) -> float:
    return sum(v) / len(v)


def pstd(v: List[float]) -> float:
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _number(m: dict, key: str, low=0.0, high=1.0) -> float:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise ValueError(f"{key!r} is {v!r}, expected a number in [{low:g}, {high:g}]")
    return float(v)


def _int(m: dict, key: str) -> int:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key!r} is {v!r}, expected an integer >= 0")
    return v


def _optional(m: dict, key: str, kind):
    v = m.get(key)
    return v if isinstance(v, kind) and not isinstance(v, bool) else None


def _record(folder: str) -> dict:
    """The sweep's record of the run ({} without one)."""
    try:
        with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _given(rec: dict) -> Optional[str]:
    """The train arguments the sweep gave the run, less its seed (the one thing a group's runs differ in)."""
    args = rec.get("train")
    if not isinstance(args, list) or "--seed" not in args or args.index("--seed") + 1 >= len(args):
        return None
    i = args.index("--seed")
    return json.dumps(args[:i] + args[i + 2:])


def _dataset(root: str, folder: str, m: dict, rec: dict) -> Tuple[str, bool]:
    """(the dataset's name, whether it is the data folder's name): the sweep's record names it, else
    metrics.json's --dataset, else its data folder's name, else (metrics of older versions) the run's path
    less the layout's parts (seedN, Kshot, the method, base2new)."""
    if isinstance(rec.get("dataset"), str) and rec["dataset"]:
        return rec["dataset"], False
    if isinstance(m.get("dataset"), str) and m["dataset"]:
        return m["dataset"], False
    if isinstance(m.get("data"), str) and os.path.basename(os.path.normpath(m["data"])):
        return os.path.basename(os.path.normpath(m["data"])), True
    parts = [p for p in os.path.relpath(folder, root).split(os.sep)
             if p not in (".", m.get("method")) and not _LAYOUT.fullmatch(p)]
    return "/".join(parts) or os.path.basename(os.path.abspath(root)), False


def _settings(m: dict) -> Dict[str, str]:
    r = m.get("recipe") if isinstance(m.get("recipe"), dict) else {}
    trains = m.get("method") != "zeroshot"  # zero-shot's recipe and epochs are never used
    s = {"model": m.get("model"), "data folder": m.get("data"), "precision": m.get("precision"),
         "method options": m.get("config"),
         "test images": m.get("test_images"), "classes": m.get("classnames")}
    if trains:
        s.update({"epochs": m.get("epochs"), "recipe": r.get("name"), "lr": r.get("lr"),
                  "batch size": r.get("batch_size"), "optimizer": r.get("optimizer"),
                  "weight decay": r.get("weight_decay"), "warmup epochs": r.get("warmup_epochs"),
                  "augment": m.get("augment")})
    return {k: json.dumps(v, sort_keys=True) for k, v in s.items()}


def read_result(root: str, folder: str) -> Result:
    """One run's metrics.json; ValueError says what is wrong with it."""
    path = os.path.join(folder, METRICS)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text")
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})")
    if not isinstance(m, dict):
        raise ValueError("not a JSON object")
    method = m.get("method")
    if not isinstance(method, str) or not method:
        raise ValueError(f"'method' is {method!r}, expected a method name")
    b2n = "harmonic_mean" in m
    acc = _number(m, "accuracy")
    base = _number(m, "base_accuracy") if b2n else None
    new = _number(m, "new_accuracy") if b2n else None
    shots, seed = _int(m, "shots"), _int(m, "seed")
    rec = _record(folder)
    dataset, by_folder = _dataset(root, folder, m, rec)
    return Result(path=os.path.relpath(folder, root), dataset=dataset, by_folder=by_folder,
                  data=m.get("data") if isinstance(m.get("data"), str) else None, method=method,
                  shots=0 if method == "zeroshot" else shots, seed=seed, protocol=B2N if b2n else FEW,
                  accuracy=acc, base=base, new=new, peak_bytes=_optional(m, "peak_memory_bytes", int),
                  peak_kind=_optional(m, "peak_memory_kind", str), images_per_s=_optional(m, "images_per_s", float),
                  trainable=_optional(m, "trainable_parameters", int), epochs=_optional(m, "epochs", int),
                  settings=_settings(m), given=_given(rec))


def collect(root: str) -> Tuple[List[Result], List[Tuple[str, str]]]:
    """(the runs' results, [(run folder, what is wrong)] for runs without a readable metrics.json)."""
    if not os.path.isdir(root):
        raise UserError(f"RUNS {root!r}: no such folder (expected a sweep's --out, or any folder holding runs' "
                        f"{METRICS} files)")
    results, problems = [], []
    for folder, dirs, names in os.walk(root, onerror=None):
        rel = os.path.relpath(folder, root)
        if METRICS in names:
            try:
                results.append(read_result(root, folder))
            except (ValueError, OSError) as exc:
                problems.append((rel, f"{METRICS} unreadable: {exc}"))
        elif any(n in names or n in dirs for n in RUN_MARKS):
            problems.append((rel, f"no {METRICS} (an unfinished or failed run; see its train.log)"))
        # a run's own state/ holds committed epochs, not runs; .tmp-* are killed writes
        dirs[:] = sorted(d for d in dirs if d != "state" and not d.startswith(".tmp-"))
    folders = {}
    for r in results:
        if r.by_folder:
            folders.setdefault(r.dataset, set()).add(r.data)
    for r in results:  # /a/pets and /b/pets are two datasets
        if r.by_folder and len(folders[r.dataset]) > 1:
            r.dataset = r.data
    if not results:
        found = f"; {len(problems)} run folder(s) without a readable one" if problems else ""
        raise UserError(f"RUNS {root!r}: no {METRICS} found under it{found} (expected the run folders of "
                        "`ladder-clip sweep` or `train --out`)")
    return results, problems


def _method_order(name: str):
    return (name != "zeroshot", name)


def _short(v: str) -> str:
    return v if len(v) <= 32 else v[:29] + "..."


def group(results: List[Result]) -> List[Group]:
    """One group per (protocol, dataset, method, shots), seeds sorted, with its notes (mixed settings, a
    seed twice), then the average over datasets of each (protocol, method, shots)."""
    by = {}
    for r in results:
        by.setdefault((r.protocol, r.dataset, r.method, r.shots), []).append(r)
    groups = []
    for (protocol, dataset, method, shots), runs in sorted(by.items(), key=lambda kv: (
            kv[0][0] != FEW, kv[0][1], _method_order(kv[0][2]), kv[0][3])):
        runs.sort(key=lambda r: (r.seed, r.path))
        g = Group(protocol, dataset, method, shots, runs)
        seeds = [r.seed for r in runs]
        for s in sorted({s for s in seeds if seeds.count(s) > 1}):
            g.notes.append(f"seed {s} {seeds.count(s)} times ({', '.join(r.path for r in runs if r.seed == s)})")
        # a method's options as run (metrics' config) may be fitted per run (the linear probe's searched C):
        # a sweep's runs compare what they were given instead
        given = all(r.given is not None for r in runs)
        if given and len({r.given for r in runs}) > 1:
            g.notes.append("mixed train arguments (see each run's sweep-run.json)")
        for key in runs[0].settings:
            if given and key == "method options":
                continue
            seen = list(dict.fromkeys(r.settings.get(key) for r in runs))
            if len(seen) > 1:
                g.notes.append(f"mixed {key}: {' vs '.join(_short(v) for v in seen)}")
        groups.append(g)
    return groups + _averages(groups)


def _averages(groups: List[Group]) -> List[Group]:
    out = []
    for protocol in (FEW, B2N):
        mine = [g for g in groups if g.protocol == protocol]
        datasets = sorted({g.dataset for g in mine})
        if len(datasets) < 2:
            continue
        keys = sorted({(g.method, g.shots) for g in mine}, key=lambda k: (_method_order(k[0]), k[1]))
        for method, shots in keys:
            parts = [g for g in mine if (g.method, g.shots) == (method, shots)]
            a = Group(protocol, "average", method, shots, [r for g in parts for r in g.runs], parts=parts)
            if len(parts) < len(datasets):
                missing = sorted(set(datasets) - {g.dataset for g in parts})
                a.notes.append(f"over {len(parts)} of {len(datasets)} datasets (none for {', '.join(missing)})")
            out.append(a)
    return out


def stats(g: Group) -> dict:
    """The row's numbers, accuracies in %: a dataset's over its seeds, an average's over its datasets."""
    if g.average_of:
        s = {"accuracy": mean([stats(p)["accuracy"] for p in g.parts]), "accuracy_std": None}
        if g.protocol == B2N:
            s["base"] = mean([stats(p)["base"] for p in g.parts])
            s["new"] = mean([stats(p)["new"] for p in g.parts])
            s["base_std"] = s["new_std"] = None
            s["hm"] = harmonic(s["base"], s["new"])
        return s
    acc = [100 * v for v in g.values("accuracy")]
    s = {"accuracy": mean(acc), "accuracy_std": pstd(acc)}
    if g.protocol == B2N:
        base, new = [100 * v for v in g.values("base")], [100 * v for v in g.values("new")]
        s.update(base=mean(base), base_std=pstd(base), new=mean(new), new_std=pstd(new))
        s["hm"] = harmonic(s["base"], s["new"])
    peaks = [r.peak_bytes for r in g.runs if r.peak_bytes is not None]
    speeds = [r.images_per_s for r in g.runs if r.images_per_s is not None]
    s["peak_mib"] = mean(peaks) / 2 ** 20 if peaks else None
    s["images_per_s"] = mean(speeds) if speeds else None
    kinds = sorted({r.peak_kind for r in g.runs if r.peak_kind and r.peak_bytes is not None})
    s["peak_kind"] = " / ".join(kinds) or None
    trainable = sorted({r.trainable for r in g.runs if r.trainable is not None})
    s["trainable"] = trainable[0] if len(trainable) == 1 else None
    epochs = sorted({r.epochs for r in g.runs if r.epochs is not None})
    s["epochs"] = None if g.method == "zeroshot" or not epochs else \
        str(epochs[0]) if len(epochs) == 1 else "/".join(map(str, epochs))
    return s


def _pm(v, std) -> str:
    return "" if v is None else f"{v:.2f}" if std is None else f"{v:.2f} ± {std:.2f}"


def _cell(g: Group) -> str:
    """mean ± std; a single run (zero-shot's) has no spread to show"""
    s = stats(g)
    return _pm(s["accuracy"], s["accuracy_std"] if len(g.runs) > 1 else None)


def _seeds(g: Group) -> str:
    return f"{g.average_of} datasets" if g.average_of else ",".join(str(r.seed) for r in g.runs)


def _name(g: Group) -> str:
    return f"**average** ({g.average_of})" if g.average_of else g.dataset


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"] + \
        ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def markdown(groups: List[Group], root: str, problems: List[Tuple[str, str]]) -> str:
    n = len({r.path for g in groups if not g.average_of for r in g.runs})
    lines = [f"# Summary of {n} runs under {root}", "",
             "Accuracy in %, mean ± standard deviation over seeds (population std, as Dassl's parse_test_res.py). "
             "zeroshot trains nothing and is shown at 0 shots. An average row is the mean over datasets of "
             "their seed means (in brackets: how many datasets)."]
    few = [g for g in groups if g.protocol == FEW]
    if few:
        shots = sorted({g.shots for g in few})
        rows = {}
        for g in few:
            rows.setdefault((g.average_of > 0, g.dataset, _method_order(g.method), g.method), {})[g.shots] = g
        body = []
        for (_, _, _, method), cells in sorted(rows.items()):
            any_g = next(iter(cells.values()))
            body.append([_name(any_g), method] + [_cell(cells[k]) if k in cells else "" for k in shots])
        lines += ["", "## Few-shot accuracy (%) by shots per class", ""]
        lines += _table(["dataset", "method"] + [f"{k} shot{'s' if k != 1 else ''}" for k in shots], body)
    b2n = [g for g in groups if g.protocol == B2N]
    if b2n:
        body = []
        for g in sorted(b2n, key=lambda g: (g.average_of > 0, g.dataset, _method_order(g.method), g.shots)):
            s = stats(g)
            one = len(g.runs) == 1  # a single run (zero-shot's) has no spread to show
            body.append([_name(g), g.method, str(g.shots), _seeds(g), _pm(s["base"], None if one else s["base_std"]),
                         _pm(s["new"], None if one else s["new_std"]), f"{s['hm']:.2f}"])
        lines += ["", "## Base-to-new generalisation (%)", "",
                  "HM: the harmonic mean of the seed-averaged base and new accuracies, as CoCoOp's tables compute "
                  "it (the average row: of the averaged base and new).", ""]
        lines += _table(["dataset", "method", "shots", "seeds", "base", "new", "HM"], body)
    body = []
    for g in [g for g in groups if not g.average_of]:
        s = stats(g)
        body.append([g.protocol, g.dataset, g.method, str(g.shots), _seeds(g), s["epochs"] or "-",
                     "-" if s["peak_mib"] is None else f"{s['peak_mib']:.1f}", s["peak_kind"] or "-",
                     "-" if s["images_per_s"] is None else f"{s['images_per_s']:.1f}",
                     "-" if s["trainable"] is None else f"{s['trainable']:,}"])
    lines += ["", "## Memory and speed (means over seeds)", "",
              "Peak training memory above what was resident before training, over the training steps only, and "
              "training images per second, as each run's metrics.json records them ('-': nothing trained).", ""]
    lines += _table(["protocol", "dataset", "method", "shots", "seeds", "epochs", "peak memory (MiB)",
                     "measured as", "images/s", "trainable parameters"], body)
    notes = [f"- {g.protocol} {g.dataset} {g.method} {g.shots} shots: {note}" for g in groups for note in g.notes]
    if notes:
        lines += ["", "## Notes", ""] + notes
    if problems:
        lines += ["", f"## Runs left out ({len(problems)})", ""] + [f"- {p}: {why}" for p, why in problems]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("protocol", "dataset", "method", "shots", "seeds", "accuracy_pct", "accuracy_std_pct", "base_pct",
               "base_std_pct", "new_pct", "new_std_pct", "harmonic_mean_pct", "epochs", "peak_memory_mib",
               "peak_memory_kind", "images_per_s", "trainable_parameters", "runs", "notes")


def csv_text(groups: List[Group]) -> str:
    """One row per group and average, the numbers unrounded past 4 decimals (empty: not applicable)."""
    def num(v):
        return "" if v is None else f"{v:.4f}"

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for g in groups:
        s = stats(g)
        w.writerow([g.protocol, g.dataset, g.method, g.shots, _seeds(g), num(s["accuracy"]), num(s["accuracy_std"]),
                    num(s.get("base")), num(s.get("base_std")), num(s.get("new")), num(s.get("new_std")),
                    num(s.get("hm")), s.get("epochs") or "", num(s.get("peak_mib")), s.get("peak_kind") or "",
                    num(s.get("images_per_s")), "" if s.get("trainable") is None else s["trainable"],
                    len(g.runs), "; ".join(g.notes)])
    return buf.getvalue()


def curves(groups: List[Group]) -> Dict[str, Dict[str, List[Tuple[int, float, Optional[float]]]]]:
    """{dataset or 'average': {method: [(shots, mean accuracy %, std or None)]}} of the few-shot groups."""
    out = {}
    for g in groups:
        if g.protocol != FEW:
            continue
        s = stats(g)
        name = f"average over {g.average_of} datasets" if g.average_of else g.dataset
        out.setdefault(name, {}).setdefault(g.method, []).append((g.shots, s["accuracy"], s["accuracy_std"]))
    return out
