"""--calibrate: the pure fit and apply, the prompt-file field (validated, absent = unchanged files),
training fits it on dev, and eval, predict and the serving engine give the same calibrated answer."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import PromptMeta, SoftPrompt, load_prompt, save_prompt
from softprompt.artifact import prompt_bytes
from softprompt.calibration import Calibration, CalibrationError, apply, biases_of, fit, member_biases
from softprompt.errors import PromptFileError

LABELS = ["business", "film", "sport"]
TEXTS = ["the match was won", "shares fell as the market reacted", "the film won three awards", "a new phone",
         "the minister said the election would be held", "the striker scored twice"]


def test_apply_is_log_softmax_of_shifted_scores_whatever_the_normalisation():
    raw = torch.tensor([[-3.0, -1.0, -7.0], [-2.0, -2.5, -0.5]])  # summed log-probs (serving)
    b = torch.tensor([0.0, -1.5, 2.0])
    got = apply(raw, b)
    torch.testing.assert_close(got, torch.log_softmax(raw + b, -1))
    # eval/predict see scores normalised over the labels: a per-row constant, same answer
    torch.testing.assert_close(apply(raw.log_softmax(-1), b), got, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply(raw, None), raw.log_softmax(-1))


def _skewed(n_major=80, n_minor=20, seed=0):
    """Dev scores of a prompt biased to label 0: the minority's true label scores 1 nat below label 0."""
    g = torch.Generator().manual_seed(seed)
    gold = [0] * n_major + [1] * n_minor
    logp = torch.randn(len(gold), 2, generator=g) * 0.3
    logp[:n_major, 0] += 2.0  # majority rows: clearly label 0
    logp[n_major:, 0] += 1.0  # minority rows: label 0 still wins, by about 1
    return logp, gold


def test_fit_recovers_the_minority_class_and_is_deterministic():
    logp, gold = _skewed()
    cal = fit(logp, gold, "macro_f1")
    assert cal.dev_before < 0.5 < cal.dev_after  # collapsed to the majority before, both classes after
    assert cal.biases[0] == 0.0 and 0.0 < cal.biases[1]
    assert fit(logp, gold, "macro_f1") == cal
    pred = (logp + torch.tensor(cal.biases)).argmax(-1)
    assert set(pred.tolist()) == {0, 1}


def test_fit_leaves_a_perfect_scorer_alone():
    logp = torch.tensor([[0.0, -5.0], [-5.0, 0.0], [0.0, -5.0]])
    cal = fit(logp, [0, 1, 0], "accuracy")
    assert cal.biases == (0.0, 0.0) and cal.dev_before == cal.dev_after == 1.0


def test_fit_refuses_an_unknown_metric():
    with pytest.raises(ValueError, match="log_loss"):
        fit(torch.zeros(2, 2), [0, 1], "log_loss")


@pytest.mark.parametrize("obj, msg", [
    ([1, 2], "must be an object"),
    ({"version": 9, "kind": "label_bias", "biases": [0, 1, 2]}, "version 9"),
    ({"version": 1, "kind": "label_bias", "biases": [0, "x", 2]}, "list of numbers"),
    ({"version": 1, "kind": "label_bias", "biases": [0, 1]}, "2 biases for 3 labels"),
    ({"version": 1, "kind": "label_bias", "biases": [0, 1, 1e300]}, "finite"),
])
def test_from_meta_validates(obj, msg):
    with pytest.raises(CalibrationError, match=msg):
        Calibration.from_meta(obj, LABELS)


def _prompt(tiny, path, calibration=None):
    p = SoftPrompt.initialize(tiny.embedding, tiny.tokenizer, 4, "labels", labels=LABELS)
    meta = PromptMeta.for_base(tiny, 4, task="classify", template="Text: {text}\nTopic:", labels=LABELS,
                               calibration=calibration)
    return save_prompt(path, p.weight, meta)


def test_prompt_file_round_trip_and_old_files_unchanged(tiny, tmp_path):
    cal = Calibration((0.0, 1.25, -0.5), "accuracy", 0.5, 0.75).to_meta()
    path = _prompt(tiny, tmp_path / "c.safetensors", cal)
    loaded = load_prompt(path)
    assert loaded.meta.calibration == cal
    torch.testing.assert_close(biases_of(loaded.meta), torch.tensor([0.0, 1.25, -0.5]))
    plain = load_prompt(_prompt(tiny, tmp_path / "p.safetensors"))
    assert plain.meta.calibration is None and biases_of(plain.meta) is None
    header = prompt_bytes(plain.tensor, plain.meta, "float32")
    assert b"calibration" not in header  # a file without calibration is the file older versions write
    assert member_biases([plain.meta, loaded.meta]).tolist() == [[0.0, 0.0, 0.0], [0.0, 1.25, -0.5]]
    assert member_biases([plain.meta]) is None


def test_bad_calibration_in_a_file_is_a_prompt_file_error(tiny, tmp_path):
    bad = {"version": 1, "kind": "label_bias", "biases": [0.0, 1.0]}
    path = _prompt(tiny, tmp_path / "bad.safetensors", bad)
    with pytest.raises(PromptFileError, match="2 biases for 3 labels"):
        load_prompt(path)


def test_eval_predict_and_engine_give_the_same_calibrated_answer(tiny, tiny_dir, tmp_path):
    from softprompt.evaluate.compare import EvalConfig, evaluate_file
    from softprompt.predict import PredictConfig, Predictor
    from softprompt.serve import Engine, EngineConfig
    from trainkit import write_jsonl

    plain = _prompt(tiny, tmp_path / "plain.safetensors")
    raw = Predictor(PredictConfig(prompt=str(plain), precision="fp32"), base=tiny).predict(TEXTS)
    worst = min(LABELS, key=lambda l: sum(r["probs"][l] for r in raw))
    biases = [200.0 if l == worst else 0.0 for l in LABELS]  # flips every answer to `worst`
    cal = Calibration(tuple(biases), "accuracy", 0.0, 1.0).to_meta()
    path = _prompt(tiny, tmp_path / "cal.safetensors", cal)

    pred = Predictor(PredictConfig(prompt=str(path), precision="fp32"), base=tiny).predict(TEXTS)
    assert [r["label"] for r in pred] == [worst] * len(TEXTS) != [r["label"] for r in raw]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": LABELS[0]} for t in TEXTS])
    ev = evaluate_file(EvalConfig(prompt=str(path), data=str(data), precision="fp32"), base=tiny)
    from softprompt.evaluate.baselines import PROMPT_ROW

    assert ev.results[PROMPT_ROW]["predictions"] == [r["label"] for r in pred]
    with Engine(tiny, EngineConfig(max_wait_ms=0)) as eng:
        eng.bank.add_tensor("cal", load_prompt(path).tensor, load_prompt(path).meta)
        for text, p in zip(TEXTS, pred):
            r = eng.classify(text, "cal")
            assert r.label == p["label"]
            for l in LABELS:  # calibrated probabilities, to float32 rounding of two scoring paths
                assert abs(r.probs[l] - p["probs"][l]) < 1e-4
            uncal = torch.tensor(r.scores[0]).softmax(-1)  # scores stay raw: calibration is on the probs
            assert LABELS[int(uncal.argmax())] == raw[TEXTS.index(text)]["label"]
    mild = _prompt(tiny, tmp_path / "mild.safetensors", Calibration((0.0, 0.7, -0.4), "accuracy", 0.0, 1.0).to_meta())
    pred = Predictor(PredictConfig(prompt=str(mild), precision="fp32"), base=tiny).predict(TEXTS)
    ev = evaluate_file(EvalConfig(prompt=str(mild), data=str(data), precision="fp32"), base=tiny)
    assert ev.results[PROMPT_ROW]["predictions"] == [r["label"] for r in pred]
    with Engine(tiny, EngineConfig(max_wait_ms=0)) as eng:
        eng.bank.add_tensor("mild", load_prompt(mild).tensor, load_prompt(mild).meta)
        for text, p in zip(TEXTS, pred):
            r = eng.classify(text, "mild")
            want = torch.tensor(r.scores[0]) + torch.tensor([0.0, 0.7, -0.4])
            assert r.label == p["label"] == LABELS[int(want.argmax())]
            for l, q in zip(LABELS, want.softmax(-1).tolist()):
                assert abs(r.probs[l] - p["probs"][l]) < 1e-4 and abs(r.probs[l] - q) < 1e-5


def test_training_fits_on_dev_and_eval_reproduces_the_fitted_dev_metric(tmp_path, model_root):
    from softprompt import load_base_model
    from softprompt.evaluate.baselines import PROMPT_ROW
    from softprompt.evaluate.compare import EvalConfig, evaluate_file
    from softprompt.train import TrainConfig, train
    from trainkit import easy_classification, learnable_model_dir

    base = load_base_model(str(learnable_model_dir(model_root / "learnable")))
    train_file, dev_file = easy_classification(tmp_path / "data")
    kw = dict(data=str(train_file), eval=str(dev_file), max_steps=1, batch_size=8, prompt_length=4, lr=1e-4,
              quiet=True, precision="fp32", init="random")
    r = train(TrainConfig(out=str(tmp_path / "a.safetensors"), calibrate="auto", **kw), base=base)
    meta = load_prompt(r.path).meta
    assert meta.calibration is not None and meta.training["calibrated"]  # an untrained random prompt gains
    c = meta.calibration
    assert c["dev_after"] > c["dev_before"] == pytest.approx(meta.training["best_metric"])
    ev = evaluate_file(EvalConfig(prompt=str(r.path), data=str(dev_file), precision="fp32"), base=base)
    assert ev.results[PROMPT_ROW][c["metric"]] == pytest.approx(c["dev_after"])
    r = train(TrainConfig(out=str(tmp_path / "b.safetensors"), **kw), base=base)
    assert load_prompt(r.path).meta.calibration is None and not load_prompt(r.path).meta.training["calibrated"]
