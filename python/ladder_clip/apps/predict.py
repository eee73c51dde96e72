"""`ladder-clip predict`: the top-k classes of images (files, folders, globs), from a bundle (`ladder-clip
export`; torch and this package only) or from a prompt checkpoint on its --model. A table, or JSON with
--json. An image that cannot be read is reported on stderr and skipped. Standard library only at import
(cli.py builds the parser before torch is imported)."""
import glob
import json
import os
import sys

from ..base.errors import UserError

HELP = "top-k classes of images, folders or globs, from a bundle or a checkpoint"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def add_arguments(p) -> None:
    from ..engine.config import ACTIVATIONS, DEVICES, PRECISIONS

    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="an image file, a folder (its images, recursively, by extension) or a glob such as "
                   "'photos/**/*.jpg' (quoted, so that ladder-clip expands it)")
    p.add_argument("--checkpoint", "--bundle", dest="checkpoint", required=True,
                   help="a bundle from `ladder-clip export`, or a prompt checkpoint (prompt.safetensors; then "
                   "--model too); classes: the ones it holds")
    p.add_argument("--model", help="the CLIP a checkpoint was trained on (as train's --model); not for a bundle")
    p.add_argument("--tokenizer", help="as train's --tokenizer (a checkpoint's --model file)")
    p.add_argument("--activation", choices=ACTIVATIONS, help="as train's --activation (a checkpoint's --model file)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward (default: 32)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="(default: cpu)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="(default: fp32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def image_paths(specs):
    """Every image the arguments name, in order, each once; a name that matches nothing is an error."""
    out = []
    for spec in specs:
        if os.path.isfile(spec):
            found = [spec]
        elif os.path.isdir(spec):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(spec) for f in names
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise UserError(f"folder {spec!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"{spec!r} matches no file")
        else:
            raise UserError(f"{spec!r} is not an image file, a folder or a glob that matches files")
        out.extend(found)
    return list(dict.fromkeys(out))


def _read(path, preprocess):
    """(pixels, None) or (None, why it cannot be read)."""
    from PIL import Image

    from ..data.images import size_problem

    try:
        with Image.open(path) as im:
            problem = size_problem(im)
            if problem is not None:
                return None, problem
            return preprocess(im), None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for a file that is not an image it reads
        return None, " ".join(str(exc).split()) or type(exc).__name__


def load_predictor(args, device):
    """A bundle's model, or a checkpoint's method on --model (engine/bundle.py)."""
    from ..engine import bundle

    if bundle.is_bundle(args.checkpoint):
        for flag in ("model", "tokenizer", "activation"):
            if getattr(args, flag) is not None:
                print(f"ladder-clip: warning: --{flag} is not used: bundle {args.checkpoint!r} holds its model",
                      file=sys.stderr)
        return bundle.load_bundle(args.checkpoint, device)
    if args.model is None:
        raise UserError(f"--model: {args.checkpoint!r} is a prompt checkpoint, which runs on the CLIP it was trained "
                        "on: pass --model (or export it to a bundle with ladder-clip export)")
    method, _ = bundle.load_method(args.checkpoint, args.model, device, args.tokenizer, args.activation)
    return bundle.MethodPredictor(method)


def predict(predictor, paths, device, precision="fp32", batch_size=32, topk=5, quiet=True):
    """([{"image", "top": [{"class", "index", "probability"}]}], [{"image", "error"}])."""
    import torch
    from tqdm import tqdm

    from ..base.runtime import autocast, bar_off
    from ..data.transforms import Preprocess

    pre = Preprocess(predictor.preprocess)
    k = min(topk, len(predictor.classnames))
    results, skipped = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="predict", disable=bar_off(quiet), leave=False):
        batch, xs = [], []
        for path in paths[i:i + batch_size]:
            x, why = _read(path, pre)
            if x is None:
                print(f"ladder-clip: warning: skipped {path}: {why}", file=sys.stderr)
                skipped.append({"image": path, "error": why})
            else:
                batch.append(path)
                xs.append(x)
        if not xs:
            continue
        with torch.no_grad(), autocast(device, precision):
            logits = predictor(torch.stack(xs).to(device)).float()
        probs, idx = logits.softmax(-1).topk(k, dim=-1)
        for path, p, j in zip(batch, probs.tolist(), idx.tolist()):
            results.append({"image": path, "top": [{"class": predictor.classnames[c], "index": c, "probability": q}
                                                   for q, c in zip(p, j)]})
    return results, skipped


def table(results) -> str:
    width = max([len("image")] + [len(r["image"]) for r in results])
    cw = max([len("class")] + [len(t["class"]) for r in results for t in r["top"]])
    lines = [f"{'image':<{width}}  rank  {'class':<{cw}}  probability"]
    for r in results:
        for n, t in enumerate(r["top"], 1):
            lines.append(f"{r['image'] if n == 1 else '':<{width}}  {n:>4}  {t['class']:<{cw}}  {t['probability']:.4f}")
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from ..base.runtime import check_device

    for name, value in (("--topk", args.topk), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value}")
    paths = image_paths(args.images)
    check_device(args.device)
    device = torch.device(args.device)
    predictor = load_predictor(args, device)
    results, skipped = predict(predictor, paths, device, args.precision, args.batch_size, args.topk, args.quiet)
    if not results:
        raise UserError(f"none of the {len(paths)} images could be read (each is reported above)")
    if args.json:
        print(json.dumps({"source": args.checkpoint, "method": predictor.method, "classes": len(predictor.classnames),
                          "predictions": results, "skipped": skipped}, indent=1))
    else:
        print(table(results))
        if skipped:
            print(f"({len(skipped)} of {len(paths)} images skipped: unreadable)")
    return 0
