"""The task-kinds registry (softprompt.tasks): every entry complete, a lookup of an unknown kind one
line naming the choices, every `Literal` / CLI choice of kind names the registry's, and the sites
(data, training, evaluation, baselines, predict, serving, vLLM export) reading the entry: changing
nothing but an entry changes what they do. No kind comparisons outside the registry (AST scan, as
tests/test_methods.py does for prompt methods)."""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import typing

import pytest
import torch

from softprompt.data import Example, TaskSpec, load_examples
from softprompt.errors import ConfigError, DataError
from softprompt.tasks import TASK_KINDS, TASKS, Serving, Task, TaskKind, labelled_kind, task

from registry_scan import comparisons_outside, name_comparisons

LABELS = ["neg", "pos"]


# ----------------------------------------------------------------------------- the registry itself


@pytest.mark.parametrize("name", list(TASKS))
def test_every_kind_has_every_field(name):
    t = TASKS[name]
    assert isinstance(t, Task) and t.name == name and isinstance(t.serving, Serving)
    for f in dataclasses.fields(Task):
        value = getattr(t, f.name)
        assert value is not None and value != "" and value != (), f"{name}.{f.name} is empty"
    for f in ("check_spec", "label_ids", "encode_target", "loss", "init", "evaluate", "instruction",
              "shot_target", "shot_frame", "predict"):
        assert callable(getattr(t, f)), f"{name}.{f} is not callable"
    for f in ("start", "running", "advance"):
        assert callable(getattr(t.serving, f))
    assert "{" + t.placeholder + "}" in t.template and len(t.fields) == len(t.field_flags) == 2
    keys = [k for k, _ in t.columns]
    assert t.primary_metric in keys and {k for k, _ in t.report_columns} <= set(keys)
    assert t.init(True) and t.init(False)


def test_entries_fit_the_rest_of_softprompt():
    """Baselines, init strategies and serving hooks an entry names exist where it says."""
    from softprompt.evaluate.baselines import BASELINES
    from softprompt.prompt import INIT_STRATEGIES
    from softprompt.serve.steps import ModelSteps

    for t in TASKS.values():
        assert list(t.baselines) == [b for b in BASELINES if b in t.baselines], t.name  # known, in table order
        assert {t.init(True), t.init(False)} <= set(INIT_STRATEGIES)
        for hook in (t.serving.start, t.serving.advance):
            assert callable(hook(ModelSteps)) and hook(ModelSteps).__qualname__.startswith("ModelSteps.")
        assert isinstance(t.serving.running(ModelSteps), property)
    for f in ("placeholder", "template", "fields"):
        values = [getattr(t, f) for t in TASKS.values()]
        assert len(set(values)) == len(values), f  # a file or a template tells its kind


def test_unknown_kind_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        task("regress", "--task")
    assert str(e.value) == "--task: unknown task 'regress'; choose one of classify, generate"
    with pytest.raises(DataError, match=r"^unknown task \['x'\]; choose one of classify, generate$"):
        task(["x"], error=DataError)  # not even a string (JSON metadata can hold anything)
    with pytest.raises(DataError, match=r"^unknown task 'regress'; choose one of classify, generate$"):
        TaskSpec("regress")
    with pytest.raises(DataError, match=r"^unknown task 'regress'; choose one of classify, generate$"):
        load_examples("missing.jsonl", "regress")
    assert task("generate") is TASKS["generate"]
    assert labelled_kind(True) is TASKS["classify"] and labelled_kind(False) is TASKS["generate"]


def test_literal_choices_are_the_registrys():
    """Every `Literal` of kind names (flags, task files, prompt files, the OpenAI schema) is the registry's keys."""
    from softprompt.artifact import PromptMeta
    from softprompt.examples import Dataset
    from softprompt.serve.http.openai_schemas import SoftpromptInfo
    from softprompt.train.config import TrainConfig
    from softprompt.train.task_config import TaskConfig

    names = tuple(TASKS)
    assert typing.get_args(TaskKind) == names == TASK_KINDS
    hints = [typing.get_type_hints(TrainConfig)["task"], typing.get_type_hints(TaskConfig)["task"],
             typing.get_type_hints(Dataset)["kind"], typing.get_type_hints(SoftpromptInfo)["task"]]
    meta = typing.get_type_hints(PromptMeta)["task"]  # Literal[...] | None
    hints.append(next(a for a in typing.get_args(meta) if a is not type(None)))
    for hint in hints:
        assert typing.get_args(hint) == names, hint
    for cls in (TrainConfig, TaskConfig):
        assert cls.__dataclass_fields__["task"].default == names[0]  # the registry's first is the default


def test_cli_choices_come_from_the_registry():
    from softprompt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
    flag = {o: a for a in sub["train"]._actions for o in a.option_strings}["--task"]
    assert list(flag.choices) == list(TASKS) and flag.default == "classify"
    flag = {o: a for a in sub["import"]._actions for o in a.option_strings}["--task"]
    assert list(flag.choices) == list(TASKS) and flag.default is None


# ----------------------------------------------------------------------------- each entry's facts


def test_spec_checks_per_kind():
    with pytest.raises(DataError, match="needs at least 2 labels"):
        TaskSpec("classify", labels=["a"])
    with pytest.raises(DataError, match="^labels and a verbalizer only apply to --task classify$"):
        TaskSpec("generate", labels=LABELS)
    assert TaskSpec("classify", labels=LABELS).template == "Text: {text}\nLabel:"
    assert TaskSpec("generate").template == "Input: {input}\nOutput:"


def test_targets_per_kind(tiny):
    tok = tiny.tokenizer
    spec = TaskSpec("classify", labels=LABELS)
    assert TASKS["classify"].encode_target(spec, tok, "pos") == 1
    assert TASKS["classify"].label_ids(spec, tok) == spec.label_ids(tok)
    gen = TaskSpec("generate")
    assert TASKS["generate"].encode_target(gen, tok, "a b") == gen.target_ids(tok, "a b")
    assert TASKS["generate"].label_ids(gen, tok) is None
    assert TASKS["classify"].init(True) == "labels" and TASKS["generate"].init(True) == "text"
    assert TASKS["generate"].init(False) == "vocab"


# ----------------------------------------------------------------------------- the sites read the entry


def _swap(monkeypatch, name: str, **changes) -> Task:
    new = dataclasses.replace(TASKS[name], **changes)
    monkeypatch.setitem(TASKS, name, new)
    return new


def test_spec_and_data_read_the_entry(monkeypatch, tmp_path):
    """Default template, placeholder, field names and the label strip come from the entry."""
    _swap(monkeypatch, "generate", template="Q: {q}\nA:", placeholder="q", fields=("q", "a"))
    spec = TaskSpec("generate")
    assert spec.template == "Q: {q}\nA:" and spec.render("hi") == "Q: hi\nA:"
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"q": "x", "a": " y "}) + "\n")
    assert load_examples(f, "generate")[0] == Example("x", " y ", 1)
    _swap(monkeypatch, "generate", labelled=True)  # a labelled kind strips its targets
    assert load_examples(f, "generate")[0].target == "y"


def test_examples_sampling_reads_the_entry(monkeypatch):
    from softprompt.examples import jsonl_bytes, split

    exs = [Example(f"t{i}", "a" if i < 10 else "b") for i in range(20)]
    assert sorted(e.target for e in split(exs, "classify", seed=1)["test"]) == ["a", "b"]  # stratified
    assert split(exs, "classify", seed=1) != split(exs, "generate", seed=1)
    _swap(monkeypatch, "classify", labelled=False, fields=("x", "y"))
    assert split(exs, "classify", seed=1) == split(exs, "generate", seed=1)  # not stratified, as generation
    assert json.loads(jsonl_bytes(exs[:1], "classify")) == {"x": "t0", "y": "a"}


def test_evaluate_prompt_asks_the_entry(monkeypatch):
    from softprompt.evaluate import evaluate_prompt

    seen = {}

    def fake(pm, prompt, spec, examples, batch_size, biases, **gen_kw):
        seen.update(gen_kw, batch_size=batch_size)
        return {"pinned": 1.0}

    _swap(monkeypatch, "classify", evaluate=fake)
    spec = TaskSpec("classify", labels=LABELS)
    assert evaluate_prompt(None, None, spec, [], 3, stop=["x"]) == {"pinned": 1.0}
    assert seen == {"stop": ["x"], "batch_size": 3}


def test_row_losses_ask_each_kind(monkeypatch):
    """Rows are grouped by kind; each kind's loss gives its rows' losses, put back in row order."""
    from softprompt.train.objective import Row, row_losses

    def fake(value):
        return lambda pm, prompts, rows, label_ids, share, loss: (
            torch.tensor([value + r.task for r in rows], dtype=torch.float32), list(range(len(rows))))

    _swap(monkeypatch, "classify", loss=fake(10.0))
    _swap(monkeypatch, "generate", loss=fake(20.0))
    p = torch.zeros(2, 4)
    rows = [Row(1, [1], [2]), Row(0, [1], 0), Row(1, [3], [4]), Row(0, [5], 1)]
    assert row_losses(None, [p, p], rows, [[[1], [2]], None]).tolist() == [21.0, 10.0, 21.0, 10.0]
    assert row_losses(None, [p, p], rows, [[[1], [2]], None], kinds=["generate", "classify"]).tolist() == \
        [11.0, 20.0, 11.0, 20.0]  # kinds given: they, not the label ids, pick each task's loss


def test_training_rows_read_the_entry(monkeypatch, tiny):
    from types import SimpleNamespace

    from softprompt.train.setup import encode_rows

    spec = TaskSpec("classify", labels=LABELS)
    t = SimpleNamespace(spec=spec, train=[Example("a text", "pos")])
    assert encode_rows([t], tiny.tokenizer)[0].target == 1
    _swap(monkeypatch, "classify", encode_target=lambda spec, tok, target: [7, 7])
    assert encode_rows([t], tiny.tokenizer)[0].target == [7, 7]


def test_baselines_read_the_entry(monkeypatch):
    from softprompt.evaluate.baselines import BaselineContext, default_instruction, pick_shots, run_baselines

    spec = TaskSpec("classify", labels=LABELS)
    assert default_instruction(spec, "mood") == "Classify the mood of the text as one of: neg, pos."
    _swap(monkeypatch, "classify", instruction=lambda spec, name: f"Say {name}.", baselines=())
    assert default_instruction(spec, "mood") == "Say mood."
    assert run_baselines(BaselineContext(None, spec, [])) == ({}, {})  # no baseline applies: none runs
    train = [Example(str(i), "a") for i in range(8)] + [Example("b", "b")]
    assert {e.target for e in pick_shots(train, 2, "classify", seed=3)} == {"a", "b"}  # balanced over classes
    _swap(monkeypatch, "classify", labelled=False)
    assert pick_shots(train, 2, "classify", seed=3) == random.Random(3).sample(train, 2)  # a plain sample


def test_predict_asks_the_entry(monkeypatch):
    from types import SimpleNamespace

    from softprompt.predict import Predictor

    _swap(monkeypatch, "generate", predict=lambda predictor, texts: [{"echo": t} for t in texts], fields=("q", "a"))
    p = Predictor.__new__(Predictor)
    p.spec, p.config, p.done = TaskSpec("generate"), SimpleNamespace(source_field=None), 0
    assert p._predict(["x", "y"]) == [{"echo": "x"}, {"echo": "y"}] and p.done == 2
    assert p.source_field == "q"


def test_serving_reads_the_entry(monkeypatch):
    from types import SimpleNamespace

    from softprompt.serve.batching import select_jobs
    from softprompt.serve.http.openai_api import Call

    kinds = ["classify", "generate", "classify"]
    assert select_jobs(kinds, [2, 1, 2], [1, 1, 1], max_rows=2, free_generate_rows=1, max_tokens=100) == [0, 1]
    _swap(monkeypatch, "classify", serving=dataclasses.replace(TASKS["classify"].serving, decodes=True))
    assert select_jobs(kinds, [2, 1, 2], [1, 1, 1], max_rows=2, free_generate_rows=1, max_tokens=100) == [1]
    entry = SimpleNamespace(spec=TaskSpec("generate"), name="g", length=3)
    call = Call(None, None, "t", entry, None)
    assert not call.classify and call.info()["task"] == "generate"
    assert Call(None, None, "t", None, None).info()["task"] == "generate"  # the bare model generates
    _swap(monkeypatch, "generate", labelled=True)  # a labelled kind answers with its labels
    assert call.classify and call.info()["task"] == "generate"


def test_vllm_export_placeholder_reads_the_entry(monkeypatch, tmp_path):
    from softprompt.artifact import LoadedPrompt, PromptMeta
    from softprompt.vllm.export import export_vllm

    meta = PromptMeta(base_model="m", fingerprint="f" * 64, length=2, dim=4, created="2026", task="generate",
                      template="Input: {input}\nOutput:")
    out = export_vllm(LoadedPrompt(torch.zeros(2, 4), meta), tmp_path / "v")
    assert json.loads((out / "prompt.json").read_text())["placeholder"] == "{input}"
    _swap(monkeypatch, "generate", placeholder="src")
    out = export_vllm(LoadedPrompt(torch.zeros(2, 4), meta), tmp_path / "w")
    assert json.loads((out / "prompt.json").read_text())["placeholder"] == "{src}"


# ----------------------------------------------------------------------------- no comparisons outside


def test_no_kind_comparisons_outside_the_registry():
    found = comparisons_outside("tasks", set(TASKS))
    assert not found, f"ask softprompt.tasks instead of comparing task kinds: {found}"


def test_the_scan_can_fail():
    src = ('if spec.kind == "classify":\n    pass\nx = {"classify": 1, "generate": 2}\n'
           'y = kind != "generate"\nz = j.kind in ("classify",)\nw = {"classify": 1}\n')
    assert name_comparisons(ast.parse(src), set(TASKS)) == [1, 3, 4, 5]
