"""The training loop: one explicit loop that trains one prompt per task, on one process or many.

Read top to bottom: :class:`TrainConfig` (validated up front, errors name the flag) ->
:func:`prepare` (data files, labels, checks: no model needed, so bad input fails at once) ->
:func:`train` (load the base, build prompts: setup.py; then the loop: batch -> loss -> step -> log ->
eval -> checkpoint, one named function each) -> prompt files with their training summary. What
changes from step to step is one :class:`~.checkpoint.LoopState`, saved and restored whole.

Only the prompts train: the base model is frozen and asserted so. Several tasks share mixed
batches (one prompt per task, each row carries its own; see objective.py). Data order and the
learning rate are pure functions of the seed and the step (schedule.py), so a run resumed from a
checkpoint (checkpoint.py) ends bit-for-bit where an uninterrupted run would.

Not here: settings and data checks (config.py), loading and setup (setup.py), the loss (objective.py), data order
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
from ..base import BaseModel
from ..trainable import collapse, prompt_length
from ..distributed import LocalRuntime, lockstep_micro_batches, runtime_from_env, shard
from ..evaluate import evaluate_prompt
from ..precision import autocast, precision_name
from .balance import AUTO_RATIO
from .calibrate import fit_calibrations
from .checkpoint import LoopState, save_checkpoint
from .config import TrainConfig
from .plan import measure_eval, measure_step, no_time_for_a_step, out_of_time, plan_auto, plan_record, refit
from .objective import row_losses
from .records import DevResult, EvalHook, TrainResult, peak_rss_mb
from .schedule import SAMPLINGS, lr_at
from .setup import Run, build_run, pick_checkpointing
from ..hf_compat import attention_implementation, gradient_checkpointing
from .speed import cast_linear_weights, resolve_attention, share_prompt_prefix
from .summary import TrainingSummary
from .tracking import Trackers

__all__ = ["train", "probe_step"]


def train(config: TrainConfig, base: BaseModel | None = None, runtime=None,
          on_eval: EvalHook | None = None) -> TrainResult:
    """Train one prompt per task and write the prompt files.

    Args:
        config: the run's settings (validated on creation).
        base: an already-loaded base model (default: load ``config.model``). It is left frozen and
            unchanged.
        runtime: processes and gradient all-reduce (default: Accelerate's when this process was
            started by ``accelerate launch`` with several processes, else this process alone; see
            ``softprompt.distributed``). With several processes the main process writes the files
            and its result holds the dev metrics.
        on_eval: called on the main process after every dev evaluation with a
            :class:`~.records.DevResult`; returning True stops the run there like early stopping
            (``softprompt tune`` prunes trials with it).
    Returns:
        :class:`TrainResult` with the prompt files, metrics and history.
    Raises:
        DataError / ConfigError / ModelLoadError on bad input, before any training.
    """
    rt = runtime or runtime_from_env(config.device) or LocalRuntime()
    quiet = config.quiet or not rt.is_main
    run, saved = build_run(config, rt, base, on_eval, quiet, lambda msg: _say(quiet, msg))
    with _model_switches(run):
        probe_s = plan_auto(run, _backward, saved)  # --max-steps auto: planned from a measured step
        state = _start(run, saved)
        run.t_start -= probe_s  # the measuring counts against --max-time
        bar = _progress(run.total, state.step, enabled=not quiet)
        try:
            _loop(run, state, bar)
        except BaseException as e:
            run.log.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            bar.close()
    return _finish(run, state)


def probe_step(config: TrainConfig, base: BaseModel) -> tuple[float, float, float]:
    """Seconds of a training step, a dev evaluation (0: no dev data) and the setup before them (data read,
    rows encoded) for ``config`` here, as ``--max-steps auto`` measures them; nothing written."""
    t0 = time.perf_counter()
    run, _ = build_run(config, LocalRuntime(), base, None, True, lambda msg: None, log=False)
    setup_s = time.perf_counter() - t0
    with _model_switches(run):
        return measure_step(run, _backward)[0], measure_eval(run), setup_s


def _start(run: Run, saved) -> LoopState:
    """The loop state to start from (fresh, or the resumed checkpoint's), metrics.jsonl, config.json,
    the banner and the experiment trackers."""
    config, rt, log = run.config, run.rt, run.log
    if saved is not None:
        state = LoopState.from_checkpoint(saved, _tensors(run.params), run.opt, run.scaler, run.ckpt_path)
        log.restore(state.step)
        _say(run.quiet, f"resuming from {run.ckpt_path} at step {state.step}/{run.total}")
    else:
        state = LoopState.fresh([collapse(p) for p in run.params])
        log.start()
    if rt.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run.run_dir / "config.json", json.dumps(config.result_settings(), indent=2).encode())
    if getattr(rt, "note", None):
        _say(run.quiet, rt.note)
    for t, b in zip(run.tasks, run.balance):  # what --class-weights / --select-metric auto decided
        if b.ratio > AUTO_RATIO:
            _say(run.quiet, f"{t.name}: labels skewed {b.ratio:.1f}:1 (most:least frequent); class weights "
                            f"{b.class_weights}, sampling {b.sampling}, best prompt by dev {b.select_metric}"
                            + ("" if b.sampling == "balanced" else " (--sampling balanced raises macro-F1 at a cost "
                               "in accuracy: README, Imbalanced labels)"))
    m = run.model
    if run.plan_note:
        _say(run.quiet, run.plan_note)
    _say(run.quiet, f"training {len(run.tasks)} prompt(s) on {len(run.rows)} examples: {run.total} steps x "
                    f"{config.batch_size} on {m.device}"
                    f"{' x ' + str(rt.world_size) + ' processes' if rt.world_size > 1 else ''}"
                    f"{f' ({m.sharding.describe()})' if m.sharded else ''}, precision {precision_name(m.amp)}")
    if rt.is_main:  # experiment trackers (--report-to): one more sink of every record
        log.sink = Trackers.open(config.report_to, config.tracker_run_name(), run.run_dir, {
            **config.result_settings(), "out": str(config.out), "run_dir": str(run.run_dir),
            "train_examples": len(run.rows), "planned_steps": run.total, "processes": rt.world_size,
            "precision_used": precision_name(m.amp)}, state.step)
    run.t_start = time.perf_counter() - state.elapsed
    return state


def _model_switches(run: Run) -> contextlib.ExitStack:
    """Activation checkpointing, the attention implementation, Linear weights in the compute dtype
    (unless sharded) and the sharded base's hooks, for the duration of the loop (all undone on exit)."""
    config, m = run.config, run.model
    stack = contextlib.ExitStack()
    # every process decides (cheap), then the main process's decision holds for all: ranks that
    # recompute and ranks that do not would run different collectives under a sharded base
    run.checkpointing, why = run.rt.broadcast(pick_checkpointing(run))
    if why:
        _say(run.quiet, why)
    stack.enter_context(gradient_checkpointing(m.base.model, run.checkpointing))
    stack.enter_context(attention_implementation(m.base.model, resolve_attention(config.attention, m.device, m.amp)))
    stack.enter_context(cast_linear_weights(m.base.model, None if m.sharded else m.amp))
    if m.sharded:
        stack.enter_context(m.sharded)
    return stack


def _loop(run: Run, state: LoopState, bar) -> None:
    """The loop: step -> log -> evaluate -> checkpoint, until the planned steps, early stopping or
    the --max-time budget (checked after each step; a run out of time is evaluated once more, unless
    it was just evaluated and one more step would not fit)."""
    if state.step < run.total and out_of_time(run, state):  # resumed with the budget already spent
        state.out_of_time = True
        return
    while state.step < run.total:  # run.total may be re-fitted on the way (plan.refit)
        rec = _train_step(run, state, state.step)
        run.log.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", ex_s=f"{rec['examples_per_s']:.1f}")
        done, eval_s = state.step, 0.0
        state.out_of_time = done != run.total and out_of_time(run, state)
        if run.has_dev and (done % run.eval_every == 0 or done == run.total or state.out_of_time):
            # the main process evaluates (with a sharded base, every process: its layers are shared)
            sharded, t_eval = run.model.sharded, time.perf_counter()
            state.stopped = run.rt.broadcast(_evaluate(run, state) if run.rt.is_main or sharded else None)
            if sharded:
                sharded.end_step()
            state.elapsed, eval_s = time.perf_counter() - run.t_start, time.perf_counter() - t_eval
            state.out_of_time = state.out_of_time or (done != run.total and no_time_for_a_step(run, state))
        if done == run.refit_at and not (state.stopped or state.out_of_time):
            _say(run.quiet, refit(run, state, eval_s or run.eval_estimate))
            bar.total = run.total
        if run.ckpt_every and (done % run.ckpt_every == 0 or state.stopped or state.out_of_time) and done != run.total:
            _checkpoint(run, state)
        if state.stopped:
            _say(run.quiet, f"stopped by on_eval after step {done}" if state.halted else
                 f"early stopping after step {done}: no improvement in {run.config.patience} evaluations")
            break
        if state.out_of_time:
            _say(run.quiet, f"--max-time {run.config.max_time:g}s spent after step {done} of {run.total}")
            break


def _train_step(run: Run, state: LoopState, step: int) -> dict:
    """Optimizer step ``step`` (0-based) on its global batch; returns its metrics record."""
    config = run.config
    t0 = time.perf_counter()
    lr = lr_at(step, run.total, config.lr, run.warm, config.schedule)
    for g in run.opt.param_groups:
        g["lr"] = lr
    batch = SAMPLINGS[config.sampling](step, run.lengths, run.row_keys, config.batch_size, config.seed, run.order_cache)
    loss_sum = _backward(run, batch)  # unweighted: the logged loss means the same under every --class-weights
    _apply_gradients(run, {run.rows[i].task for i in batch}, loss_sum)
    state.examples += len(batch)
    dt = time.perf_counter() - t0
    state.train_time += dt
    state.elapsed = time.perf_counter() - run.t_start
    state.step = step + 1
    return {"step": step + 1, "loss": float(loss_sum) / len(batch), "lr": lr, "examples": state.examples,
            "examples_per_s": len(batch) / dt, "elapsed": round(state.elapsed, 3)}


def _backward(run: Run, batch: list[int]) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of ``batch``; returns its summed row loss ()."""
    config, rt, m = run.config, run.rt, run.model
    loss_sum = torch.zeros((), device=m.device)
    micros = (lockstep_micro_batches(batch, run.task_of, rt.world_size, rt.rank, config.grad_accum) if m.sharded
              else [(mb, len(mb)) for mb in shard(batch, rt.world_size, rt.rank, config.grad_accum)])
    for micro, own in micros:  # sharded: rows borrowed to keep the processes in step carry no loss
        with autocast(m.device, m.amp):
            tasks = {run.rows[i].task for i in micro}  # a reparameterised prompt is computed only when used
            prompts = [p() if t in tasks else None for t, p in enumerate(run.params)]
            losses = row_losses(m.pm, prompts, [run.rows[i] for i in micro], run.label_ids,
                                config.classify_loss, share_prefix=share_prompt_prefix(m.device),
                                kinds=[t.spec.kind for t in run.tasks])[:own]
            weighted = losses if run.row_weights is None else losses * torch.tensor(  # (own,) --class-weights
                [run.row_weights[i] for i in micro[:own]], dtype=losses.dtype, device=losses.device)
            loss = weighted.sum() / config.batch_size  # global batch: weights average 1 over the training rows
        run.scaler.scale(loss).backward()
        loss_sum += losses.detach().sum()
    if m.sharded:
        m.sharded.end_step()  # every process, in step: free the gathered layers
    return loss_sum


def _apply_gradients(run: Run, in_batch: set[int], loss_sum: torch.Tensor) -> None:
    """Sum the prompts' gradients (and the loss) over processes, clip per prompt, step, zero."""
    opt, scaler = run.opt, run.scaler
    params = [list(m.parameters()) for m in run.params]  # per task: its prompt's tensors
    for i, ps in enumerate(params):  # a prompt whose task is in the global batch steps, even with no local rows
        for p in ps:
            if i in in_batch and p.grad is None:
                p.grad = torch.zeros_like(p)
            elif i not in in_batch:
                p.grad = None
    run.rt.all_reduce_sum([p.grad for ps in params for p in ps if p.grad is not None] + [loss_sum])
    scaler.unscale_(opt)
    if run.config.max_grad_norm is not None:
        for i, ps in enumerate(params):
            if i in in_batch:
                torch.nn.utils.clip_grad_norm_(ps, run.config.max_grad_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def _evaluate(run: Run, state: LoopState) -> bool:
    """Evaluate on the dev sets, keep each task's best prompt; True when early stopping says stop."""
    step, m = state.step, run.model
    current = [collapse(p) for p in run.params]
    metrics = _eval_tasks(m.pm, current, run.tasks, m.amp, m.device, run.config.eval_batch_size, run.quiet)
    improved = False
    for i, t in enumerate(run.tasks):
        if t.name not in metrics:
            continue
        key = run.balance[i].select_metric
        rank = _rank(metrics[t.name], key, run.balance[i].direction)
        if t.name not in state.best or rank > tuple(state.best[t.name]["rank"]):
            state.best[t.name] = {"metric": key, "value": metrics[t.name][key], "step": step,
                                  "metrics": metrics[t.name], "rank": list(rank)}
            state.best_prompts[i] = current[i]
            improved = True
    state.bad_evals = 0 if improved else state.bad_evals + 1
    run.log.append({"step": step, "eval": metrics, "improved": improved,
                    "select_metric": {t.name: b.select_metric for t, b in zip(run.tasks, run.balance)}})
    _say(run.quiet, f"step {step}: " + "; ".join(
        f"{n} {b.select_metric} {metrics[n][b.select_metric]:.4f}"
        for t, b in zip(run.tasks, run.balance) for n in [t.name] if n in metrics)
        + ("" if improved else f" (no improvement x{state.bad_evals})"))
    if run.on_eval is not None and run.rt.is_main and run.on_eval(DevResult(step, metrics, {  # main decides for all
            t.name: b.select_metric for t, b in zip(run.tasks, run.balance) if t.name in metrics})):
        state.halted = True
        return True
    patience = run.config.patience
    return patience is not None and state.bad_evals >= patience and step < run.total


def _rank(metrics: dict, key: str, direction: int = 1) -> tuple[float, float]:
    """Order of dev results: the select metric (``direction`` -1: lower is better), ties broken by
    the lower log loss (classification)."""
    return (direction * float(metrics[key]), -float(metrics.get("log_loss", 0.0)))


def _checkpoint(run: Run, state: LoopState, finished: bool = False) -> None:
    """The main process writes the checkpoint; every process waits for it."""
    if run.rt.is_main:
        save_checkpoint(run.ckpt_path, state.to_checkpoint(
            [t.name for t in run.tasks], _tensors(run.params), run.opt, run.scaler, run.config.result_settings(),
            run.fingerprint, finished=finished, plan=plan_record(run)))
    run.rt.barrier()


def _finish(run: Run, state: LoopState) -> TrainResult:
    """The last checkpoint, the prompt files, the result."""
    for i, t in enumerate(run.tasks):  # a task without a dev set keeps its last prompt
        if not t.dev:
            state.best_prompts[i] = collapse(run.params[i])
    if run.ckpt_every:
        _checkpoint(run, state, finished=True)
    seconds = time.perf_counter() - run.t_start
    ex_s = state.examples / state.train_time if state.train_time > 0 else 0.0
    paths = _write_prompts(run, state, seconds, ex_s)
    run.rt.barrier()
    run.log.close()
    best = state.best
    for t in run.tasks:
        _say(run.quiet, f"saved {t.out}" + (f" ({best[t.name]['metric']} {best[t.name]['value']:.4f} at step "
                                            f"{best[t.name]['step']})" if t.name in best else ""))
    return TrainResult(paths=paths, run_dir=run.run_dir, steps=state.step, examples=state.examples, seconds=seconds,
                       examples_per_s=ex_s, metrics={k: v["metrics"] for k, v in best.items()},
                       best_step={k: v["step"] for k, v in best.items()}, history=run.log.records,
                       stopped_early=state.stopped and not state.halted, out_of_time=state.out_of_time)


def _write_prompts(run: Run, state: LoopState, seconds: float, ex_s: float) -> dict[str, Path]:
    """Each task's best prompt as a prompt file, its training summary in the metadata (main process writes)."""
    config, rt, m = run.config, run.rt, run.model
    rss = rt.gather(peak_rss_mb()) if m.sharded else None  # every process, in step
    cals = fit_calibrations(run, state) if run.rt.is_main or m.sharded else [None] * len(run.tasks)
    paths: dict[str, Path] = {}
    for i, t in enumerate(run.tasks):
        b = state.best.get(t.name, {})
        summary = TrainingSummary(
            steps=state.step, planned_steps=run.total, examples=state.examples, train_examples=len(t.train),
            dev_examples=len(t.dev or []), train_file=str(t.config.data), dev_file=t.config.eval,
            best_step=b.get("step", state.step), metric=b.get("metric"), best_metric=b.get("value"),
            dev_metrics=b.get("metrics"), stopped_early=state.stopped and not state.halted,
            stopped_by="on_eval" if state.halted else "early_stopping" if state.stopped else "time" if state.out_of_time else None,
            max_time=config.max_time, seconds=round(seconds, 2), examples_per_s=round(ex_s, 3), processes=rt.world_size,
            precision=precision_name(m.amp), tasks_in_run=len(run.tasks), config=config.result_settings(),
            balance=run.balance[i].summary(), gradient_checkpointing=run.checkpointing, calibrated=cals[i] is not None,
            sharded_base=None if not m.sharded else {
                "layers": len(m.sharded.units), "bytes": m.sharded.full_bytes, "sharded_bytes": m.sharded.sharded_bytes(),
                "bytes_per_process": m.base_bytes, "peak_host_rss_mb_per_process": rss,
                "loaded_by": "process 0" if m.sharding.efficient_loading else "every process"})
        meta = PromptMeta.for_base(m.base, prompt_length(state.best_prompts[i]), name=t.name, training=summary.to_meta(),
                                   method=config.method_of(t.config),
                                   calibration=cals[i].to_meta() if cals[i] else None, **t.spec.to_meta())
        if rt.is_main:
            save_prompt(t.out, state.best_prompts[i].float(), meta, dtype=config.prompt_dtype)
        paths[t.name] = t.out
    return paths


# ----------------------------------------------------------------------------- helpers


def _tensors(prompts) -> list[torch.Tensor]:
    """Every trainable tensor of the prompts, in optimizer order (what a checkpoint holds)."""
    return [p for m in prompts for p in m.parameters()]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr, desc="train")


def _say(quiet: bool, msg: str | None) -> None:
    if not quiet and msg:
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
