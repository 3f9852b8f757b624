"""Before the first step: launch checks, the resumed checkpoint, the model (loaded, sharded), the
prompts' initial values, the rows encoded once, and the :class:`Run` that holds what stays fixed
(:func:`build_run` does them in order).

Not here: the loop (loop.py), settings and data checks (config.py), the checkpoint file (checkpoint.py).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import devices
from ..base import BaseModel, assert_frozen, load_base_model
from ..trainable import build_prompt, prompt_length
from ..hf_compat import text_config
from ..distributed import accelerate_precision
from ..distributed.sharding import Sharder, ShardingConfig, shard_base
from ..errors import ConfigError
from ..methods import METHODS
from ..model import PromptedModel
from ..precision import resolve_precision
from ..prompt import SoftPrompt
from .balance import TaskBalance, resolve as resolve_balance
from .checkpoint import TrainState, load_checkpoint
from .config import TrainConfig, _flag
from .task_config import TaskConfig
from .prepare import PreparedTask, data_fingerprint, prepare, total_steps
from ..tasks import task
from .objective import Row
from .memory import StepShape, activation_bytes, choose_checkpointing, default_budget_bytes, parse_budget
from .records import EvalHook, MetricsLog
from .schedule import warmup_steps


def check_launch(config: TrainConfig, rt) -> None:
    """Refuse a batch that does not split over the processes and micro-batches."""
    if config.batch_size < rt.world_size:
        raise ConfigError(f"{rt.world_size} processes but --batch-size is only {config.batch_size}: "
                          "every process needs at least one row per step")
    if config.batch_size % (rt.world_size * config.grad_accum):
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by processes x --grad-accum "
                          f"({rt.world_size} x {config.grad_accum})")


def read_resume(path: Path, config: TrainConfig, rt, fingerprint: str) -> TrainState:
    """The checkpoint ``--resume`` continues from, the same on every process, written by a run with
    the same data and settings (else :class:`ConfigError`)."""
    try:
        state = load_checkpoint(path)
        seen = f"step {state.step}, digest {state.info.get('digest')}"
    except ConfigError as e:
        state, seen, error = None, f"unreadable ({e})", e
    rt.check_same(seen, "checkpoint", path)  # every process resumes from the same state
    if state is None:
        raise error
    _check_resume(state, config, fingerprint, path)
    return state


def _check_resume(state: TrainState, config: TrainConfig, fingerprint: str, path: Path) -> None:
    """Refuse a checkpoint written by a run with other data or settings."""
    if state.info.get("data") != fingerprint:
        raise ConfigError(f"--resume: {path} was written for other training data (data files changed)")
    new = config.result_settings()
    old = _with_new_defaults(state.info.get("settings", {}), new)
    paths = {"data", "eval"}  # files may move; their content is checked by the data fingerprint
    diff = sorted(k for k in set(old) | set(new) if k not in paths and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{_flag(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:3])
        raise ConfigError(f"--resume: {path} was written with other settings ({shown})")


def _defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _with_new_defaults(old: dict, new: dict) -> dict:
    """A checkpoint's settings with the options added since it was written (absent from them) at
    their defaults, so a run started by an older softprompt resumes after an upgrade; an option
    given another value than its default still refuses."""
    top, task = _defaults(TrainConfig), _defaults(TaskConfig)
    out = {**{k: top[k] for k in new if k not in old and k in top}, **old}
    if isinstance(old.get("tasks"), list) and new.get("tasks"):
        keys = set(new["tasks"][0])
        out["tasks"] = [{**{k: task[k] for k in keys if k not in t and k in task}, **t} if isinstance(t, dict) else t
                        for t in old["tasks"]]
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def resolve_device(config: TrainConfig, base: BaseModel | None) -> torch.device:
    """``--device`` (checked), else the given base's, else CUDA when there is one."""
    if base is not None:
        return base.device
    return devices.resolve_device(config.device)


@dataclass
class LoadedModel:
    """The frozen base as the loop uses it."""

    base: BaseModel
    pm: PromptedModel
    device: torch.device
    amp: torch.dtype | None
    """The autocast dtype (None: fp32)."""
    sharding: ShardingConfig | None = None
    sharded: Sharder | None = None
    """The sharded base (a context manager around the loop), with a launch that shards it."""
    base_bytes: list[int] | None = None
    """Bytes of base weights each process holds (sharded only)."""


def load_model(config: TrainConfig, rt, base: BaseModel | None, say) -> LoadedModel:
    """Load the base (unless given), shard it over the processes when the launch asks, and check it is frozen."""
    if rt.world_size > 1 and config.device_map:
        raise ConfigError("--device-map spreads one model over the devices of one process; "
                          "it cannot be combined with several processes")
    sharding = getattr(rt, "sharding", None) if rt.world_size > 1 else None  # FSDP / ZeRO-3 config: shard the base
    if sharding and (config.gradient_checkpointing or config.quantize):
        raise ConfigError(f"--{'gradient-checkpointing' if config.gradient_checkpointing else 'quantize'} cannot be "
                          f"combined with {'an FSDP' if sharding.engine == 'fsdp' else 'a DeepSpeed ZeRO-3'} launch "
                          "(sharded layers); drop it or use the data-parallel config")
    unshardable = [m for m in (METHODS[config.method_of(t)] for t in config.tasks_resolved) if not m.shardable]
    if sharding and unshardable:
        raise ConfigError(f"--method {unshardable[0].name} is not supported with sharded layers (FSDP / DeepSpeed "
                          "ZeRO-3); launch with the plain data-parallel (DDP) config")
    device = rt.device if rt.world_size > 1 else resolve_device(config, base)
    precision = config.precision
    if precision == "auto" and rt.world_size > 1:
        precision = accelerate_precision(getattr(rt, "deepspeed", None)) or precision  # accelerate's --mixed_precision / config
    amp = resolve_precision(precision, device)
    base_given = base is not None
    empty = bool(base is None and sharding and sharding.efficient_loading and rt.rank != 0)  # process 0 sends the weights
    if base is None:
        say(f"loading {config.model or 'the default model'} ...")
        base = load_base_model(config.model, dtype=config.dtype,
                               device=None if config.device_map or sharding else device,
                               device_map=config.device_map, quantization=config.quantize, empty=empty)
    sharded = base_bytes = None
    if sharding:  # each process keeps 1/W of every decoder layer from here on (distributed/sharding/)
        sharded = shard_base(base.model, rt, sharding, device=device, compute_dtype=amp, restore=base_given)
        base_bytes = rt.gather(sharded.local_bytes())
        if empty:
            base.refingerprint()  # its embedding came from process 0
    pm = PromptedModel(base)
    assert_frozen(base.model)
    return LoadedModel(base=base, pm=pm, device=base.device, amp=amp, sharding=sharding, sharded=sharded,
                       base_bytes=base_bytes)


def init_prompts(config: TrainConfig, tasks: list[PreparedTask], pm: PromptedModel) -> list[nn.Module]:
    """One trainable prompt per task (trainable.py: input or deep, plain or reparameterised), initialised by
    ``--init`` (``auto``: from the labels for classification, the init text when given, else vocabulary
    embeddings); a deep prompt starts at the keys/values of that init."""
    base, prompts = pm.base, []
    for i, t in enumerate(tasks):
        if config.init_from:
            prompts.append(_transferred(config, t, pm, seed=config.seed + i))
            continue
        strategy = config.init
        if strategy == "auto":
            strategy = task(t.spec.kind).init(bool(t.config.init_text or config.init_text))
        init = SoftPrompt.initialize(
            base.embedding, base.tokenizer, t.config.prompt_length or config.prompt_length, strategy,
            text=t.config.init_text or config.init_text, labels=t.spec.words, seed=config.seed + i).weight
        prompts.append(build_prompt(pm, init.detach(), config.method_of(t.config), config.reparam,
                                    config.reparam_hidden, seed=config.seed + i))
    return prompts


def _transferred(config: TrainConfig, t: PreparedTask, pm: PromptedModel, seed: int) -> nn.Module:
    """``--init-from``: the trainable prompt starts as another trained prompt of the same base model
    (prompt transfer, SPoT: Vu et al. 2022); a one-line ConfigError when it cannot."""
    from ..artifact import check_compatible, load_prompt
    from ..errors import PromptFileError

    where = f"--init-from {config.init_from}"
    try:
        loaded = load_prompt(config.init_from)
        check_compatible(loaded.meta, pm.base, where)
    except PromptFileError as e:
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    m, length = METHODS[config.method_of(t.config)], t.config.prompt_length or config.prompt_length
    if METHODS[loaded.meta.method] is not m:
        raise ConfigError(f"{where} holds a {loaded.meta.method} prompt; this run trains --method {m.name}")
    if prompt_length(loaded.tensor) != length:
        raise ConfigError(f"{where} holds {prompt_length(loaded.tensor)} virtual tokens; --prompt-length is {length}")
    tensor = loaded.tensor.to(pm.base.device, torch.float32)  # (P, d) or (L, 2, H, P, hd)
    if m.start is None:  # the file holds what an --init would give: train it as from one
        return build_prompt(pm, tensor, m.name, config.reparam, config.reparam_hidden, seed=seed)
    if config.reparam is not None:
        raise ConfigError(f"{where}: {m.a} starts from its {m.holds}, without --reparam")
    return m.trainable(tensor, pm.base.device)


def encode_rows(tasks: list[PreparedTask], tok) -> list[Row]:
    """Every training example tokenized once: source ids, and its target as its kind encodes it
    (a label index for classify, target ids for generate)."""
    rows: list[Row] = []
    for i, t in enumerate(tasks):
        for ex in t.train:
            src = t.spec.source_ids(tok, ex.source)
            rows.append(Row(i, src, task(t.spec.kind).encode_target(t.spec, tok, ex.target)))
    return rows


@dataclass
class Run:
    """What stays fixed while the loop runs (the loop's changing state is :class:`~.checkpoint.LoopState`)."""

    config: TrainConfig
    rt: Any
    """The processes (distributed/runtime.py)."""
    tasks: list[PreparedTask]
    total: int
    """Planned optimizer steps."""
    run_dir: Path
    model: LoadedModel
    params: list[nn.Module]
    """The trainable prompts, one per task (trainable.py); ``params[i]()`` is task i's prompt tensor."""
    rows: list[Row]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    log: MetricsLog
    fingerprint: str
    """The training data's fingerprint (a checkpoint is refused for other data)."""
    quiet: bool
    warm: int = 0
    """Warmup steps."""
    eval_every: int = 1
    ckpt_every: int = 0
    t_start: float = 0.0
    """``perf_counter()`` at the (possibly resumed) run's start, minus the time already elapsed."""
    order_cache: dict = field(default_factory=dict)
    """The current epoch's batches (schedule.batch_at)."""
    checkpointing: bool = False
    """Gradient checkpointing on for this run (asked for, or picked by --memory-budget)."""
    on_eval: EvalHook | None = None
    """Called after every dev evaluation; True stops the run (train()'s ``on_eval``)."""
    plan_note: str | None = None
    """How --max-steps auto planned the run (said at the start)."""
    refit_at: int | None = None
    """The step at which a --max-steps auto run re-fits its length to its own pace (plan.refit); None: never, or done."""
    eval_estimate: float = 0.0
    """Seconds of a dev evaluation as planned (measured before the loop), for a re-fit with no evaluation just timed."""

    lengths: list[int] = field(init=False)
    """Tokens per row, for length-grouped batches."""
    task_of: list[int] = field(init=False)
    """Row -> its task (prompt) index."""
    label_ids: list = field(init=False)
    """Task -> its labels' token ids (classify), else None."""
    balance: list[TaskBalance] = field(init=False)
    """Task -> how its classes are handled (balance.py)."""
    row_weights: list[float] | None = field(init=False)
    """Row -> its loss weight (None: every row weighs 1, the unweighted path)."""
    row_keys: list[tuple[int, Any]] = field(init=False)
    """Row -> (task, class), what --sampling balanced balances."""

    def __post_init__(self) -> None:
        self.lengths = [len(r.source) + (0 if isinstance(r.target, int) else len(r.target)) for r in self.rows]
        self.task_of = [r.task for r in self.rows]
        tok = self.model.base.tokenizer
        self.label_ids = [task(t.spec.kind).label_ids(t.spec, tok) for t in self.tasks]
        self.balance = resolve_balance(self.config, self.tasks)
        weights = [self.balance[r.task].weight_of(r.target) for r in self.rows]
        self.row_weights = None if all(b.class_weights == "none" for b in self.balance) else weights
        self.row_keys = [(r.task, r.target if isinstance(r.target, int) else None) for r in self.rows]

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    @property
    def has_dev(self) -> bool:
        return any(t.dev for t in self.tasks)


def step_shape(run: Run) -> StepShape:
    """The largest micro-batch this run can meet: its rows, its longest row with prompt and label tree."""
    micro = run.config.batch_size // (run.rt.world_size * run.config.grad_accum)
    tree = max((sum(len(l) - 1 for l in ids) for ids in run.label_ids if ids), default=0)  # label-tree tokens
    prompt = max(prompt_length(p()) for p in run.params)
    loss = max([1 + tree] + [len(r.target) for r in run.rows if not isinstance(r.target, int)])
    return StepShape(batch=max(1, micro), tokens=prompt + max(run.lengths) + tree, loss_tokens=loss)


def pick_checkpointing(run: Run) -> tuple[bool, str | None]:
    """--gradient-checkpointing, or on when a step's estimated activations pass --memory-budget."""
    config, m = run.config, run.model
    if config.gradient_checkpointing:
        return True, None
    budget = parse_budget(config.memory_budget)
    if budget is None:
        budget = default_budget_bytes(m.device)
    tc = text_config(m.base.model.config)
    hidden = tc.hidden_size
    heads = getattr(tc, "num_attention_heads", None) or getattr(tc, "n_head", 1)
    dtype = m.amp or m.base.model.dtype
    estimate = activation_bytes(step_shape(run), tc.num_hidden_layers if hasattr(tc, "num_hidden_layers") else tc.n_layer,
                                hidden, heads, getattr(tc, "intermediate_size", None) or 4 * hidden, tc.vocab_size,
                                torch.empty((), dtype=dtype).element_size())
    return choose_checkpointing(False, estimate, budget)


def build_run(config: TrainConfig, rt, base: BaseModel | None, on_eval: EvalHook | None, quiet: bool, say,
              log: bool = True) -> tuple[Run, TrainState | None]:
    """Everything before the first step, in order: the data read and checked, the launch checked, the
    checkpoint to resume from (``--resume``), the model, the prompts, the rows encoded, the optimizer;
    returns the :class:`Run` and that checkpoint (None for a fresh run). ``log=False`` writes no
    metrics.jsonl (a probe of the step's cost, not a run)."""
    tasks = prepare(config)
    total = total_steps(config, sum(len(t.train) for t in tasks))
    check_launch(config, rt)
    run_dir = config.run_path()
    fingerprint = data_fingerprint(tasks)
    saved = read_resume(run_dir / "checkpoint.safetensors", config, rt, fingerprint) if config.resume else None
    model = load_model(config, rt, base, say)
    params = init_prompts(config, tasks, model.pm)
    rows = encode_rows(tasks, model.base.tokenizer)
    opt = torch.optim.AdamW([{"params": list(p.parameters())} for p in params], lr=config.lr,
                            weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(model.device.type,
                                  enabled=model.amp is torch.float16 or model.base.model.dtype is torch.float16)
    run = Run(config=config, rt=rt, tasks=tasks, total=total, run_dir=run_dir, model=model, params=params, rows=rows,
              opt=opt, scaler=scaler, log=MetricsLog(run_dir / "metrics.jsonl", enabled=rt.is_main and log),
              fingerprint=fingerprint, quiet=quiet, warm=warmup_steps(config.warmup, total),
              eval_every=config.eval_every or max(1, total // 5),
              ckpt_every=config.checkpoint_every if config.checkpoint_every is not None else max(1, total // 10),
              on_eval=on_eval)
    return run, saved
