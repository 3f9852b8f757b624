"""What trains behind a task's prompt: an input prompt or a deep prompt, plain or reparameterised.

Every trainable prompt is an ``nn.Module`` whose ``forward()`` returns the tensor the objective
reads, and :func:`collapse` turns it into the plain tensor a prompt file holds:

- method ``prompt``: (P, d) input embeddings: :class:`~softprompt.prompt.SoftPrompt`, or
  :class:`ResidualPrompt` (``--reparam residual``, Razdaibiedina et al. 2023);
- method ``prefix``: a deep prompt (layers, 2, kv_heads, P, head_dim), per layer the keys ([:, 0],
  post-rotary) and values ([:, 1]) of P virtual tokens, as the HF cache holds them:
  :class:`~softprompt.methods.deep_prompt.DeepPrompt`, :class:`MLPPrefix` (``--reparam mlp``, Li & Liang 2021) or
  :class:`ScaledPrefix` (``--reparam scaled``: steps relative to each layer's key/value size).

A deep prompt starts from the keys/values of real tokens: the input-prompt init (any ``--init``)
runs through the model once (``methods.deep_prompt.deep_init``). A reparameterisation only changes how the
prompt is trained; it is collapsed before saving, so files, export and serving never see it.

Not here: what each method is and how it starts (methods/), reading sources after a deep prompt
(prefix.py), the file format (artifact/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError
from .methods import method as get_method
from .model import PromptedModel


def _fp32(fn):
    """Run a reparameterisation in float32 even under autocast, so the training-time prompt is
    exactly the collapsed one (the MLP's own matmuls would otherwise run in bf16)."""
    def wrapper(self):
        with torch.autocast(next(self.parameters()).device.type, enabled=False):
            return fn(self)
    return wrapper


class MLPPrefix(nn.Module):
    """Li & Liang's reparameterisation: prefix = MLP(E), E (P, d) a small trainable embedding,
    MLP = Linear(d, h) -> tanh -> Linear(h, layers·2·H·hd). Optimising through the MLP is more stable
    than optimising the prefix directly; the MLP is dropped after training (only MLP(E) is saved).

    Init: E is the input-prompt init; the last layer is solved by least squares so that MLP(E)
    starts exactly at ``kv`` (the real tokens' keys/values), so every ``--init`` means the same
    starting prefix with and without the MLP.
    """

    def __init__(self, emb: torch.Tensor, kv: torch.Tensor, hidden: int):
        super().__init__()
        self.shape = tuple(kv.shape)  # (L, 2, H, P, hd)
        L, _, H, P, hd = self.shape
        self.emb = nn.Parameter(emb.detach().to(torch.float32).clone())  # (P, d)
        self.up = nn.Linear(emb.shape[1], hidden)
        self.out = nn.Linear(hidden, L * 2 * H * hd)
        with torch.no_grad():
            target = kv.to(torch.float32).permute(3, 0, 1, 2, 4).reshape(P, -1)  # (P, L·2·H·hd)
            h = torch.tanh(self.up(self.emb))  # (P, h)
            self.out.bias.copy_(target.mean(0))
            self.out.weight.copy_((torch.linalg.pinv(h) @ (target - target.mean(0))).T)  # (L·2·H·hd, h)

    @_fp32
    def forward(self) -> torch.Tensor:
        L, _, H, P, hd = self.shape
        flat = self.out(torch.tanh(self.up(self.emb)))  # (P, L·2·H·hd)
        return flat.view(P, L, 2, H, hd).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, hd)


class ResidualPrompt(nn.Module):
    """Residual Prompt Tuning (Razdaibiedina et al. 2023): prompt = LayerNorm(MLP(W)) + W with a
    bottleneck MLP = Linear(d, h) -> ReLU -> Linear(h, d), trained jointly with W (P, d).

    One change from the paper: the LayerNorm's gain starts at 0, so training starts exactly at the
    ``--init`` prompt. With the usual gain 1 the residual branch adds a unit-RMS vector to every
    token, ~7x a real token embedding of SmolLM2-135M (RMS 0.13; T5's, the paper's model, are far
    larger), which buried the label init (README › Deep prompts, tweet-sentiment: dev accuracy
    0.37 / 0.43 at 20 / 60 steps with gain 1, 0.54 / 0.47 with gain 0).
    """

    def __init__(self, weight: torch.Tensor, hidden: int):
        super().__init__()
        d = weight.shape[1]
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())  # (P, d)
        self.down = nn.Linear(d, hidden)
        self.up = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        nn.init.zeros_(self.norm.weight)  # the branch starts silent; the gain learns its scale

    @_fp32
    def forward(self) -> torch.Tensor:
        return self.norm(self.up(torch.relu(self.down(self.weight)))) + self.weight  # (P, d)


class ScaledPrefix(nn.Module):
    """A deep prompt trained in units of each layer's own key/value size: prefix = theta * s, with
    s (layers, 2, 1, 1, 1) the RMS of each layer's initial keys and values (fixed) and theta trained.

    Adam moves every element by about lr per step whatever its size. The keys/values of a deep
    prompt differ in size by layer and side by ~30x (SmolLM2-135M: values RMS 0.04 at layer 0,
    1.4 at layer 29; keys ~2), so one lr is a huge relative step for some layers and a negligible
    one for others. Here a step moves each layer's keys and values by about lr of their own RMS.
    """

    def __init__(self, kv: torch.Tensor):
        super().__init__()
        kv = kv.detach().to(torch.float32)  # (L, 2, H, P, hd)
        scale = kv.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt().clamp_min(1e-6)  # (L, 2, 1, 1, 1)
        self.register_buffer("scale", scale)
        self.theta = nn.Parameter(kv / scale)  # (L, 2, H, P, hd), RMS 1 per layer and side

    @_fp32
    def forward(self) -> torch.Tensor:
        return self.theta * self.scale  # (L, 2, H, P, hd)


@dataclass(frozen=True)
class Reparam:
    """A reparameterisation: the method it applies to, its default hidden width and learning rate, its builder."""

    method: str
    hidden: int
    lr: float | None
    """Default --lr (None: the method's)."""
    build: Callable[[torch.Tensor, torch.Tensor, int], nn.Module]
    """``(input-prompt init (P, d), the method's start: that init, or the deep init (L, 2, H, P, hd), hidden) -> module``."""


REPARAMS: dict[str, Reparam] = {
    "mlp": Reparam("prefix", 512, 1e-3, lambda emb, kv, h: MLPPrefix(emb, kv, h)),
    "residual": Reparam("prompt", 400, None, lambda emb, kv, h: ResidualPrompt(emb, h)),
    "scaled": Reparam("prefix", 0, 0.01, lambda emb, kv, h: ScaledPrefix(kv)),
}
"""``--reparam`` choices by name (Li & Liang use 512 for the prefix MLP; Razdaibiedina et al. a
bottleneck of a few hundred). One Adam step moves each of the prefix MLP's outputs by up to ~lr·h
(h weights of the last layer each move by ~lr), a plain prefix element by ~lr, hence the MLP's own
small default lr (at 0.1 it diverged). ``scaled`` has no hidden layer: its lr is a step relative to
each layer's key/value RMS."""


def build_prompt(pm: PromptedModel, init: torch.Tensor, method: str = "prompt", reparam: str | None = None,
                 hidden: int | None = None, seed: int = 0) -> nn.Module:
    """The trainable prompt of one task, on the base's device.

    Args:
        init: the input-prompt init (P, d), from ``SoftPrompt.initialize``.
        method: a key of :data:`~softprompt.methods.METHODS`.
        reparam: a key of :data:`REPARAMS` for ``method``, or None.
        hidden: the reparameterisation's hidden width (default: its own).
        seed: seeds the reparameterisation's weights.
    """
    m = get_method(method, "--method")
    dev = pm.base.device
    start = init if m.start is None else m.start(pm, init)  # (P, d), or the method's own start
    if reparam is None:
        return m.trainable(start, dev)
    r = REPARAMS[reparam]
    if get_method(r.method) is not m:
        raise ConfigError(f"--reparam {reparam} applies to --method {r.method}, not {method}")
    with torch.random.fork_rng(devices=[]):  # built on the CPU from its own seed, then moved
        torch.manual_seed(seed)
        return r.build(init.cpu(), start.cpu(), hidden or r.hidden).to(dev)


@torch.no_grad()
def collapse(module: nn.Module) -> torch.Tensor:
    """The plain prompt a trainable prompt stands for: (P, d) or (L, 2, H, P, hd), float32, detached."""
    return module().detach().to(torch.float32).clone()


def prompt_length(prompt: torch.Tensor) -> int:
    """P of an input prompt (P, d) or a deep prompt (L, 2, H, P, hd)."""
    return int(prompt.shape[3] if prompt.dim() == 5 else prompt.shape[0])
