"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One ``.safetensors`` file, written atomically (so a run killed mid-write leaves the previous
checkpoint intact): tensors for the prompts (float32), the best prompts so far, the optimizer state
and the RNG states; JSON metadata for the step, the early-stopping state, the optimizer's scalar
settings and the settings of the run that wrote it. Data only: no pickle, nothing executes on load.

Not here: what is saved when (loop.py), the final prompt file (artifact/).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifact import atomic_write_bytes, read_safetensors, safetensors_bytes
from ..errors import ConfigError, PromptFileError

CHECKPOINT_FORMAT = "softprompt-checkpoint/1"


@dataclass
class TrainState:
    """The state of a run after ``step`` optimizer steps."""

    step: int
    """Optimizer steps completed; the data order is a pure function of it (schedule.py)."""
    names: list[str]
    """Task names, in prompt order."""
    prompts: list[torch.Tensor]
    """The trainable tensors of the prompts, float32, in optimizer order: one (P, d) per plain prompt,
    more per reparameterised one (trainable.py)."""
    best_prompts: list[torch.Tensor]
    """Best (plain) prompt of each task so far by its dev metric (the current one when there is no dev set)."""
    optimizer: dict
    """``optimizer.state_dict()``."""
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    """Torch RNG states ("cpu", "cuda:0", ...)."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able: examples seen, best metrics, evals without improvement, elapsed time, settings."""


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = t
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_bytes(state: TrainState) -> bytes:
    """Serialize a training state (safetensors bytes)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(state.prompts):
        tensors[f"prompt.{i}"] = p.detach().to("cpu", torch.float32).contiguous()
    for i, b in enumerate(state.best_prompts):
        tensors[f"best.{i}"] = b.detach().to("cpu", torch.float32).contiguous()
    opt_tensors, opt_meta = _split_optimizer(state.optimizer)
    tensors.update(opt_tensors)
    for k, v in state.rng.items():
        tensors[f"rng.{k}"] = v.detach().cpu().contiguous()
    meta = {"format": CHECKPOINT_FORMAT, "step": state.step, "names": state.names, "optimizer": opt_meta,
            "info": state.info, "params": len(state.prompts)}
    return safetensors_bytes(tensors, {"softprompt_checkpoint": json.dumps(meta)})


def save_checkpoint(path: str | os.PathLike, state: TrainState) -> Path:
    """Write a checkpoint atomically (temp file + fsync + rename); returns its path."""
    atomic_write_bytes(path, checkpoint_bytes(state))
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> TrainState:
    """Read a checkpoint; raises :class:`ConfigError` (``--resume``) naming the problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--resume: no checkpoint at {p}")
    try:
        tensors, header = read_safetensors(p.read_bytes(), str(p))
        meta = json.loads(header["softprompt_checkpoint"])
    except PromptFileError as e:
        raise ConfigError(f"--resume: {p} is not a readable softprompt checkpoint ({str(e).removeprefix(f'{p}: ')})") from None
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--resume: {p} is not a readable softprompt checkpoint ({type(e).__name__})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resume: {p} has checkpoint format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    n = len(meta["names"])
    try:
        prompts = [tensors[f"prompt.{i}"] for i in range(int(meta.get("params", n)))]
        best = [tensors[f"best.{i}"] for i in range(n)]
    except KeyError as e:
        raise ConfigError(f"--resume: {p} lacks tensor {e.args[0]}") from None
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return TrainState(step=int(meta["step"]), names=list(meta["names"]), prompts=prompts, best_prompts=best,
                      optimizer=_join_optimizer(tensors, meta["optimizer"]), rng=rng, info=meta["info"])


def rng_states() -> dict[str, torch.Tensor]:
    """The torch RNG states of this process (CPU and every CUDA device)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda:{i}"] = s
    return out


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        cuda = [states[k] for k in sorted(states) if k.startswith("cuda:")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def state_digest(state: TrainState) -> str:
    """A short hash of a checkpoint's step and prompts (ranks compare it on resume)."""
    import hashlib

    h = hashlib.sha256(f"{state.step}:{','.join(state.names)}".encode())
    for p in state.prompts:
        h.update(p.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the loop's state <-> a checkpoint


@dataclass
class LoopState:
    """What the training loop carries from one step to the next; the one place where it is written
    to a checkpoint (:meth:`to_checkpoint`) and read back (:meth:`from_checkpoint`), so the two
    cannot drift apart."""

    best_prompts: list[torch.Tensor]
    """Best plain prompt of each task so far ((P, d) or deep), by its dev metric."""
    step: int = 0
    """Optimizer steps completed."""
    examples: int = 0
    """Training rows processed (all processes)."""
    elapsed: float = 0.0
    """Wall time of the loop so far, evaluation included (s)."""
    train_time: float = 0.0
    """Time in training steps only (s): the throughput's denominator."""
    best: dict[str, dict] = field(default_factory=dict)
    """Task name -> its best dev result: metric, value, step, metrics, rank."""
    bad_evals: int = 0
    """Evaluations in a row without improvement (early stopping)."""
    stopped: bool = False
    """Early stopping said stop (never saved: a stopped run is finished)."""
    out_of_time: bool = False
    """The --max-time budget stopped the run (not saved: a resumed run asks its own budget)."""
    halted: bool = False
    """``train(on_eval=...)`` said stop (never saved, like ``stopped``)."""

    @classmethod
    def fresh(cls, params: list[torch.Tensor]) -> "LoopState":
        """The state before step 0: the initial prompts are the best so far."""
        return cls(best_prompts=[p.detach().clone() for p in params])

    def to_checkpoint(self, names: list[str], params: list[torch.Tensor], optimizer, scaler, settings: dict,
                      data: str, finished: bool = False, plan: dict | None = None) -> TrainState:
        """This state with the prompts, optimizer, grad scaler and RNG: what a checkpoint holds."""
        st = TrainState(step=self.step, names=names, prompts=[p.detach() for p in params],
                        best_prompts=self.best_prompts, optimizer=optimizer.state_dict(), rng=rng_states(),
                        info={"examples": self.examples, "best": self.best, "bad_evals": self.bad_evals,
                              "elapsed": self.elapsed, "train_time": self.train_time, "finished": finished,
                              "settings": settings, "data": data,
                              "scaler": scaler.state_dict() if scaler.is_enabled() else None}
                        | ({"plan": plan} if plan else {}))  # --max-steps auto: the measured plan
        st.info["digest"] = state_digest(st)
        return st

    @classmethod
    def from_checkpoint(cls, state: TrainState, params: list[torch.Tensor], optimizer, scaler,
                        where: str | os.PathLike) -> "LoopState":
        """Put ``state``'s prompts, optimizer, grad scaler and RNG back in place; returns the loop state it held."""
        if [tuple(p.shape) for p in state.prompts] != [tuple(p.shape) for p in params]:
            raise ConfigError(f"--resume: {where} holds prompts of other shapes")
        device = params[0].device
        with torch.no_grad():
            for p, s in zip(params, state.prompts):
                p.copy_(s.to(device))
        optimizer.load_state_dict(state.optimizer)
        if state.info.get("scaler"):
            scaler.load_state_dict(state.info["scaler"])
        set_rng_states(state.rng)
        info = state.info
        return cls(best_prompts=[b.to(device) for b in state.best_prompts], step=state.step,
                   examples=int(info["examples"]), best=dict(info["best"]), bad_evals=int(info["bad_evals"]),
                   elapsed=float(info["elapsed"]), train_time=float(info["train_time"]))


__all__ = ["TrainState", "LoopState", "save_checkpoint", "load_checkpoint", "checkpoint_bytes", "rng_states", "set_rng_states",
           "state_digest", "CHECKPOINT_FORMAT"]
