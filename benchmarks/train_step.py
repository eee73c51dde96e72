"""One optimizer step of each prompt-tuning method on a CLIP of given dimensions: the training-step
benchmark's model, data, step and memory measurement (bench_train_step.py times it with pytest-benchmark).

Run as a worker it measures one method's memory in a fresh process and prints one JSON line:
    python -m benchmarks.train_step --variant ladder --classes 100 --size small --device cpu
Memory, as the benchmarks define it: resident = what the model holds between steps (the frozen CLIP's weights as
stored, int8 ones packed, and what the method keeps: side network, prompts, text caches, optimizer state);
peak = the most one step adds above that; total = their sum. On CPU the resident figure is measured: the
RSS before the step less the RSS of a warmed runtime (the same process after a tiny model of the same
variant has been built, stepped and freed: Python, torch, transformers, thread pools, lazily loaded
kernels) and less the input batch; `counted_bytes` adds up those tensors' bytes as a check. The peak is
Linux's VmHWM above the RSS before the step (VmHWM reset through /proc/self/clear_refs after the warm-up
steps). The whole process's figures (runtime included, what a device must also hold) are kept apart as
process_*. On CUDA: torch.cuda.max_memory_allocated above memory_allocated before the step.
Random weights: memory and speed do not depend on the values.

    python -m benchmarks.train_step compare --variants coop,ladder+int8 --classes 100 1000
builds the variants in one process and alternates their timed steps (a shared machine's load then falls
on all of them alike), and prints step-time ratios against the first variant with each one's memory.

    python -m benchmarks.train_step profile --variants ladder+int8-side,ladder+int8-side@side_act=hf
prints the top ops of a step by self CPU time (torch.profiler), the variants' profiled steps alternated.
The `-side` variants step the ladder's side network alone, on frozen taps computed once (what a cache of the
taps across epochs leaves of a step).
"""
import argparse
import gc
import json
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# (width, layers, heads, MLP width) per encoder; 224 px / 16 = 196 patches + CLS = 197 vision tokens.
SIZES = {
    "vit_b16": dict(text=(512, 12, 8, 2048), vision=(768, 12, 12, 3072), image=224, patch=16, embed=512),
    "small": dict(text=(256, 6, 4, 1024), vision=(256, 6, 4, 1024), image=224, patch=16, embed=256),
    "tiny": dict(text=(32, 2, 2, 64), vision=(48, 2, 2, 96), image=32, patch=8, embed=32),
}
CONTEXT, VOCAB = 77, 49408
# variant -> (pipeline method or the plain-PyTorch peer, torch.compile the whole forward?)
VARIANTS = {"coop": ("coop", False), "coop+compile": ("coop", True), "vpt": ("vpt", False),
            "maple": ("maple", False), "lst": ("lst", False), "lst+compile": ("lst", True),
            "rlp": ("rlp", False), "apt": ("apt", False), "ladder": ("ladder", False),
            "ladder+apt": ("ladder+apt", False), "ladder+int8": ("ladder", False),
            "ladder+apt+int8": ("ladder+apt", False), "ladder-side": ("ladder", False),
            "ladder+int8-side": ("ladder", False)}
# method options of a variant: the +int8 ones run the frozen CLIP's layer Linears in int8 (ladder_clip/model/int8.py)
OPTIONS = {"ladder+int8": {"frozen": "int8"}, "ladder+apt+int8": {"frozen": "int8"},
           "ladder+int8-side": {"frozen": "int8"}}
# The -side variants step the side network alone: the batch's frozen image taps are computed once at build
# time and given to every step, as a cache of the taps across epochs gives them (issue 22); the text taps
# are the ladder's own per-class-set cache either way. What a step then costs is the side network's
# forward over the images and the classes, its backward and the optimizer.
SIDE = ("ladder-side", "ladder+int8-side")
# Token counts of class names, roughly those of ImageNet's names under CLIP's BPE (1 to 6 tokens).
NAME_TOKENS, NAME_WEIGHTS = (1, 2, 3, 4, 5, 6), (35, 30, 18, 10, 5, 2)


class WordTokenizer:
    """A stand-in for CLIP's BPE with no vocabulary file: one token per word or punctuation mark, ids from
    a hash, CLIP's start and end ids. A class name costs about the tokens it costs in CLIP."""

    def __init__(self, vocab_size: int = VOCAB):
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = vocab_size - 2, vocab_size - 1

    def __call__(self, text, add_special_tokens=False):
        ids = [zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in re.findall(r"\w+|[^\w\s]", text.lower())]
        return {"input_ids": ([self.bos_token_id] + ids + [self.eos_token_id]) if add_special_tokens else ids}

    def __len__(self):
        return self.vocab_size


def class_names(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [" ".join(f"w{c}x{j}" for j in range(rng.choices(NAME_TOKENS, NAME_WEIGHTS)[0])) for c in range(n)]


def make_backbone(size: str, device: str):
    from transformers import CLIPConfig, CLIPModel

    from ladder_clip.backbone import CLIPBackbone, preprocess_config

    s = SIZES[size]
    enc = lambda w, n, h, i: dict(hidden_size=w, num_hidden_layers=n, num_attention_heads=h,  # noqa: E731
                                  intermediate_size=i)
    tok = WordTokenizer()
    config = CLIPConfig(
        text_config=dict(**enc(*s["text"]), vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id),
        vision_config=dict(**enc(*s["vision"]), image_size=s["image"], patch_size=s["patch"]),
        projection_dim=s["embed"])
    with torch.device(device):  # initialise where it runs: ViT-B/16's 150M parameters are slow to copy
        torch.manual_seed(0)
        model = CLIPModel(config)
    return CLIPBackbone(model, tok, f"random {size}", preprocess_config(None, s["image"])).to(device)


def build_method(name: str, backbone, classnames, **options):
    if name == "lst":
        from .lst_peer import LSTPeer
        return LSTPeer(backbone, classnames)
    from ladder_clip import build_method as build
    return build(name, backbone, classnames, **options)


@dataclass
class Setup:
    variant: str
    method: torch.nn.Module
    forward: object  # the method, or torch.compile of it
    opt: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    precision: str
    text_tokens: int
    inputs_bytes: int = 0  # what a step reads besides x and y: the -side variants' precomputed taps

    def step(self):
        dev = self.x.device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = F.cross_entropy(self.forward(self.x).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.method.trainable_parameters())


def set_threads() -> int:
    """Intra-op threads for every variant alike: LK_BENCH_THREADS, or torch's default (one per core). On a
    shared machine fewer threads than cores can be faster for all of them: an op split over two threads
    waits at its barrier for whichever one the scheduler has put aside."""
    n = os.environ.get("LK_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def parse_variant(variant: str):
    """'ladder+int8@recompute=block@checkpoint=false' -> ('ladder+int8', its OPTIONS with those on top): a
    variant with method options of its own, for ablations in `compare`. One more, for the ladders only:
    side_act=hf puts back transformers' quick_gelu in the side blocks (the A/B of side.QuickGELU)."""
    base, *extra = variant.split("@")
    if base not in VARIANTS or not all(re.fullmatch(r"\w+=[\w.]+", e) for e in extra):
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, then optionally @option=value ..., "
                         f"got {variant!r}")
    return base, {**OPTIONS.get(base, {}), **{k: _value(v) for k, v in (e.split("=", 1) for e in extra)}}


def _value(text: str):
    """An option's value from its text: true/false, an int, a float, or the text itself."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build(variant: str, size: str, classes: int, device: str, batch: int) -> Setup:
    base, options = parse_variant(variant)
    name, compile_it = VARIANTS[base]
    side_act = options.pop("side_act", None)  # a benchmark knob, not a method option
    backbone = make_backbone(size, device)
    method = build_method(name, backbone, class_names(classes), **options)
    if side_act == "hf":  # the side blocks' MLP activation as transformers computes it: side.QuickGELU's A/B
        from transformers.activations import ACT2FN
        for blk in method.blocks:
            blk.mlp.activation_fn = ACT2FN[blk.mlp.config.hidden_act]
    params = method.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(1)
    img = SIZES[size]["image"]
    x = torch.randn(batch, 3, img, img, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    forward = torch.compile(method) if compile_it else method
    inputs = given_taps(method, x) if base in SIDE else 0
    layout = getattr(method, "layout", None)
    tokens = int(layout.ids.shape[1]) if layout is not None else int(method.backbone.tokenize(
        [f"a photo of a {c}." for c in method.classnames]).shape[1])
    return Setup(variant, method, forward, opt, x, y, "bf16" if device == "cuda" else "fp32", tokens, inputs)


def given_taps(method, x) -> int:
    """Compute `x`'s frozen image features and taps once, and make the ladder's frozen image forward give
    them back from then on (a fresh list a call: the side path empties its list as it goes). Returns their
    bytes: the step's input, like the batch."""
    # under the step's autocast (bf16 on CUDA), so the taps have the dtype a step's own forward gives them;
    # int8: this quantises the backbone, as the first real step does
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        feats, taps = method._frozen_image(x)
    method._frozen_image = lambda pixels: (feats, list(taps))
    return sum(t.untyped_storage().nbytes() for t in [feats, *taps])


def first_step_seconds(setup: Setup) -> float:
    """The first step: compilation for the compiled variants, the text cache for the ladder."""
    t0 = time.perf_counter()
    setup.step()
    return time.perf_counter() - t0


def shapes(size: str, classes: int, batch: int, text_tokens: int) -> dict:
    s = SIZES[size]
    img_tokens = (s["image"] // s["patch"]) ** 2 + 1
    return {"vision (width, layers, heads, mlp)": s["vision"], "text (width, layers, heads, mlp)": s["text"],
            "image tokens": img_tokens, "text tokens (longest class)": text_tokens, "classes": classes,
            "batch": batch, "embed": s["embed"]}


# ---- memory ---------------------------------------------------------------------------------------------
# /proc/self/status readings and the VmHWM reset: one definition, the pipeline's
from ladder_clip.peak import proc_status, reset_rss_peak  # noqa: E402


def _tensors(obj, depth=0):
    """Tensors held by `obj` through containers and plain objects (a text layout, a cache's tuple)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth + 1)
    elif depth < 4 and hasattr(obj, "__dataclass_fields__"):
        yield from _tensors(vars(obj), depth + 1)


def counted_bytes(setup: Setup) -> int:
    """Bytes of what the model keeps between steps, added up: the backbone's weights as stored (packed int8
    ones by quantize.weight_bytes) and, once per storage, every other tensor the method's modules hold
    (parameters, buffers, caches, layouts) and the optimizer's state."""
    from ladder_clip.model.int8 import weight_bytes

    backbone = setup.method.backbone
    inside = {id(m) for m in backbone.modules()}
    held = [t for m in setup.method.modules() if id(m) not in inside
            for t in _tensors([v for k, v in vars(m).items() if k != "_modules"])]
    held += [t for st in setup.opt.state.values() for t in _tensors(st)]
    ours = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held if t.device.type != "meta"}
    for t in list(backbone.parameters()) + list(backbone.buffers()):  # already in weight_bytes
        ours.pop(t.untyped_storage().data_ptr(), None)
    return weight_bytes(backbone) + sum(ours.values())


def measure_memory(setup: Setup, warmup: int = 2, runtime: int = 0) -> dict:
    """Memory of the model and of one step, after `warmup` steps have compiled, built caches and created the
    optimizer state (module docstring). `runtime`: the warmed runtime's RSS (CPU), 0 on CUDA."""
    for _ in range(warmup):
        setup.step()
    gc.collect()
    batch = setup.x.nbytes + setup.y.nbytes + setup.inputs_bytes
    if setup.x.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        setup.step()
        top = torch.cuda.max_memory_allocated()
        kind = "cuda max_memory_allocated"
    else:
        if not reset_rss_peak():
            raise RuntimeError("resetting the peak RSS needs Linux's /proc/self/clear_refs")
        before = proc_status("VmRSS")
        setup.step()
        top = proc_status("VmHWM")  # the whole process's peak resident set (docs/design.md, section 6)
        kind = "peak RSS (VmHWM)"
    from ladder_clip.model.int8 import weight_bytes
    from ladder_kernels import SavedTensors
    with SavedTensors(setup.method.trainable_parameters()) as saved:
        setup.step()
    resident = before - runtime - batch
    return {"resident_bytes": int(resident), "peak_above_resident_bytes": int(top - before),
            "total_bytes": int(resident + top - before), "counted_bytes": counted_bytes(setup),
            "batch_bytes": int(batch), "runtime_bytes": int(runtime), "process_resident_bytes": int(before),
            "process_peak_bytes": int(top), "memory_kind": kind, "weights_bytes": weight_bytes(setup.method.backbone),
            "saved_bytes": int(saved.bytes)}


def warmed_runtime(variant: str, device: str) -> int:
    """The RSS of this process once a tiny model of `variant` has been built, stepped and freed: the runtime
    every method's process holds besides its model (Python, torch, transformers, thread pools, kernels loaded
    on first use). 0 on CUDA, where allocations are counted instead."""
    if device != "cpu":
        return 0
    warm = build(variant, "tiny", 4, device, 2)
    warm.step()
    warm.step()
    del warm
    gc.collect()
    reset_rss_peak()  # trims freed heap pages first
    return proc_status("VmRSS")


def measure_in_subprocess(variant: str, size: str, classes: int, device: str, batch: int) -> dict:
    """measure_memory in a fresh process, so one method's allocations never inflate another's peak."""
    import subprocess

    env = dict(os.environ)
    # glibc would serve mid-sized tensors from its heap and keep the pages after free; mmap them instead so
    # the resident set follows what is alive.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("LK_BENCH_THREADS", str(torch.get_num_threads()))  # the caller's setting
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--variant", variant, "--size", size,
           "--classes", str(classes), "--device", device, "--batch", str(batch)]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(variants, classes, size="small", device="cpu", batch=32, repeats=5) -> list:
    """Per class count: each variant's memory (a fresh process each) and step time, the variants' steps
    alternated in one process (forward order, then backward, ...): rows of dicts, the first variant the
    reference of the ratios."""
    import statistics

    rows = []
    for c in classes:
        mem = {v: measure_in_subprocess(v, size, c, device, batch) for v in variants}
        setups = {v: build(v, size, c, device, batch) for v in variants}
        for st in setups.values():
            st.step()  # caches, optimizer state
        times, cpu = {v: [] for v in variants}, {v: [] for v in variants}
        load = []  # the machine's 1-minute load average after each round: what else ran meanwhile
        for r in range(repeats):
            for v in variants if r % 2 == 0 else variants[::-1]:
                t, t_cpu = time.perf_counter(), time.process_time()
                setups[v].step()
                times[v].append(time.perf_counter() - t)
                cpu[v].append(time.process_time() - t_cpu)
            load.append(round(os.getloadavg()[0], 2))
        del setups
        gc.collect()
        ref = variants[0]
        for v in variants:
            m, r_m = mem[v], mem[ref]
            step, ref_step = statistics.median(times[v]), statistics.median(times[ref])
            # CPU seconds of the process a step: the work done, whatever share of the cores the scheduler
            # gave; with one intra-op thread the steadier measure on a loaded machine (with more, it also
            # counts the threads' spinning at their barriers)
            cpu_step, ref_cpu = statistics.median(cpu[v]), statistics.median(cpu[ref])
            rows.append({"classes": c, "variant": v, "step_s": round(step, 3), "speedup": round(ref_step / step, 2),
                         "cpu_s": round(cpu_step, 3), "cpu_speedup": round(ref_cpu / cpu_step, 2),
                         "cpu_times": [round(t, 3) for t in cpu[v]],
                         "total_share": round(m["total_bytes"] / r_m["total_bytes"], 3),
                         "process_share": round(m["process_peak_bytes"] / r_m["process_peak_bytes"], 3),
                         "times": [round(t, 3) for t in times[v]], "loadavg": load, "batch": batch, "size": size,
                         "threads": torch.get_num_threads(), **m})
    return rows


def format_compare(rows) -> str:
    mb = lambda b: f"{b / 2 ** 20:8.1f}"  # noqa: E731
    w = max([16] + [len(r["variant"]) for r in rows])
    out = [f"{'C':>5} {'variant':<{w}} {'step s':>7} {'speedup':>7} {'cpu s':>7} {'speedup':>7} "
           f"{'resident':>8} {'peak':>8} {'total':>8} "
           f"{'share':>6} {'counted':>8} {'weights':>8} {'process':>8} {'share':>6}  (MB; ratios vs the first)"]
    for r in rows:
        out.append(f"{r['classes']:>5} {r['variant']:<{w}} {r['step_s']:7.3f} {r['speedup']:6.2f}x "
                   f"{r['cpu_s']:7.3f} {r['cpu_speedup']:6.2f}x "
                   f"{mb(r['resident_bytes'])} {mb(r['peak_above_resident_bytes'])} {mb(r['total_bytes'])} "
                   f"{r['total_share']:6.0%} {mb(r['counted_bytes'])} {mb(r['weights_bytes'])} "
                   f"{mb(r['process_peak_bytes'])} {r['process_share']:6.0%}")
    return "\n".join(out)


def write_json(path: str, data) -> None:
    from ladder_clip.base.files import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    atomic_write(path, write)


def compare_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step compare")
    ap.add_argument("--variants", default="coop,lst,ladder,ladder+int8,ladder+apt+int8")
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    threads = set_threads()
    rows = compare(a.variants.split(","), a.classes, a.size, "cpu", a.batch, a.repeats)
    print(f"train step, cpu {a.size}, batch {a.batch}, {threads} threads, {a.repeats} alternated repeats")
    print(format_compare(rows))
    print("1-minute load average after each round:", {c: next(r["loadavg"] for r in rows if r["classes"] == c)
                                                       for c in a.classes})
    if a.json:
        write_json(a.json, rows)
    return 0


def profile(setups: dict, rounds: int = 2, top: int = 25) -> dict:
    """torch.profiler of each setup's step, one profiled step of each a round, in alternating order (as
    `compare` times them: load falls on all alike). Per setup: its step's median wall and CPU seconds
    (those of the profiled steps, profiler overhead included) and its `top` ops by self CPU time, as rows
    of (name, calls, self ms a step, share of the profiled self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import statistics

    names = list(setups)
    acc = {n: {} for n in names}
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for s in setups.values():
        s.step()
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            t, c = time.perf_counter(), time.process_time()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                setups[n].step()
            wall[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
            for e in prof.key_averages():
                calls, us = acc[n].get(e.key, (0, 0.0))
                acc[n][e.key] = (calls + e.count, us + e.self_cpu_time_total)
    out = {}
    for n in names:
        total = sum(us for _, us in acc[n].values())
        ops = sorted(acc[n].items(), key=lambda kv: -kv[1][1])[:top]
        out[n] = {"step_s": round(statistics.median(wall[n]), 3), "cpu_s": round(statistics.median(cpu[n]), 3),
                  "self_ms_total": round(total / 1e3 / rounds, 1),
                  "top": [{"op": k, "calls": c // rounds, "self_ms": round(us / 1e3 / rounds, 1),
                           "share": round(us / total, 3)} for k, (c, us) in ops]}
    return out


def profile_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step profile")
    ap.add_argument("--variants", default="ladder+int8-side", help="as compare's, profiled alternately")
    ap.add_argument("--size", default="vit_b16", choices=list(SIZES))
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    threads = set_threads()
    setups = {v: build(v, a.size, a.classes, "cpu", a.batch) for v in a.variants.split(",")}
    res = profile(setups, a.rounds, a.top)
    load = [round(x, 2) for x in os.getloadavg()]
    for v, r in res.items():
        print(f"profile of {v}, cpu {a.size}, C={a.classes}, batch {a.batch}, {threads} threads, load {load}: "
              f"profiled step {r['step_s']:.3f} s ({r['cpu_s']:.3f} CPU s, medians of {a.rounds}); top ops by "
              f"self CPU time a step (of {r['self_ms_total']:.1f} ms)")
        for o in r["top"]:
            print(f"{o['self_ms']:9.1f} ms {o['share']:6.1%} {o['calls']:6d}x  {o['op']}")
    if a.json:
        write_json(a.json, {"size": a.size, "classes": a.classes, "batch": a.batch, "threads": threads,
                            "rounds": a.rounds, "loadavg": load, "variants": res})
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, help=f"one of {', '.join(VARIANTS)}, then @option=value ...")
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    set_threads()
    runtime = warmed_runtime(a.variant, a.device)
    setup = build(a.variant, a.size, a.classes, a.device, a.batch)
    out = measure_memory(setup, runtime=runtime)
    out.update(variant=a.variant, trainable=setup.trainable, text_tokens=setup.text_tokens,
               threads=torch.get_num_threads(), seconds=round(time.perf_counter() - t0, 2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
