"""ladder_clip: CLIP prompt tuning on ladder_kernels (CoOp, VPT, MaPLe, RLP, APT, Prompt-Ladder, LST, linear probe).

    ladder-clip demo
    ladder-clip train --model tiny --data DIR --method ladder --shots 4 --epochs 2 --out runs/x
    ladder-clip eval --model tiny --data DIR --checkpoint runs/x/prompt.safetensors
    ladder-clip sweep | summarize | export | predict

Layers, each importing only from those before it (tests/pipeline/test_pipeline_layout.py checks every import):

    base     errors, files, lock, peak, ddp, runtime (autocast, device checks)
    data     datasets, coop_datasets (--dataset NAME), transforms, loader, images, synthetic
    model    tokenizer, backbone, openai_clip, pretrain (tiny-pretrained), load (load_backbone), int8
    methods  options, prompts, base, zeroshot, coop, vpt, maple, rlp, apt, linear_probe,
             ladder/ (ladder, side, frozen, lst)
    engine   recipes, config, checkpoint, state, eval_data, evaluate, metrics, summary, train,
             bundle_file, bundle_net, bundle (export's file)
    apps     cli, demo, int8_report, sweep, summarize, predict, export

The old flat paths (ladder_clip.quantize, .backbone, .train, ...) are aliases of the moved modules (_alias.py).
The names below are imported on first use: `ladder-clip` starts with the standard library only, so a
Ctrl-C during the torch / transformers import is caught by the CLI (one line, no traceback).
"""
import importlib

_LAZY = {"CLIPBackbone": ".model.backbone", "load_backbone": ".model.load", "METHODS": ".methods",
         "build_method": ".methods"}

__all__ = ["CLIPBackbone", "METHODS", "build_method", "load_backbone"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ladder_clip' has no attribute {name!r}")
