"""APTPrompt: APT's approximated prompt attention for one attention layer (docs/design.md, section 3), and
attach_apt, which puts one beside every attention module of a transformer through forward hooks."""
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from ..ops.apt_diffusion import apt_diffusion


class APTPrompt(nn.Module):
    """out = exp(s) (Y + w (dropout(relu(H Kt^T)) P)),  Kt = P + (P W1^T) W2^T  (see lk.apt_diffusion).

    APT's initialisation: P ~ N(0, 0.02), W1 ~ N(0, 1), W2 = 0 (so Kt = P at first), s = 0. Dropout on
    the activation acts in training mode only.
    """

    def __init__(self, dim: int, num_prompts: int = 50, rank: int = 4, dropout: float = 0.0,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("num_prompts", num_prompts, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"APTPrompt: argument '{name}' must be an int >= {low}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"APTPrompt: argument 'dropout' must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_prompts, self.rank = dim, num_prompts, rank
        self.dropout, self.backend = float(dropout), backend
        self.prompts = nn.Parameter(torch.empty(num_prompts, dim, **factory))
        self.w1 = nn.Parameter(torch.empty(rank, dim, **factory))
        self.w2 = nn.Parameter(torch.empty(dim, rank, **factory))
        self.log_scale = nn.Parameter(torch.zeros((), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.prompts, std=0.02)
        nn.init.normal_(self.w1, std=1.0)
        nn.init.zeros_(self.w2)
        nn.init.zeros_(self.log_scale)

    def forward(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """out in hidden's dtype. Under autocast the activations can be bf16/fp16 while the parameters are
        fp32; the op wants one dtype, so attn_out, P, W1 and W2 are cast to hidden's (differentiably)."""
        dt = hidden.dtype
        return apt_diffusion(hidden, attn_out.to(dt), self.prompts.to(dt), self.w1.to(dt), self.w2.to(dt),
                             self.log_scale, dropout=self.dropout if self.training else 0.0, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_prompts={self.num_prompts}, rank={self.rank}, dropout={self.dropout}"


def is_attention(module: nn.Module) -> bool:
    """Hugging Face's attention modules (CLIPAttention and kin): q_proj, k_proj, v_proj and out_proj."""
    return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj"))


def _width(module: nn.Module) -> int:
    for attr in ("embed_dim", "hidden_size"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    q = getattr(module, "q_proj", None)
    if isinstance(getattr(q, "in_features", None), int):
        return q.in_features
    raise ValueError(f"attach_apt: cannot tell the width of {type(module).__name__} (no embed_dim, hidden_size "
                     "or q_proj.in_features); give it an embed_dim attribute")


def _first_param(module: nn.Module):
    return next(module.parameters(), None)


class APTAttachment(nn.ModuleList):
    """The APTPrompt modules attach_apt created (in module order), with the hooks that run them.
    `.names` lists the attention modules they serve; `.remove()` takes the hooks off and the prompts
    out of the model."""

    def __init__(self, modules, names, handles, owner: nn.Module, attr: str):
        super().__init__(modules)
        self.names = list(names)
        self.handles = list(handles)
        self._owner = [owner]  # a list, so the model is not registered as a child of its own attachment
        self._attr = attr

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        owner = self._owner[0]
        if getattr(owner, self._attr, None) is self:
            delattr(owner, self._attr)


def _hook(apt: APTPrompt):
    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"attach_apt: {type(module).__name__} was called without a hidden_states tensor "
                            "(positional or keyword)")
        if isinstance(output, tuple):
            return (apt(hidden, output[0]),) + output[1:]
        return apt(hidden, output)

    return hook


def attach_apt(model: nn.Module, num_prompts: int = 50, rank: int = 4, dropout: float = 0.0,
               predicate: Optional[Callable[[nn.Module], bool]] = None, backend: Optional[str] = None,
               attr: str = "apt_prompts") -> APTAttachment:
    """Put an APTPrompt beside every attention module of `model` for which `predicate` holds (default:
    `is_attention`, Hugging Face's CLIPAttention). A forward hook replaces the module's output (the first
    element of its output tuple, or the tensor) by APT(hidden_states, attention output), where
    hidden_states is the module's input. The prompts are registered on the model as `model.<attr>`, so
    they appear in .parameters() and state_dict(); freeze the backbone yourself. Returns the attachment
    (an nn.ModuleList of the APTPrompt modules, with .remove())."""
    predicate = predicate or is_attention
    if hasattr(model, attr):
        raise ValueError(f"attach_apt: the model already has an attribute {attr!r}; remove it or pass another attr")
    found = [(name, m) for name, m in model.named_modules() if predicate(m)]
    if not found:
        raise ValueError("attach_apt: no module of the model matches the predicate (default: modules with "
                         "q_proj, k_proj, v_proj and out_proj)")
    prompts, handles = [], []
    for _, m in found:
        ref = _first_param(m)
        apt = APTPrompt(_width(m), num_prompts, rank, dropout, backend=backend,
                        device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        prompts.append(apt)
        handles.append(m.register_forward_hook(_hook(apt), with_kwargs=True))
    attachment = APTAttachment(prompts, [n for n, _ in found], handles, model, attr)
    model.add_module(attr, attachment)
    return attachment
