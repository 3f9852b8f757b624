"""Experiment trackers: a training run's config and every metrics record, sent to TensorBoard,
MLflow or Weights & Biases as well as to ``metrics.jsonl`` (``--report-to``, with Accelerate's
tracker names).

The training loop emits each record once (``train.MetricsLog.append``); :class:`Trackers` is one
more sink of those records and fans them out to the chosen backends (:data:`TRACKERS`, one small
class each), under the same step numbers as ``metrics.jsonl``: ``train/loss``, ``train/lr``,
``train/examples_per_s``, ... at each optimizer step, ``eval/<task>/<metric>`` at each evaluation.
Only the main process of a distributed run opens trackers. Each backend is an optional extra; a
missing one is refused when the settings are validated, before anything loads or is written.
A resumed run continues the same tracker run where the backend can (``trackers.json`` in the run
directory keeps the ids).

Not here: the records themselves and metrics.jsonl (records.py), the HTML report (evaluate/report.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError

STATUSES = ("FINISHED", "FAILED", "KILLED")
"""How a run ended (MLflow's run statuses)."""


@dataclass(frozen=True)
class RunInfo:
    """What a tracker is told when it opens.

    Args:
        name: the run's name (``--run-name``).
        run_dir: the run directory (file-based trackers write under it).
        config: the run's settings (nested; :func:`flat_config` flattens them for flat backends).
        start_step: the step a resumed run continues from (0: a new run).
        resume_id: the backend's id of the run being resumed, if it recorded one.
    """

    name: str
    run_dir: Path
    config: dict
    start_step: int = 0
    resume_id: str | None = None


class Tracker:
    """One backend's open run."""

    id: str | None = None
    """The backend's id of this run (kept in trackers.json so that --resume continues it)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- records -> scalars (pure)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def scalars(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tracker scalars (pure): a step record's numbers as
    ``train/<key>``, an evaluation's as ``eval/<task>/<metric>``; ``step`` and flags left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "eval" and isinstance(value, dict):
            for task, metrics in value.items():
                for name, v in (metrics or {}).items():
                    if _number(v):
                        out[f"eval/{task}/{name}"] = float(v)
        elif key != "step" and _number(value):
            out[f"train/{key}"] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested settings as ``a.b`` / ``tasks.0.name`` keys with scalar values (pure); lists of
    scalars and None as JSON text."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.update(flat_config(v, f"{name}.{i}."))
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


# ----------------------------------------------------------------------------- backends


class TensorBoardTracker(Tracker):
    """Event files in ``<run dir>/tensorboard/<run name>/`` (``tensorboard --logdir <run dir>/tensorboard``):
    scalars, the config as text and as HParams. A resumed run purges the events after its step."""

    def __init__(self, info: RunInfo):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = info.run_dir / "tensorboard" / info.name
        # a resumed run drops what the killed run logged after its checkpoint (steps > start_step)
        self.writer = SummaryWriter(str(self.dir), purge_step=info.start_step + 1 if info.start_step else None,
                                    flush_secs=10)
        if not info.start_step:
            flat = flat_config(info.config)
            self.writer.add_text("config", "```json\n" + json.dumps(info.config, indent=2, default=str) + "\n```", 0)
            for summary in hparams(flat, {}):  # the HParams dashboard, in this run's own folder
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if any(k.startswith("eval/") for k in metrics):
            self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


class MLflowTracker(Tracker):
    """A run in MLflow's tracking store (``MLFLOW_TRACKING_URI``, else MLflow's default), experiment
    ``MLFLOW_EXPERIMENT_NAME`` (default "softprompt"): the config as params, the scalars as metrics."""

    MAX_PARAMS = 100  # per log_batch call (MLflow's limit)

    def __init__(self, info: RunInfo):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self.client = MlflowClient()
        if info.resume_id:
            self.id = info.resume_id
            self.client.update_run(self.id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "softprompt"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(exp_id, run_name=info.name, tags={"mlflow.source.name": "softprompt train"})
        self.id = run.info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flat_config(info.config).items()]
        for i in range(0, len(params), self.MAX_PARAMS):
            self.client.log_batch(self.id, params=params[i:i + self.MAX_PARAMS])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.id, status=status)


class WandbTracker(Tracker):
    """A Weights & Biases run (project ``WANDB_PROJECT``, default "softprompt"; ``WANDB_MODE=offline``
    keeps it local), its files under the run directory unless ``WANDB_DIR`` says otherwise."""

    def __init__(self, info: RunInfo):
        import wandb

        kw: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT") or "softprompt", "name": info.name,
                              "config": info.config}
        if not os.environ.get("WANDB_DIR"):
            kw["dir"] = str(info.run_dir.resolve())  # wandb-core, started once per process, has its own cwd
        if info.resume_id:
            kw.update(id=info.resume_id, resume="allow")
        self.run = wandb.init(**kw)
        self.id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


@dataclass(frozen=True)
class Backend:
    """A tracker backend: the module it needs (checked up front), the extra that installs it, its class."""

    module: str
    package: str
    extra: str
    open: Callable[[RunInfo], Tracker]


TRACKERS: dict[str, Backend] = {
    "tensorboard": Backend("tensorboard", "tensorboard", "tensorboard", TensorBoardTracker),
    "mlflow": Backend("mlflow", "mlflow", "mlflow", MLflowTracker),
    "wandb": Backend("wandb", "wandb", "wandb", WandbTracker),
}
"""Tracker backends by Accelerate's ``log_with`` / Transformers' ``report_to`` name."""


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name].module) is not None


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """``--report-to``: comma-separated tracker names, ``none`` (the default) or ``all`` (every
    installed tracker). Raises ConfigError naming an unknown tracker or the package a chosen one needs."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    choices = f"{', '.join(TRACKERS)} (or all, none)"
    if not names or names == ["none"]:
        return []
    if "none" in names:
        raise ConfigError(f"--report-to: 'none' cannot be combined with trackers, got {','.join(names)}")
    if "all" in names:
        found = [n for n in TRACKERS if installed(n)]
        if not found:
            raise ConfigError(f"--report-to all: no tracker is installed; pip install 'softprompt[tracking]'")
        return found
    for n in names:
        if n not in TRACKERS:
            raise ConfigError(f"--report-to: unknown tracker {n!r}; choose from {choices}")
        if not installed(n):
            b = TRACKERS[n]
            raise ConfigError(f"--report-to {n} needs the {b.package} package: pip install 'softprompt[{b.extra}]'")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- the sink


class Trackers:
    """The chosen trackers of one run, fed every metrics record (a sink of ``MetricsLog``)."""

    STATE = "trackers.json"
    """Tracker run ids in the run directory (a resumed run continues them)."""

    def __init__(self, trackers: dict[str, Tracker], run_dir: Path | None = None):
        self.trackers = trackers
        self.run_dir = run_dir
        self.closed = False

    @classmethod
    def open(cls, names: Sequence[str], name: str, run_dir: Path, config: dict, start_step: int = 0) -> "Trackers":
        """Open each tracker in ``names`` (none: an empty sink). On a resumed run (``start_step`` > 0)
        each continues the run recorded in ``trackers.json`` where it can. A tracker that cannot
        start closes those already open and raises ConfigError naming it."""
        if not names:
            return cls({})
        state_path = run_dir / cls.STATE
        ids = {}
        if start_step and state_path.is_file():
            try:
                ids = json.loads(state_path.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                ids = {}
        opened: dict[str, Tracker] = {}
        for n in names:
            try:
                opened[n] = TRACKERS[n].open(RunInfo(name, run_dir, config, start_step,
                                                     ids.get(n) if start_step else None))
            except Exception as e:  # a store that cannot be reached, bad credentials, ...
                cls(opened).close("FAILED")
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"--report-to {n}: cannot start the tracker ({first[:300]})") from None
        sink = cls(opened, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        from ..artifact import atomic_write_bytes

        atomic_write_bytes(state_path, json.dumps({n: t.id for n, t in opened.items() if t.id}, indent=2).encode())
        return sink

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, record: dict) -> None:
        """Send one metrics.jsonl record to every tracker, at its step. A tracker that fails (a server
        gone away) is dropped with one warning; training and the other sinks go on."""
        metrics = scalars(record)
        if metrics and not self.closed:
            for name, t in list(self.trackers.items()):
                try:
                    t.log(metrics, int(record["step"]))
                except Exception as e:  # noqa: BLE001 - a tracker must not cost the run its prompt
                    self._drop(name, "logging", e)

    def close(self, status: str = "FINISHED") -> None:
        """End every tracker's run (once); ``status``: FINISHED, FAILED or KILLED."""
        if self.closed:
            return
        self.closed = True
        for name, t in list(self.trackers.items()):
            try:
                t.finish(status)
            except Exception as e:  # noqa: BLE001
                self._drop(name, "closing the run", e)

    def _drop(self, name: str, what: str, error: Exception) -> None:
        self.trackers.pop(name, None)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"softprompt: warning: --report-to {name}: {what} failed ({first[:300]}); "
              "training goes on without it (metrics.jsonl has every record)", file=sys.stderr)
