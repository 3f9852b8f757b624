"""The training loop: one explicit loop that trains one prompt per task, on one process or many.

Read top to bottom: :class:`TrainConfig` (validated up front, errors name the flag) ->
:func:`prepare` (data files, labels, checks: no model needed, so bad input fails at once) ->
:func:`train` (load the base, build prompts, then the loop: batch -> loss -> step -> log ->
eval -> checkpoint) -> prompt files with their training summary.

Only the prompts train: the base model is frozen and asserted so. Several tasks share mixed
batches (one prompt per task, each row carries its own; see objective.py). Data order and the
learning rate are pure functions of the seed and the step (schedule.py), so a run resumed from a
checkpoint (checkpoint.py) ends bit-for-bit where an uninterrupted run would.

Not here: settings and data checks (config.py), the loss (objective.py), data order
(schedule.py), checkpoint files (checkpoint.py),
processes and gradient all-reduce (distributed/), experiment trackers (tracking.py), the command line
(commands/train.py).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from .. import progress
from ..artifact import PromptMeta, atomic_write_bytes, save_prompt
from ..base import BaseModel, assert_frozen, load_base_model
from ..distributed import LocalRuntime, accelerate_precision, lockstep_micro_batches, runtime_from_env, shard
from ..distributed.sharding import shard_base
from ..errors import ConfigError
from ..evaluate import PRIMARY_METRIC, evaluate_prompt
from ..model import PromptedModel
from ..precision import autocast, precision_name, resolve_precision
from ..prompt import SoftPrompt
from .checkpoint import TrainState, load_checkpoint, rng_states, save_checkpoint, set_rng_states, state_digest
from .config import TrainConfig, _flag, data_fingerprint, prepare, total_steps
from .objective import Row, row_losses
from .records import MetricsLog, TrainResult, peak_rss_mb
from .schedule import batch_at, lr_at, warmup_steps
from .speed import attention_implementation, cast_linear_weights, gradient_checkpointing, resolve_attention
from .tracking import Trackers

__all__ = ["train"]


# ----------------------------------------------------------------------------- precision, model


def resolve_device(config: TrainConfig, base: BaseModel | None) -> torch.device:
    if base is not None:
        return base.device
    if config.device:
        try:
            dev = torch.device(config.device)
        except RuntimeError as e:
            raise ConfigError(f"--device {config.device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {config.device}: no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- results, logs


# ----------------------------------------------------------------------------- the loop


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr, desc="train")


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)


def _eval_tasks(pm, prompts, tasks, amp, device, batch_size, quiet: bool = True) -> dict[str, dict]:
    out = {}
    for t, p in zip(tasks, prompts):
        if not t.dev:
            continue
        with autocast(device, amp), progress.shown(not quiet), progress.stage(f"dev {t.name}"):
            m = evaluate_prompt(pm, p.detach(), t.spec, t.dev, batch_size)
        m.pop("predictions", None)
        m.pop("confusion", None)
        m.pop("per_class", None)
        out[t.name] = m
    return out


def train(config: TrainConfig, base: BaseModel | None = None, runtime=None) -> TrainResult:
    """Train one prompt per task and write the prompt files.

    Args:
        config: the run's settings (validated on creation).
        base: an already-loaded base model (default: load ``config.model``). It is left frozen and
            unchanged.
        runtime: processes and gradient all-reduce (default: Accelerate's when this process was
            started by ``accelerate launch`` with several processes, else this process alone; see
            ``softprompt.distributed``). With several processes the main process writes the files
            and its result holds the dev metrics.
    Returns:
        :class:`TrainResult` with the prompt files, metrics and history.
    Raises:
        DataError / ConfigError / ModelLoadError on bad input, before any training.
    """
    rt = runtime or runtime_from_env(config.device) or LocalRuntime()
    quiet = config.quiet or not rt.is_main
    tasks = prepare(config)
    n_train = sum(len(t.train) for t in tasks)
    total = total_steps(config, n_train)
    if config.batch_size < rt.world_size:
        raise ConfigError(f"{rt.world_size} processes but --batch-size is only {config.batch_size}: "
                          "every process needs at least one row per step")
    if config.batch_size % (rt.world_size * config.grad_accum):
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by processes x --grad-accum "
                          f"({rt.world_size} x {config.grad_accum})")
    run_dir = config.run_path()
    ckpt_path = run_dir / "checkpoint.safetensors"
    fingerprint = data_fingerprint(tasks)
    state = None
    if config.resume:
        try:
            state = load_checkpoint(ckpt_path)
            seen = f"step {state.step}, digest {state.info.get('digest')}"
        except ConfigError as e:
            state, seen, error = None, f"unreadable ({e})", e
        rt.check_same(seen, "checkpoint", ckpt_path)  # every process resumes from the same state
        if state is None:
            raise error
        _check_resume(state, config, fingerprint, ckpt_path)

    if rt.world_size > 1 and config.device_map:
        raise ConfigError("--device-map spreads one model over the devices of one process; "
                          "it cannot be combined with several processes")
    sharding = getattr(rt, "sharding", None) if rt.world_size > 1 else None  # FSDP / ZeRO-3 config: shard the base
    if sharding and (config.gradient_checkpointing or config.quantize):
        raise ConfigError(f"--{'gradient-checkpointing' if config.gradient_checkpointing else 'quantize'} cannot be "
                          f"combined with {'an FSDP' if sharding.engine == 'fsdp' else 'a DeepSpeed ZeRO-3'} launch "
                          "(sharded layers); drop it or use the data-parallel config")
    device = rt.device if rt.world_size > 1 else resolve_device(config, base)
    precision = config.precision
    if precision == "auto" and rt.world_size > 1:
        precision = accelerate_precision(getattr(rt, "deepspeed", None)) or precision  # accelerate's --mixed_precision / config
    amp = resolve_precision(precision, device)
    base_given = base is not None
    empty = bool(base is None and sharding and sharding.efficient_loading and rt.rank != 0)  # process 0 sends the weights
    if base is None:
        _say(quiet, f"loading {config.model or 'the default model'} ...")
        base = load_base_model(config.model, dtype=config.dtype,
                               device=None if config.device_map or sharding else device,
                               device_map=config.device_map, quantization=config.quantize, empty=empty)
    sharded = None
    if sharding:  # each process keeps 1/W of every decoder layer from here on (distributed/sharding/)
        sharded = shard_base(base.model, rt, sharding, device=device, compute_dtype=amp, restore=base_given)
        base_bytes = rt.gather(sharded.local_bytes())
        if empty:
            base.refingerprint()  # its embedding came from process 0
    pm = PromptedModel(base)
    assert_frozen(base.model)
    device = base.device
    tok = base.tokenizer

    # --- prompts, rows, optimizer
    prompts = []
    for i, t in enumerate(tasks):
        strategy = config.init
        if strategy == "auto":
            strategy = "labels" if t.spec.kind == "classify" else ("text" if (t.config.init_text or config.init_text) else "vocab")
        prompts.append(SoftPrompt.initialize(
            base.embedding, tok, t.config.prompt_length or config.prompt_length, strategy,
            text=t.config.init_text or config.init_text, labels=t.spec.words, seed=config.seed + i).to(device))
    params = [p.weight for p in prompts]
    rows: list[Row] = []
    for i, t in enumerate(tasks):
        for ex in t.train:
            src = t.spec.source_ids(tok, ex.source)
            tgt = t.spec.labels.index(ex.target) if t.spec.kind == "classify" else t.spec.target_ids(tok, ex.target)
            rows.append(Row(i, src, tgt))
    lengths = [len(r.source) + (0 if isinstance(r.target, int) else len(r.target)) for r in rows]
    task_of = [r.task for r in rows]
    label_ids = [t.spec.label_ids(tok) if t.spec.kind == "classify" else None for t in tasks]
    opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=config.lr, weight_decay=config.weight_decay,
                            betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16 or base.model.dtype is torch.float16)
    warm = warmup_steps(config.warmup, total)
    has_dev = any(t.dev for t in tasks)
    eval_every = config.eval_every or max(1, total // 5)
    ckpt_every = config.checkpoint_every if config.checkpoint_every is not None else max(1, total // 10)

    best_prompts = [p.detach().clone() for p in params]
    best: dict[str, dict] = {}
    bad_evals, start, examples, elapsed, train_time = 0, 0, 0, 0.0, 0.0
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=rt.is_main)
    if state is not None:
        if [tuple(p.shape) for p in state.prompts] != [tuple(p.shape) for p in params]:
            raise ConfigError(f"--resume: {ckpt_path} holds prompts of other shapes")
        with torch.no_grad():
            for p, s in zip(params, state.prompts):
                p.copy_(s.to(device))
        best_prompts = [b.to(device) for b in state.best_prompts]
        opt.load_state_dict(state.optimizer)
        if state.info.get("scaler"):
            scaler.load_state_dict(state.info["scaler"])
        set_rng_states(state.rng)
        start, examples = state.step, int(state.info["examples"])
        best, bad_evals = dict(state.info["best"]), int(state.info["bad_evals"])
        elapsed, train_time = float(state.info["elapsed"]), float(state.info["train_time"])
        log.restore(start)
        _say(quiet, f"resuming from {ckpt_path} at step {start}/{total}")
    else:
        log.start()
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.json", json.dumps(config.result_settings(), indent=2).encode())

    if getattr(rt, "note", None):
        _say(quiet, rt.note)
    _say(quiet, f"training {len(tasks)} prompt(s) on {n_train} examples: {total} steps x {config.batch_size} "
                f"on {device}{' x ' + str(rt.world_size) + ' processes' if rt.world_size > 1 else ''}"
                f"{f' ({sharding.describe()})' if sharded else ''}, "
                f"precision {precision_name(amp)}")

    def checkpoint(step: int, finished: bool = False) -> None:
        if rt.is_main:
            st = TrainState(step=step, names=[t.name for t in tasks], prompts=[p.detach() for p in params],
                            best_prompts=best_prompts, optimizer=opt.state_dict(), rng=rng_states(),
                            info={"examples": examples, "best": best, "bad_evals": bad_evals,
                                  "elapsed": elapsed, "train_time": train_time, "finished": finished,
                                  "settings": config.result_settings(), "data": fingerprint,
                                  "scaler": scaler.state_dict() if scaler.is_enabled() else None})
            st.info["digest"] = state_digest(st)
            save_checkpoint(ckpt_path, st)
        rt.barrier()

    def evaluate(step: int) -> bool:
        """Evaluate, keep the best prompts; True when early stopping says stop."""
        nonlocal bad_evals
        metrics = _eval_tasks(pm, params, tasks, amp, device, config.eval_batch_size, quiet)
        improved = False
        for i, t in enumerate(tasks):
            if t.name not in metrics:
                continue
            key = PRIMARY_METRIC[t.spec.kind]
            value = metrics[t.name][key]
            rank = _rank(metrics[t.name], key)
            if t.name not in best or rank > tuple(best[t.name]["rank"]):
                best[t.name] = {"metric": key, "value": value, "step": step, "metrics": metrics[t.name],
                                "rank": list(rank)}
                best_prompts[i] = params[i].detach().clone()
                improved = True
        bad_evals = 0 if improved else bad_evals + 1
        log.append({"step": step, "eval": metrics, "improved": improved})
        _say(quiet, f"step {step}: " + "; ".join(
            f"{n} {PRIMARY_METRIC[t.spec.kind]} {metrics[n][PRIMARY_METRIC[t.spec.kind]]:.4f}"
            for t in tasks for n in [t.name] if n in metrics) + ("" if improved else f" (no improvement x{bad_evals})"))
        return config.patience is not None and bad_evals >= config.patience and step < total

    if rt.is_main:  # experiment trackers (--report-to): one more sink of every record
        log.sink = Trackers.open(config.report_to, config.tracker_run_name(), run_dir, {
            **config.result_settings(), "out": str(config.out), "run_dir": str(run_dir), "train_examples": n_train,
            "planned_steps": total, "processes": rt.world_size,
            "precision_used": precision_name(amp)}, start)
    stopped = False
    done = start
    t_start = time.perf_counter() - elapsed
    bar = _progress(total, start, enabled=not quiet)
    order_cache: dict = {}
    base_model = base.model
    try:
        with gradient_checkpointing(base_model, config.gradient_checkpointing), \
                attention_implementation(base_model, resolve_attention(config.attention, device, amp)), \
                cast_linear_weights(base_model, amp if device.type == "cpu" and not sharded else None), \
                (sharded or contextlib.nullcontext()):
            for step in range(start, total):
                t0 = time.perf_counter()
                lr = lr_at(step, total, config.lr, warm, config.schedule)
                for g in opt.param_groups:
                    g["lr"] = lr
                batch = batch_at(step, lengths, config.batch_size, config.seed, order_cache)
                in_batch = {rows[i].task for i in batch}
                loss_sum = torch.zeros((), device=device)
                micros = (lockstep_micro_batches(batch, task_of, rt.world_size, rt.rank, config.grad_accum) if sharded
                          else [(m, len(m)) for m in shard(batch, rt.world_size, rt.rank, config.grad_accum)])
                for micro, own in micros:  # sharded: rows borrowed to keep the processes in step carry no loss
                    with autocast(device, amp):
                        losses = row_losses(pm, params, [rows[i] for i in micro], label_ids, config.classify_loss)[:own]
                        loss = losses.sum() / config.batch_size  # rows of the whole global batch weigh equally
                    scaler.scale(loss).backward()
                    loss_sum += losses.detach().sum()
                if sharded:
                    sharded.end_step()  # every process, in step: free the gathered layers
                for i, p in enumerate(params):  # a prompt whose task is in the global batch steps, even with no local rows
                    if i in in_batch and p.grad is None:
                        p.grad = torch.zeros_like(p)
                    elif i not in in_batch:
                        p.grad = None
                rt.all_reduce_sum([p.grad for p in params if p.grad is not None] + [loss_sum])
                scaler.unscale_(opt)
                if config.max_grad_norm is not None:
                    for p in params:
                        if p.grad is not None:
                            torch.nn.utils.clip_grad_norm_([p], config.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                examples += len(batch)
                dt = time.perf_counter() - t0
                train_time += dt
                elapsed = time.perf_counter() - t_start
                rec = {"step": step + 1, "loss": float(loss_sum) / len(batch), "lr": lr, "examples": examples,
                       "examples_per_s": len(batch) / dt, "elapsed": round(elapsed, 3)}
                log.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", ex_s=f"{rec['examples_per_s']:.1f}")
                done = step + 1
                if has_dev and (done % eval_every == 0 or done == total):
                    # the main process evaluates (with a sharded base, every process: its layers are shared)
                    stopped = rt.broadcast(evaluate(done) if rt.is_main or sharded else None)
                    if sharded:
                        sharded.end_step()
                    elapsed = time.perf_counter() - t_start
                if ckpt_every and (done % ckpt_every == 0 or stopped) and done != total:
                    checkpoint(done)
                if stopped:
                    _say(quiet, f"early stopping after step {done}: no improvement in {config.patience} evaluations")
                    break
    except BaseException as e:
        log.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        bar.close()
    steps_done = done
    for i, t in enumerate(tasks):  # a task without a dev set keeps its last prompt
        if not t.dev:
            best_prompts[i] = params[i].detach().clone()
    if ckpt_every:
        checkpoint(steps_done, finished=True)
    seconds = time.perf_counter() - t_start
    ex_s = examples / train_time if train_time > 0 else 0.0

    # --- prompt files
    rss = rt.gather(peak_rss_mb()) if sharded else None  # every process, in step
    paths: dict[str, Path] = {}
    for i, t in enumerate(tasks):
        b = best.get(t.name, {})
        summary = {
            "steps": steps_done, "planned_steps": total, "examples": examples, "train_examples": len(t.train),
            "dev_examples": len(t.dev or []), "train_file": str(t.config.data), "dev_file": t.config.eval,
            "best_step": b.get("step", steps_done), "metric": b.get("metric"), "best_metric": b.get("value"),
            "dev_metrics": b.get("metrics"), "stopped_early": stopped, "seconds": round(seconds, 2),
            "examples_per_s": round(ex_s, 3), "processes": rt.world_size,
            "precision": precision_name(amp), "tasks_in_run": len(tasks),
            "config": config.result_settings(),
        }
        if sharded:
            summary["sharded_base"] = {"layers": len(sharded.units), "bytes": sharded.full_bytes,
                                       "sharded_bytes": sharded.sharded_bytes(), "bytes_per_process": base_bytes,
                                       "peak_host_rss_mb_per_process": rss,
                                       "loaded_by": "process 0" if sharding.efficient_loading else "every process"}
        meta = PromptMeta.for_base(base, best_prompts[i].shape[0], name=t.name, training=summary, **t.spec.to_meta())
        if rt.is_main:
            save_prompt(t.out, best_prompts[i].float(), meta, dtype=config.prompt_dtype)
        paths[t.name] = t.out
    rt.barrier()
    log.close()
    for t in tasks:
        _say(quiet, f"saved {t.out}" + (f" ({best[t.name]['metric']} {best[t.name]['value']:.4f} at step "
                                        f"{best[t.name]['step']})" if t.name in best else ""))
    return TrainResult(paths=paths, run_dir=run_dir, steps=steps_done, examples=examples, seconds=seconds,
                       examples_per_s=ex_s, metrics={k: v["metrics"] for k, v in best.items()},
                       best_step={k: v["step"] for k, v in best.items()}, history=log.records, stopped_early=stopped)


def _rank(metrics: dict, key: str) -> tuple[float, float]:
    """Order of dev results: the primary metric, ties broken by the lower log loss (classification)."""
    return (float(metrics[key]), -float(metrics.get("log_loss", 0.0)))


def _check_resume(state: TrainState, config: TrainConfig, fingerprint: str, path: Path) -> None:
    """Refuse a checkpoint written by a run with other data or settings."""
    if state.info.get("data") != fingerprint:
        raise ConfigError(f"--resume: {path} was written for other training data (data files changed)")
    old, new = state.info.get("settings", {}), config.result_settings()
    paths = {"data", "eval"}  # files may move; their content is checked by the data fingerprint
    diff = sorted(k for k in set(old) | set(new) if k not in paths and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{_flag(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:3])
        raise ConfigError(f"--resume: {path} was written with other settings ({shown})")
