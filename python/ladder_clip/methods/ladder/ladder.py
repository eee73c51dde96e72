"""Prompt-Ladder (docs/design.md, and the notes below): a side network beside the frozen CLIP.

- The frozen image and text encoders run under no_grad; their taps are the only thing the side network
  sees. Prompts never enter the frozen text encoder, so its taps depend only on the class names and are
  computed once per class set; text sequences are cut at the longest end token + 1.
- One side network of K blocks of width d = D_vision / r, shared by both modalities (causal mask for
  text); each modality has its own down-projections (D -> d) and up-projection (d -> joint embedding).
- RLP low-rank prompts enter the side network as extra tokens (text: the CoOp slots, base = the
  down-projected 'a photo of a' tap; vision: after the class token), through lk.assemble_prompts.
- Each side block starts with lk.gated_fusion of its state and the tap of its CLIP layer.
- Side blocks are pruned copies of the K tapped vision layers (side.py), by weight magnitude or, with
  importance='fisher', by squared gradients over a few training batches (`calibrate`).
- Side blocks are checkpointed (option checkpoint=True): backward recomputes each block from its input
  (recompute='block', fp32's default), or only its MLP half (recompute='mlp', int8's default: faster,
  and the int8 backbone leaves the room); the blocks' activations were most of the ladder's training
  memory otherwise (the benchmarks).
- The frozen image encoder runs in chunks of `frozen_chunk` images on CPU (its transient activations are
  the peak of a ladder step otherwise).
- Features: (1 - g) * CLIP feature + g * up(side), g = sigmoid(learned); the up-projection starts at zero
  so training starts from zero-shot CLIP.
- The text side's pooled (end-token) state is centred by a running mean over the training classes before
  the up-projection (a buffer, like BatchNorm's running mean without a scale: set from the first step,
  then a moving average; fixed in eval, so a class's feature depends only on its own name). Why: 3/4 of
  that state's energy is the template's, the same for every class, and through the up-projection's
  update (class c gets sum_c' G_c' p_c' . p_c) it turned the loss gradient's small class-shared part
  into a class-shared output that raised the text features' pairwise cosine above frozen CLIP's
  (tests/pipeline/test_pipeline_learning.py). Checkpoints written before it load with a zero centre, as trained.
- frozen='int8' runs both frozen encoders' layer Linears in int8 and keeps the token embedding in 8 bits
  (model/int8.py; how the ladder runs it: frozen.py), on CPU: the taps are all the side network sees and
  nothing back-propagates into CLIP.
  It quantises the (shared) backbone in place before the first frozen forward, after the side network
  has been pruned from the fp32 weights (and Fisher calibration has back-propagated through them);
  checkpoints stay prompt-only either way.
`ladder+apt` adds APT (lk.nn.attach_apt) to the side blocks' attention, never to the frozen CLIP.
"""
import contextlib
from typing import List, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ladder_kernels as lk

from ...model import int8 as Q
from ..apt import attach
from ..base import PromptMethod
from ..options import MAX_BLOCKS, MAX_TOKENS, AutoOr, Bool, Choice, Float, Int, Text
from ..prompts import TEMPLATE_INIT, init_tokens, text_layout
from . import frozen as FZ
from . import side as S

TAP_CACHE_DTYPES = ("auto", "fp32", "bf16", "int8")  # engine/tapcache.py stores the taps so
FROZEN_CHUNK_CPU = 8  # images per chunk of the frozen image encoder on CPU (frozen_chunk='auto')
CENTER_MOMENTUM = 0.1  # the text centre's moving-average weight (BatchNorm's default momentum)


class TapCacheViews:
    """The tap_cache option: 'off', 'auto', or a number of stored augmented views (engine/tapcache.py)."""

    def check(self, v):
        if v in ("off", "auto") or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64):
            return v
        raise ValueError("'off', 'auto' or a number of views in 1..64")


class FrozenImage(NamedTuple):
    """What the frozen image encoder gives the side network for a batch: CLIP's image features and the
    taps. `image_features` takes one in place of pixels: the tap cache (engine/tapcache.py) feeds its
    stored rows so, through the method's forward (and DDP's wrapper) unchanged. `feat` None: computed
    from the last tap (`Ladder._image_feature`)."""
    feat: Optional[torch.Tensor]
    taps: List[torch.Tensor]

    def to(self, device) -> "FrozenImage":
        return FrozenImage(None if self.feat is None else self.feat.to(device), [t.to(device) for t in self.taps])


def _mlp_half(blk, s):
    return s + blk.mlp(blk.layer_norm2(s))


def _mlp_checkpointed(blk, s, mask):
    """blk(s, mask) (a CLIPEncoderLayer) with its MLP half recomputed in backward from that half's input
    (recompute='mlp'): faster than recomputing the whole block (recompute='block'), which keeps the
    step's peak lower (docs/int8.md has both)."""
    h, _ = blk.self_attn(hidden_states=blk.layer_norm1(s), attention_mask=mask)  # APT's hooks run here
    return checkpoint(_mlp_half, blk, s + h, use_reentrant=False)


class Ladder(PromptMethod):
    name = "ladder"
    # Ablations (the defaults are the ladder as designed; checkpoints record the three in their config):
    # - share: true, one side network for both modalities (width d = D_vision / r); false, the text side
    #   has its own blocks and final LayerNorm, pruned from the tapped text layers at its own width
    #   d_t = D_text / r (text and vision widths differ, e.g. 512 and 768 in ViT-B/16, and a side block
    #   keeps its CLIP layer's head count), with its own down-projection, fusions, up-projection and
    #   text prompts of width d_t; the reduction must then divide the text width and head dim too.
    # - init: pruned, side blocks, final LayerNorm, down-projections and fusions start as pruned CLIP
    #   (the selection of the kept channels); random, the same shapes initialised as new layers are
    #   (nn.Linear's default, LayerNorm at one and zero), drawn from torch's generator, which `train`
    #   seeds with --seed. The up-projections start at zero either way (training starts at zero-shot CLIP).
    # - fusion: gated, lk.nn.GatedLadderFusion (mu s + (1 - mu) (W tap + b)); sum, side.SumFusion
    #   (s + W tap + b, no gate; plain torch, so no tap_dtype).
    defaults = {"blocks": 0, "reduction": 4, "ctx_init": TEMPLATE_INIT, "n_visual": 4, "rank": 1,
                "scale": 1.0, "tap_dtype": "", "apt": False, "apt_prompts": 16, "apt_rank": 4,
                "importance": "magnitude", "checkpoint": True, "recompute": "auto", "frozen_chunk": "auto",
                "frozen": "fp32", "share": True, "init": "pruned", "fusion": "gated", "tap_cache": "off",
                "tap_cache_dtype": "auto"}
    options = {"blocks": Int(0, MAX_BLOCKS), "reduction": Int(1, MAX_TOKENS), "ctx_init": Text(),
               "n_visual": Int(1, MAX_TOKENS), "rank": Int(1, MAX_TOKENS), "scale": Float(-1e6, 1e6),
               "tap_dtype": Choice(("", "e4m3", "e5m2")), "apt": Bool(), "apt_prompts": Int(1, MAX_TOKENS),
               "apt_rank": Int(1, MAX_TOKENS), "importance": Choice(("magnitude", "fisher")),
               "checkpoint": Bool(), "recompute": Choice(("auto", "block", "mlp")),
               "frozen_chunk": AutoOr(Int(0, 1 << 20)), "frozen": Choice(Q.FROZEN), "share": Bool(),
               "init": Choice(("pruned", "random")), "fusion": Choice(("gated", "sum")),
               "tap_cache": TapCacheViews(), "tap_cache_dtype": Choice(TAP_CACHE_DTYPES)}
    sized_by = (("visual.base", 0, "n_visual"), ("visual.lowrank_a", 1, "rank"), ("txt_a", 1, "rank"),
                ("ln.weight", 0, "reduction"), ("apt.0.prompts", 0, "apt_prompts"), ("apt.0.w1", 0, "apt_rank"),
                ("ln_t.weight", 0, "share"))

    added_later = ("txt_center", "txt_center_steps")  # zero: no centring, as such checkpoints trained

    @classmethod
    def expected_size(cls, cfg, option, backbone):
        if option in ("reduction", "share"):  # the side width: the vision side's, the text side's of its own
            if option == "share" and cfg["share"]:
                return None
            width = backbone.get("vision_width" if option == "reduction" else "text_width")
            return width // cfg["reduction"] if isinstance(width, int) else None
        if option.startswith("apt_") and not cfg["apt"]:
            return None
        return cfg[option]

    def setup(self):
        b, c = self.backbone, self.cfg
        r = c["reduction"]
        heads = b.clip.config.vision_config.num_attention_heads
        if b.vision_width % r or (b.vision_width // heads) % r:
            raise ValueError(f"ladder: reduction must divide the vision width {b.vision_width} and the head "
                             f"dim {b.vision_width // heads}, got {r}")
        t_heads = b.clip.config.text_config.num_attention_heads
        if not c["share"] and (b.text_width % r or (b.text_width // t_heads) % r):
            raise ValueError(f"ladder: with share=false, reduction must also divide the text width {b.text_width} "
                             f"and its head dim {b.text_width // t_heads}, got {r}")
        if c["init"] == "random" and c["importance"] == "fisher":
            raise ValueError("ladder: importance=fisher chooses which CLIP channels to prune; it needs init=pruned")
        if c["fusion"] == "sum" and c["tap_dtype"]:
            raise ValueError("ladder: tap_dtype keeps the tap in float8 inside lk.gated_fusion; it needs "
                             "fusion=gated")
        if Q.is_int8(b):  # the side network is pruned from CLIP's fp32 weights, which int8 has freed
            raise ValueError("ladder: this backbone is already int8 (another ladder method quantised it); "
                             "build the ladder on an fp32 backbone")
        if c["frozen"] == "int8":  # refused before anything is built, not at the first step
            Q.check_available(b)
        k = c["blocks"] or max(1, (b.vision_layers + 1) // 2)
        if not 1 <= k <= min(b.vision_layers, b.text_layers):
            raise ValueError(f"ladder: blocks must be in 1..{min(b.vision_layers, b.text_layers)}, got {k}")
        d = b.vision_width // r
        d_t = d if c["share"] else b.text_width // r  # the text side's width
        self.v_layers, self.t_layers = S.evenly_spaced(b.vision_layers, k), S.evenly_spaced(b.text_layers, k)
        self._build_side(S.magnitude)
        self.ctx_ids = init_tokens(b, c["ctx_init"], 4)
        self.txt_a = nn.Parameter(torch.zeros(len(self.ctx_ids), c["rank"], device=b.device))
        self.txt_b = nn.Parameter(torch.randn(c["rank"], d_t, device=b.device) / d_t ** 0.5)
        self.visual = lk.nn.LowRankPrompt(torch.randn(c["n_visual"], d, device=b.device) * 0.02,
                                          rank=c["rank"], scale=c["scale"])
        self.register_buffer("txt_center", torch.zeros(d_t, device=b.device))
        self.register_buffer("txt_center_steps", torch.zeros((), dtype=torch.long, device=b.device))

    def _side_stack(self, layers, at, keep, final_ln, score):
        """Side blocks from CLIP's `layers` at indices `at` and a final LayerNorm, all of width len(keep):
        pruned to the channels `keep` (init=pruned) or new layers of that shape (init=random)."""
        b, r, pruned = self.backbone, self.cfg["reduction"], self.cfg["init"] == "pruned"
        blocks = nn.ModuleList(S.prune_layer(layers[i], keep, r, score) if pruned else
                               S.fresh_layer(layers[i], len(keep), r) for i in at)
        ln = nn.LayerNorm(len(keep), eps=final_ln.eps, device=b.device)
        if pruned:
            with torch.no_grad():
                ln.weight.copy_(final_ln.weight[keep])
                ln.bias.copy_(final_ln.bias[keep])
        return blocks, ln

    def _fusion(self, width, d, tap_dtype):
        b = self.backbone
        if self.cfg["fusion"] == "sum":
            return S.SumFusion(width, d, device=b.device)
        return lk.nn.GatedLadderFusion(width, d, tap_dtype=tap_dtype, device=b.device)

    def _build_side(self, score):
        """Side blocks, final LayerNorm(s), down/up-projections and fusions, from CLIP pruned by `score`
        (or of the same shapes, initialised anew, with init=random)."""
        b, c = self.backbone, self.cfg
        r, k = c["reduction"], len(self.v_layers)
        vlayers, tlayers = b.clip.vision_model.encoder.layers, b.clip.text_model.encoder.layers
        keep_v = S.top_indices(S.residual_importance([vlayers[i] for i in self.v_layers], score), b.vision_width // r)
        if c["share"]:  # the text taps project into the shared stream's channels
            keep_t = S.top_indices(S.residual_importance(tlayers, score), b.vision_width // r)
        else:  # the text side's own channels, chosen over the layers its blocks come from
            keep_t = S.top_indices(S.residual_importance([tlayers[i] for i in self.t_layers], score), b.text_width // r)
        self.blocks, self.ln = self._side_stack(vlayers, self.v_layers, keep_v, b.clip.vision_model.post_layernorm,
                                                score)
        if not c["share"]:
            self.blocks_t, self.ln_t = self._side_stack(tlayers, self.t_layers, keep_t,
                                                        b.clip.text_model.final_layer_norm, score)
        tap_dtype = {"": None, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[c["tap_dtype"]]
        for mod, keep, width in (("v", keep_v, b.vision_width), ("t", keep_t, b.text_width)):
            d = len(keep)
            down = nn.Linear(width, d, bias=False, device=b.device)
            fuse = nn.ModuleList(self._fusion(width, d, tap_dtype) for _ in range(k))
            if c["init"] == "pruned":
                with torch.no_grad():
                    down.weight.copy_(S.selection(keep, width))
                    for f in fuse:
                        f.weight.copy_(S.selection(keep, width))
                        f.bias.zero_()
            up = nn.Linear(d, b.embed_dim, bias=False, device=b.device)
            nn.init.zeros_(up.weight)
            setattr(self, f"down_{mod}", down)
            setattr(self, f"fuse_{mod}", fuse)
            setattr(self, f"up_{mod}", up)
            setattr(self, f"gate_{mod}", nn.Parameter(torch.zeros((), device=b.device)))
        if c["apt"]:  # per block, so nothing is added to the blocks' ModuleList itself
            blocks = list(self.blocks) + (list(self.blocks_t) if not c["share"] else [])
            self.apt = nn.ModuleList(p for blk in blocks for p in attach(blk, c["apt_prompts"], c["apt_rank"], 0.0))

    def calibrate(self, batches) -> None:
        """With importance='fisher', re-prune the side network by the squared gradients of the zero-shot
        loss over `batches` (called by the trainer before the optimizer exists, never on resume)."""
        if self.cfg["importance"] == "fisher":
            self._build_side(S.fisher_scores(self.backbone, self.classnames, batches))

    def build_text(self, classnames):
        self.layout = text_layout(self.backbone, classnames, self.ctx_ids)

    def _frozen(self):
        """The backbone for a frozen forward and the context to run it in: with frozen='int8' quantised on
        first use, and with autocast off (int8 is that forward's precision; torch's int8 Linear takes fp32)."""
        if self.cfg["frozen"] != "int8":
            return self.backbone, contextlib.nullcontext()
        Q.quantize_backbone(self.backbone)
        return self.backbone, torch.autocast(self.backbone.device.type, enabled=False)

    def _frozen_text(self):
        lay = self.layout
        taps_at = [0] + [i + 1 for i in self.t_layers]

        def run():
            frozen, ctx = self._frozen()
            with ctx, FZ.text_encoder(frozen):  # int8: on disk again once the taps are cached
                return frozen.encode_text(lay.ids, taps=taps_at)
        return self.cached("text", run)

    # The three steps below are methods so that the plain-PyTorch peer (the `lst` method, lst.py) can swap
    # in unfused versions of exactly these, and nothing else.
    def fuse(self, f: nn.Module, s: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        # f: lk.nn.GatedLadderFusion, or side.SumFusion with fusion=sum. Either detaches the tap and, under
        # autocast, casts tap, weight and bias to the state's dtype.
        return f(s, tap)

    def text_prompts(self, s0: torch.Tensor) -> torch.Tensor:
        """[start, base + A B, rest] per class; base = the down-projected init tokens."""
        n = self.layout.n_ctx
        return lk.assemble_prompts(s0[:, :1], s0[:, 1 + n:], s0[:, 1:1 + n], self.txt_a.to(s0.dtype),
                                   self.txt_b.to(s0.dtype), self.cfg["scale"])

    def visual_prompts(self, s0: torch.Tensor) -> torch.Tensor:
        """[CLS, visual prompts, patches] per image."""
        return self.visual(s0[:, :1], s0[:, 1:])

    def _recompute(self) -> str:
        """What a checkpointed side block recomputes in backward: 'block' (all of it from its input: the
        least memory, the fp32 default) or 'mlp' (its MLP half: the int8 default, whose int8 backbone
        leaves room; see _mlp_checkpointed)."""
        r = self.cfg["recompute"]
        return r if r != "auto" else ("mlp" if self.cfg["frozen"] == "int8" else "block")

    def _side(self, s, taps, fuse, mask, rows=None, text=False):
        """`taps`: a list of its own, emptied as it goes, so a tap autograd keeps packed is freed. `text`:
        the text side, which runs its own blocks with --opt share=false."""
        blocks, ln = (self.blocks_t, self.ln_t) if text and not self.cfg["share"] else (self.blocks, self.ln)
        for blk, f in zip(blocks, fuse):
            tap = taps.pop(0)
            if rows is None:
                s = self.fuse(f, s, tap)
            else:  # prompt tokens have no tap: fuse only the rows that do
                a, b = rows
                fused = self.fuse(f, torch.cat([s[:, :a], s[:, b:]], 1), tap)
                s = torch.cat([fused[:, :a], s[:, a:b], fused[:, a:]], 1)
            if self.cfg["checkpoint"] and torch.is_grad_enabled():
                s = _mlp_checkpointed(blk, s, mask) if self._recompute() == "mlp" else \
                    checkpoint(blk, s, mask, use_reentrant=False)
            else:
                s = blk(s, mask)
        return ln(s)

    def _blend(self, clip_feat, side_pooled, up, gate):
        g = torch.sigmoid(gate)
        return (1 - g) * clip_feat + g * up(side_pooled).to(clip_feat.dtype)

    def text_features(self):
        lay = self.layout
        clip_feat, taps = self._frozen_text()
        s = self.text_prompts(self.down_t(taps[0].to(self.down_t.weight.dtype)))
        s = self._side(s, taps[1:], self.fuse_t, self.backbone.causal_mask(s.shape[1], s), text=True)
        pooled = s[torch.arange(s.shape[0], device=s.device), lay.eot]
        return self._blend(clip_feat, pooled - self._text_center(pooled), self.up_t, self.gate_t)

    def _text_center(self, pooled: torch.Tensor) -> torch.Tensor:
        """The running mean of the pooled text state over the training classes (module docstring), updated
        by a training forward: the mean itself at the first step, then weight max(1 / (n + 1), 0.1)."""
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # the weight stays a tensor: reading the count would sync a GPU every step
                w = (1.0 / (self.txt_center_steps + 1)).clamp_min(CENTER_MOMENTUM)
                self.txt_center.lerp_(pooled.float().mean(0), w)
                self.txt_center_steps += 1
        return self.txt_center.to(pooled.dtype)

    def _chunk(self, x: torch.Tensor) -> int:
        chunk = self.cfg["frozen_chunk"]
        if chunk == "auto":  # a GPU has memory to spare for the frozen forward, and wants wide GEMMs
            chunk = 0 if x.is_cuda else FROZEN_CHUNK_CPU
        return chunk or len(x)

    def _image_feature(self, last: torch.Tensor) -> torch.Tensor:
        """CLIP's image feature from the last layer's output (the last tap: evenly_spaced ends with it), in
        the chunks `_frozen_image` runs: the projection's last bits depend on its row count, so a cached
        fp32 tap gives the uncached run's feature exactly."""
        frozen, ctx = self._frozen()
        vm = frozen.clip.vision_model
        with torch.no_grad(), ctx:
            return torch.cat([frozen.clip.visual_projection(vm.post_layernorm(c[:, 0]))
                              for c in last.split(self._chunk(last))])

    def _frozen_image(self, pixels):
        """CLIP's image features and the side network's taps, under no_grad, `frozen_chunk` images at a
        time: the encoder's own intermediates (its MLP is 4x wide) then exist for one chunk only, while
        the taps are the same. Nothing is kept for backward either way, so chunks only trade speed."""
        at = [0] + [i + 1 for i in self.v_layers]
        frozen, ctx = self._frozen()
        chunks = pixels.split(self._chunk(pixels))
        with torch.no_grad(), ctx:
            if self.cfg["frozen"] == "int8":  # CPU only: chunks on threads (frozen.map_chunks)
                parts = FZ.map_chunks(lambda c: frozen.encode_image(c, taps=at), chunks)
            else:
                parts = [frozen.encode_image(c, taps=at) for c in chunks]
            if len(parts) == 1:
                return parts[0]
            feats, taps = torch.cat([p[0] for p in parts]), []
            for i in range(len(at)):  # one tap at a time, freeing its chunks as it goes
                taps.append(torch.cat([p[1][i] for p in parts]))
                for p in parts:
                    p[1][i] = None
        return feats, taps

    def frozen_image(self, pixels: torch.Tensor) -> FrozenImage:
        """The frozen part of `image_features`: what the tap cache stores per image and view."""
        return FrozenImage(*self._frozen_image(pixels))

    def tap_identity(self) -> dict:
        """What decides the frozen image forward's output bits besides the model and the pixels (the tap
        cache's key): the tapped layers, the frozen encoder's precision and its chunking."""
        return {"taps_at": [0] + [i + 1 for i in self.v_layers], "frozen": self.cfg["frozen"],
                "frozen_chunk": self.cfg["frozen_chunk"]}

    def image_features(self, pixels):
        """Pixels, or a FrozenImage (the tap cache's rows): only the side network runs then."""
        clip_feat, taps = pixels if isinstance(pixels, FrozenImage) else self._frozen_image(pixels)
        if clip_feat is None:  # a cache without the feature: computed from the last tap, as uncached
            clip_feat = self._image_feature(taps[-1])
        taps = list(taps)  # emptied as the side network goes; a cached batch's list stays whole
        # int8: the taps kept for backward in bf16 (frozen.saved_in_bf16); fp32 keeps them as they are
        with FZ.saved_in_bf16(taps if self.cfg["frozen"] == "int8" else ()):
            s = self.visual_prompts(self.down_v(taps.pop(0).to(self.down_v.weight.dtype)))
            s = self._side(s, taps, self.fuse_v, None, rows=(1, 1 + self.cfg["n_visual"]))
        return self._blend(clip_feat, s[:, 0], self.up_v, self.gate_v)

    def inference_state(self) -> dict:
        """The image side for an export (engine/bundle.py): the side blocks, the vision fusions and projections,
        the visual prompt merged (LowRankPrompt.merge), the ladder's APT per block ("apt.<block>.*"), and
        how they run; the text side is the stored class features."""
        keep = ("blocks.", "ln.", "down_v.", "fuse_v.", "up_v.", "gate_v", "apt.")
        tensors = {k: v for k, v in self.state_to_save().items() if k.startswith(keep)}
        tensors["visual"] = self.visual.merge()
        blk = self.blocks[0]
        info = {"v_layers": list(self.v_layers), "width": self.ln.normalized_shape[0], "n_visual": self.cfg["n_visual"],
                "heads": blk.self_attn.num_heads, "intermediate": blk.mlp.fc1.out_features,
                "act": blk.mlp.config.hidden_act, "eps": blk.layer_norm1.eps, "ln_eps": self.ln.eps,
                "temperature": self.fuse_v[0].temperature, "frozen_chunk": self.cfg["frozen_chunk"],
                "apt": self.cfg["apt"], "apt_prompts": self.cfg["apt_prompts"], "apt_rank": self.cfg["apt_rank"]}
        return {"kind": "ladder", "tensors": tensors, "info": info}


class LadderAPT(Ladder):
    name = "ladder+apt"
    defaults = {**Ladder.defaults, "apt": True}
