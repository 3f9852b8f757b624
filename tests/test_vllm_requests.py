"""softprompt.vllm without a vLLM server: the embedding table, the wire encoding, the label plan.

The tests against a real ``vllm serve`` are in test_vllm_serve.py (marker ``vllm``).
"""

from __future__ import annotations

import base64
import io

import pytest
import torch

from softprompt.vllm.embeds import EmbeddingTable, decode_embeds, encode_embeds, request_embeds
from softprompt.vllm.labels import Step, label_plan, label_scores


def test_encoding_round_trips_and_sends_only_the_rows():
    big = torch.randn(1000, 64)
    rows = big[10:13]  # a view of a large storage
    data = encode_embeds(rows)
    back = decode_embeds(data)
    assert back.shape == (3, 64) and back.dtype == torch.float32
    assert torch.equal(back, rows)
    # torch.save of the view itself would carry all 1000 rows (256 kB); we send 3.
    assert len(base64.b64decode(data)) < 3 * 64 * 4 + 2000
    # vLLM reads it with torch.load(weights_only=True): no pickled code.
    assert torch.equal(torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True), rows)


def test_encoding_refuses_non_matrices():
    with pytest.raises(ValueError, match=r"\(L, d\)"):
        encode_embeds(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        encode_embeds(torch.zeros(2, 3, dtype=torch.long))


def test_table_reads_only_the_embedding_and_matches_the_model(tiny, tiny_dir):
    table = EmbeddingTable.load(str(tiny_dir))
    W = tiny.embedding.weight
    assert table.weight.shape == W.shape and torch.equal(table.weight.float(), W.float())
    assert table.fingerprint == tiny.fingerprint and table.dim == tiny.dim
    ids = [5, 9, 9, 1]
    assert torch.equal(table.embed(ids), tiny.model.get_input_embeddings()(torch.tensor(ids)).float())
    with pytest.raises(ValueError, match="vocabulary"):
        table.embed([table.vocab_size])


def test_table_applies_the_scaled_embedding_quirk(tiny_family, model_root):
    base = tiny_family("gemma")  # Gemma's embedding module multiplies rows by sqrt(d)
    table = EmbeddingTable.load(str(model_root / "gemma"))
    assert table.scale != 1.0
    ids = torch.tensor([3, 4, 7])
    assert torch.allclose(table.embed(ids.tolist()), base.model.get_input_embeddings()(ids).float())


def test_request_embeds_layout(tiny, tiny_dir):
    table = EmbeddingTable.load(str(tiny_dir))
    prompt = torch.randn(5, tiny.dim, dtype=torch.float16)
    e = request_embeds(prompt, table, [7, 8, 9])
    assert e.shape == (5 + 3, tiny.dim) and e.dtype == torch.float32  # (P + T, d)
    assert torch.equal(e[:5], prompt.float()) and torch.equal(e[5:], table.embed([7, 8, 9]))
    assert torch.equal(request_embeds(None, table, [7]), table.embed([7]))
    with pytest.raises(ValueError, match="prompt must be"):
        request_embeds(torch.zeros(5, tiny.dim + 1), table, [7])


def test_label_plan_shares_prefixes_and_chunks():
    labels = [[5], [6, 7], [6, 8], [9, 7, 1]]
    plan = label_plan(labels)
    assert plan == [Step((), (5, 6, 9)), Step((6,), (7, 8)), Step((9,), (7,)), Step((9, 7), (1,))]
    chunked = label_plan([[t] for t in range(10)], max_targets=4)
    assert [s.targets for s in chunked] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    with pytest.raises(ValueError):
        label_plan([[1], []])


def test_label_scores_add_up_each_labels_tokens():
    labels = [[5], [6, 7], [6, 8]]
    plan = label_plan(labels)
    answers = [{5: -1.0, 6: -2.0, 99: -0.1}, {7: -0.5, 8: -3.0}]
    assert label_scores(labels, plan, answers) == [-1.0, -2.5, -5.0]
    with pytest.raises(KeyError, match="lacks token 8"):
        label_scores(labels, plan, [answers[0], {7: -0.5}])


def test_label_plan_scores_equal_our_engine(tiny):
    """The plan, answered by our own model's next-token log-probs, gives scoring.classify_scores."""
    from softprompt.model import PromptedModel
    from softprompt.scoring import classify_scores

    pm = PromptedModel(tiny)
    tok = tiny.tokenizer
    prompt = torch.randn(4, tiny.dim) * 0.1
    source = tok("the match was won by", add_special_tokens=True)["input_ids"]
    labels = [tok(w, add_special_tokens=False)["input_ids"] for w in (" sports", " business politics", " the film")]
    assert max(len(x) for x in labels) > 1
    plan = label_plan(labels)
    answers = []
    with torch.no_grad():
        for step in plan:
            ids = torch.tensor([source + list(step.prefix)])
            logits = pm(ids, torch.ones_like(ids), prompt)[0, -1].float().log_softmax(-1)  # (V,)
            answers.append({t: float(logits[t]) for t in step.targets})
        ours = classify_scores(pm, prompt, [source], labels)[0]
    assert torch.allclose(torch.tensor(label_scores(labels, plan, answers)), ours, atol=1e-4)


def test_unreachable_url_is_one_line(tiny_dir):
    import socket

    from softprompt.vllm import VLLMClient, VLLMError

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    table = EmbeddingTable.load(str(tiny_dir))
    with pytest.raises(VLLMError, match=rf"cannot reach a vLLM server at http://127.0.0.1:{port}") as e:
        VLLMClient(f"http://127.0.0.1:{port}", table, timeout=5)
    assert "\n" not in str(e.value)


def test_export_vllm_writes_the_tensor_and_the_recipe(tiny, tmp_path):
    from safetensors.torch import load_file

    from softprompt import PromptMeta, save_prompt
    from softprompt.cli import main

    w = torch.randn(6, tiny.dim)
    meta = PromptMeta.for_base(tiny, 6, task="classify", template="Text: {text}\nTopic:", labels=["a b", "c"],
                               verbalizer={"c": "sports"})
    save_prompt(tmp_path / "p.safetensors", w, meta)  # stored float16
    assert main(["export", str(tmp_path / "p.safetensors"), "--format", "vllm", "--out", str(tmp_path / "x")]) == 0
    t = load_file(str(tmp_path / "x" / "prompt.safetensors"))["prompt"]
    assert t.shape == (6, tiny.dim) and t.dtype == torch.float16 and torch.equal(t, w.half())
    import json

    info = json.loads((tmp_path / "x" / "prompt.json").read_text())
    assert info["format"] == "softprompt-vllm" and info["placeholder"] == "{text}"
    assert info["label_words"] == ["a b", "sports"] and info["label_lead"] == " " and info["dim"] == tiny.dim


class _OldVLLM:
    """A stand-in HTTP server answering like a vLLM whose /v1/completions predates
    ``logprob_token_ids`` (it ignores the unknown field and returns the natural top-1 only)."""

    def __init__(self, tokenizer):
        import http.server
        import json
        import threading

        tok = tokenizer

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"version": "0.9.2"} if self.path == "/version" else {"data": [{"id": "m"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    self._send({"tokens": tok(body["prompt"], add_special_tokens=True)["input_ids"]})
                else:
                    self._send({"choices": [{"text": "x", "logprobs": {"top_logprobs": [{"token_id:5": -0.1}]}}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_a_vllm_without_logprob_token_ids_is_named(tiny_dir):
    from softprompt.vllm import VLLMClient, VLLMError

    table = EmbeddingTable.load(str(tiny_dir))
    old = _OldVLLM(table.tokenizer)
    try:
        with pytest.raises(VLLMError, match=r"vLLM 0\.9\.2 .* ignores logprob_token_ids .* upgrade vLLM"):
            VLLMClient(old.url, table, timeout=10)
    finally:
        old.httpd.shutdown()
