"""The vLLM client against a real ``vllm serve`` (marker ``vllm``; needs ``make vllm-env``).

One server on the default model (float32, eager, CPU, ``--enable-prompt-embeds``) is started per
session; every answer is compared with our own engine (scoring.generate / classify_scores) on the
same prompt. A second, tiny server without ``--enable-prompt-embeds`` checks that start-up error.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt import PromptMeta, SoftPrompt, load_prompt, save_prompt
from softprompt.data import TaskSpec
from softprompt.model import PromptedModel
from softprompt.scoring import classify_scores, generate
from softprompt.vllm import EmbeddingTable, VLLMClient, VLLMError
from softprompt.vllm.launch import start_vllm, vllm_venv

ROOT = Path(__file__).resolve().parents[1]
VENV = vllm_venv()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not (VENV / "bin" / "vllm").is_file(),
                       reason=f"no vLLM venv at {VENV} (build it with `make vllm-env`)"),
]

PROB_TOL = 2e-3
"""Most |class probability difference| vs our engine, float32 on both sides (measured ~1e-5)."""
LABELS = ["sports", "business", "science and technology", "world news"]
TEMPLATE = "Headline: {text}\nTopic:"
HEADLINES = [
    "The home team won the cup final in extra time",
    "Shares fell after the central bank raised interest rates",
    "A new phone with a faster chip was announced at the trade show",
    "The minister said the election will be held next spring",
    "Scientists find water ice near the moon's south pole",
    "Oil prices climb as supply worries grow",
]


@pytest.fixture(scope="session")
def server(vllm_server):
    return vllm_server  # conftest: one server for all vllm tests of the session


@pytest.fixture(scope="session")
def table():
    return EmbeddingTable.load(None)


@pytest.fixture(scope="session")
def client(server, table):
    return VLLMClient(server.url, table)


@pytest.fixture(scope="session")
def pm(default_base):
    return PromptedModel(default_base)


def make_prompt(base, path: Path, task: str, init_text: str, P: int = 8, **meta) -> Path:
    """A prompt file initialised from real words (so the model says something sensible)."""
    sp = SoftPrompt.initialize(base.embedding, base.tokenizer, P, "text", text=init_text)
    save_prompt(path, sp.weight.detach(), PromptMeta.for_base(base, P, task=task, **meta), dtype="float32")
    return path


@pytest.fixture(scope="session")
def topic_file(default_base, tmp_path_factory):
    return make_prompt(default_base, tmp_path_factory.mktemp("p") / "topic.safetensors", "classify",
                       "Classify the topic of the news headline", template=TEMPLATE, labels=LABELS,
                       verbalizer={"world news": "world"})


@pytest.fixture(scope="session")
def story_file(default_base, tmp_path_factory):
    return make_prompt(default_base, tmp_path_factory.mktemp("p") / "story.safetensors", "generate",
                       "Write a short story about the sea", template="Title: {input}\nStory:")


def ours_generate(pm, prompt, ids, **kw):
    return generate(pm, prompt, ids, **kw)


def test_the_client_reads_the_kv_block_size_and_prefix_caching_from_vllm(client):
    # start_vllm launches with --block-size 32 and --enable-prefix-caching (statistics on here)
    assert (client.info.block_size, client.info.prefix_caching) == (32, True)


def test_greedy_generation_equals_our_engine(client, pm, story_file):
    prompt = load_prompt(story_file)
    spec = TaskSpec.from_meta(prompt.meta)
    ids = [spec.source_ids(pm.base.tokenizer, t) for t in ["The old lighthouse", "A storm at night", "Fishing"]]
    theirs = client.generate(prompt, ids, max_tokens=16)
    ours = ours_generate(pm, prompt.tensor, ids, max_new_tokens=16)
    for a, b in zip(theirs, ours):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    assert len(theirs[0].token_ids) == 16
    # the prompt matters: without it the same tokens continue differently
    bare = client.generate(None, ids, max_tokens=16)
    assert bare[0].token_ids == ours_generate(pm, prompt.tensor[:0], ids[:1], max_new_tokens=16)[0].token_ids
    assert any(x.token_ids != y.token_ids for x, y in zip(bare, theirs))


def test_stop_strings_and_seeded_sampling(client, pm, story_file):
    prompt = load_prompt(story_file)
    ids = [TaskSpec.from_meta(prompt.meta).source_ids(pm.base.tokenizer, "The old lighthouse")]
    full = ours_generate(pm, prompt.tensor, ids, max_new_tokens=16)[0]
    word = full.text.split()[3]
    ours = ours_generate(pm, prompt.tensor, ids, max_new_tokens=16, stop=[word])[0]
    theirs = client.generate(prompt, ids, max_tokens=16, stop=[word])[0]
    assert theirs.finish_reason == ours.finish_reason == "stop" and theirs.text == ours.text
    a = client.generate(prompt, ids * 3, max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    b = client.generate(prompt, ids * 3, max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]  # seeded: reproducible
    assert len({tuple(g.token_ids) for g in a}) > 1  # row i samples with seed + i


def test_classification_equals_our_engine(client, pm, topic_file, capsys):
    prompt = load_prompt(topic_file)
    spec = TaskSpec.from_meta(prompt.meta)
    tok = pm.base.tokenizer
    label_ids = spec.label_ids(tok)
    assert max(len(x) for x in label_ids) >= 3  # multi-token labels take continuation requests
    got = client.classify(prompt, HEADLINES)
    with torch.no_grad():
        scores = classify_scores(pm, prompt.tensor, [spec.source_ids(tok, t) for t in HEADLINES], label_ids)
    probs = scores.softmax(-1)  # (B, C)
    diff = max(abs(g.probs[lab] - float(probs[i, c])) for i, g in enumerate(got) for c, lab in enumerate(LABELS))
    sdiff = float((torch.tensor([g.scores for g in got]) - scores).abs().max())
    with capsys.disabled():
        print(f"\n[vllm] classification vs our engine: max |prob diff| {diff:.2e}, max |log-prob diff| {sdiff:.2e}")
    assert [g.label for g in got] == [LABELS[int(i)] for i in probs.argmax(-1)]
    assert diff < PROB_TOL
    assert abs(sum(got[0].probs.values()) - 1) < 1e-5


def test_more_labels_than_one_request_reads(client, pm, topic_file):
    """25 labels: the first tokens are read in two requests (vLLM's --max-logprobs is 20)."""
    prompt = load_prompt(topic_file)
    tok = pm.base.tokenizer
    words = ("red green blue black white brown pink gray gold silver water fire earth wind stone "
             "tree river cloud snow rain sun moon star sea sky").split()
    label_ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    src = [tok("My favourite word is", add_special_tokens=True)["input_ids"]]
    theirs = client.label_scores(prompt, src, label_ids)
    with torch.no_grad():
        ours = classify_scores(pm, prompt.tensor, src, label_ids)
    assert len({ids[0] for ids in label_ids}) > 20
    assert float((theirs.softmax(-1) - ours.softmax(-1)).abs().max()) < PROB_TOL


def test_mixed_prompts_in_one_concurrent_batch(client, pm, topic_file, story_file):
    topic, story = load_prompt(topic_file), load_prompt(story_file)
    tok = pm.base.tokenizer
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in HEADLINES[:4]]
    rows = [topic, story, None, story]
    mixed = client.generate(None, ids, max_tokens=10, prompts=rows)
    for i, (row, g) in enumerate(zip(rows, mixed)):
        t = row.tensor if row is not None else topic.tensor[:0]
        assert g.token_ids == ours_generate(pm, t, [ids[i]], max_new_tokens=10)[0].token_ids, i
    # classification rows with different prompts in one call equal each prompt alone
    spec = TaskSpec.from_meta(topic.meta)
    src = [spec.source_ids(tok, t) for t in HEADLINES[:2]]
    labs = spec.label_ids(tok)
    both = client.label_scores(None, src, labs, prompts=[topic, story])
    assert torch.allclose(both[0], client.label_scores(topic, src[:1], labs)[0], atol=1e-4)
    assert torch.allclose(both[1], client.label_scores(story, src[1:], labs)[0], atol=1e-4)


def test_a_prompt_file_written_at_run_time(client, pm, default_base, tmp_path):
    path = make_prompt(default_base, tmp_path / "sentiment.safetensors", "classify",
                       "Is this review positive or negative", template="Review: {text}\nSentiment:",
                       labels=["positive", "negative"])
    prompt = load_prompt(path)  # the client only needs the new file; the server is not touched
    texts = ["I loved this film, wonderful acting", "Terrible service, I want my money back"]
    got = client.classify(prompt, texts)
    spec = TaskSpec.from_meta(prompt.meta)
    with torch.no_grad():
        probs = classify_scores(pm, prompt.tensor, [spec.source_ids(pm.base.tokenizer, t) for t in texts],
                                spec.label_ids(pm.base.tokenizer)).softmax(-1)
    for g, p in zip(got, probs):
        assert abs(g.probs["positive"] - float(p[0])) < PROB_TOL


def test_another_base_behind_the_url(server, table, default_base, tmp_path):
    # same tokenizer, vocabulary and width, other embedding weights: only the log-prob probe sees it
    other = EmbeddingTable(weight=table.weight + 0.05 * torch.randn_like(table.weight), tokenizer=table.tokenizer,
                           name="other-copy", source=table.source)
    with pytest.raises(VLLMError, match="is another base model: the same tokens sent as ids") as e:
        VLLMClient(server.url, other)
    assert "\n" not in str(e.value)
    # another width: the probe's embeddings are refused by the server
    wide = EmbeddingTable(weight=torch.randn(table.vocab_size, table.dim + 8), tokenizer=table.tokenizer,
                          name="wide", source=table.source)
    with pytest.raises(VLLMError, match="embedding width differs"):
        VLLMClient(server.url, wide)
    # a prompt file of another model is refused before any request
    client = VLLMClient(server.url, table)
    from softprompt.testing import tiny_base

    tiny = tiny_base(tmp_path / "tiny")
    path = make_prompt(tiny, tmp_path / "tiny.safetensors", "classify", "the topic", template=TEMPLATE,
                       labels=["sports", "business"])
    with pytest.raises(Exception, match="prompt width"):
        client.classify(load_prompt(path), ["x"])


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A tiny random model served WITHOUT --enable-prompt-embeds."""
    from softprompt.testing import tiny_model_dir

    root = tmp_path_factory.mktemp("tinyvllm")
    model = tiny_model_dir(root / "llama", "llama", hidden=256)  # head_dim 64: vLLM CPU attention has no 16
    srv = start_vllm(model, log=root / "serve.log", prompt_embeds=False, max_model_len=512)
    yield srv, model
    srv.stop()


def test_server_without_prompt_embeds_and_other_tokenizer(tiny_server, table):
    srv, model = tiny_server
    with pytest.raises(VLLMError, match="without --enable-prompt-embeds; restart it with that flag"):
        VLLMClient(srv.url, EmbeddingTable.load(str(model)))
    with pytest.raises(VLLMError, match="tokenizes differently"):
        VLLMClient(srv.url, table)  # the default model's table against the tiny model
    # softprompt serve --backend vllm runs the same checks at start, before it serves
    from softprompt.serve import create_engine
    from softprompt.serve.config import ServeConfig

    with pytest.raises(VLLMError, match="without --enable-prompt-embeds; restart it with that flag") as e:
        create_engine(ServeConfig(port=0, backend="vllm", vllm_url=srv.url, model=str(model)))
    assert "\n" not in str(e.value)


def test_export_vllm_and_the_readme_client_example(server, topic_file, client, tmp_path):
    from softprompt.cli import main

    out = tmp_path / "topic-vllm"
    assert main(["export", str(topic_file), "--format", "vllm", "--out", str(out)]) == 0
    info = json.loads((out / "prompt.json").read_text())
    assert info["labels"] == LABELS and info["label_words"][-1] == "world" and info["label_lead"] == " "
    from docs_examples import page

    readme = page("Serving on vLLM")
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "urllib" in b)
    script = tmp_path / "example.py"
    from softprompt.base import resolve_model

    script.write_text(example.replace("http://localhost:8000", server.url)
                      .replace('"topic-vllm"', repr(str(out)))
                      .replace('"path/to/SmolLM2-135M-Instruct"', repr(resolve_model(None)[1])))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    probs = json.loads(run.stdout.strip().splitlines()[-1])
    ours = client.classify(load_prompt(topic_file), [HEADLINES[0]])[0]
    assert set(probs) == set(LABELS)
    assert max(abs(probs[k] - ours.probs[k]) for k in LABELS) < PROB_TOL
