"""How the ladder runs the frozen CLIP's encoders, which it never back-propagates into.

What an int8 ladder holds while it trains (its resident memory, benchmarks/train_step.py): the text
encoder is needed only to compute the ladder's cached text taps, so between those builds its layers and
token embedding are on disk (`text_encoder`); the image taps autograd keeps for the side network's weight
gradients are kept in bf16 (`saved_in_bf16`); the frozen image forward's independent chunks run on threads
(`map_chunks`). The int8 backbone itself is ladder_clip/model/int8.py.
"""
import contextlib
import os
import tempfile
import warnings
import weakref

import torch
from torch import nn

from ...model.int8 import is_int8


# ---- the frozen image forward's chunks on threads ---------------------------------------------------------
_POOL = {}  # worker count -> the threads of map_chunks, made on first use and kept


def map_chunks(fn, chunks) -> list:
    """[fn(c) for c in chunks] for the int8 frozen forward's independent image chunks, spread over as many
    threads as torch's intra-op pool has (this one and workers; at most one a chunk), each running its
    ops on its share of the intra-op threads; the pool's setting is restored after. Why: the int8
    forward is many small ops (a 1576-row int8 GEMM, one chunk's attention) that two intra-op threads
    speed up by only ~1.3x on a 2-core CPU, while whole chunks on two threads run side by side (torch's
    ops release the GIL; docs/int8.md has the gain). Each chunk's result is what the sequential loop gives, bit for
    bit (tested). The caller's no_grad and autocast are thread-local, so each worker enters no_grad and
    autocast-off itself (the int8 forward's own context); two chunks' transients are alive at once."""
    n = min(torch.get_num_threads(), len(chunks))
    if n < 2 or torch.is_grad_enabled():
        return [fn(c) for c in chunks]
    if n - 1 not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[n - 1] = ThreadPoolExecutor(n - 1, thread_name_prefix="ladder-frozen")
    pool = _POOL[n - 1]

    threads = torch.get_num_threads()
    each = max(1, threads // n)  # a many-core machine splits its cores among the chunks

    def work(part):
        torch.set_num_threads(each)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return [fn(c) for c in part]

    futures = []
    try:
        futures = [pool.submit(work, chunks[i::n]) for i in range(1, n)]
        results = [work(chunks[0::n])] + [f.result() for f in futures]
    finally:
        for f in futures:  # none may still be running when the pool's size is set back
            f.cancel() or f.exception()
        torch.set_num_threads(threads)
    out = [None] * len(chunks)
    for i, part in enumerate(results):
        out[i::n] = part
    return out


# ---- the text encoder between uses ------------------------------------------------------------------------
@contextlib.contextmanager
def text_encoder(backbone):
    """The int8 text encoder (layers and token embedding) in memory for the duration, on disk outside it.

    The ladder needs the text encoder only to compute its cached text taps, once per class set; while it
    trains they are three quarters of the int8 weights (at the benchmark's size 17.5 of 23.5 MB, most of it
    the 49408-row embedding). After the first use they are written once to a temporary file (deleted with
    the backbone) and dropped; a new class set reads them back. Any other text forward meanwhile raises
    instead of running without them. An fp32 backbone is left as it is."""
    if not is_int8(backbone):
        yield
        return
    _restore_text(backbone)
    try:
        yield
    finally:
        _offload_text(backbone)


def _text_parts(backbone):
    tm = backbone.clip.text_model
    return tm.encoder, "layers", tm.embeddings, "token_embedding"


def _offload_text(backbone) -> None:
    enc, layers, emb, tok = _text_parts(backbone)
    if isinstance(getattr(emb, tok), _Offloaded):
        return
    if getattr(backbone, "_text_file", None) is None:  # the int8 weights never change: written once
        fd, path = tempfile.mkstemp(prefix="ladder-clip-text-", suffix=".pt")
        os.close(fd)
        weakref.finalize(backbone, _remove, path)
        torch.save({"layers": getattr(enc, layers), "embedding": getattr(emb, tok)}, path)
        backbone._text_file = path
    setattr(enc, layers, nn.ModuleList([_Offloaded()]))
    setattr(emb, tok, _Offloaded())


def _restore_text(backbone) -> None:
    enc, layers, emb, tok = _text_parts(backbone)
    if not isinstance(getattr(emb, tok), _Offloaded):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # qint8 tensors, as in quantize_backbone
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")  # torch's own unpickling
        parts = torch.load(backbone._text_file, weights_only=False)  # our own file, written above
    setattr(enc, layers, parts["layers"])
    setattr(emb, tok, parts["embedding"])


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class _Offloaded(nn.Module):
    """Stands where the int8 text encoder's parts were while they are on disk."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("the int8 text encoder is on disk between the ladder's text-cache builds; run text "
                           "forwards inside ladder_clip.quantize.text_encoder(backbone)")


@contextlib.contextmanager
def saved_in_bf16(taps):
    """Autograd keeps the frozen image taps for the side network's weight gradients (the fusions' and the
    down-projection's): at 4 bytes an element they were a third of an int8 ladder step's peak. Within this
    context a tensor saved for backward that is (a view of) one of `taps` is kept in bf16 and given back
    in fp32: the forward is untouched, those weight gradients see the taps rounded by 2^-9 (the int8
    encoder's own error is some 1 %). Text taps are not passed: they are cached, a copy would add memory."""
    ptrs = {t.untyped_storage().data_ptr() for t in taps if t.dtype == torch.float32}

    def pack(t):
        if t.dtype == torch.float32 and not t.requires_grad and t.untyped_storage().data_ptr() in ptrs:
            return _Bf16(t.to(torch.bfloat16))
        return t

    def unpack(t):
        return t.t.float() if isinstance(t, _Bf16) else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Bf16:
    """A packed tap: unpack tells it from a tensor saved in bf16 in the first place (under autocast)."""
    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t
