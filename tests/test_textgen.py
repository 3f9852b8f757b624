"""The one generation stepper (textgen.TextStepper) against the three loops it replaced.

The references below are the loops as they were written in scoring.generate_after, serve/steps.py
(_step/_end) and vllm/steps.py (_advance/_end) before they shared the stepper; random token
streams with a toy tokenizer must give the same text, tokens, finish reason and streamed pieces.
"""

from __future__ import annotations

import random

import pytest

from softprompt.textgen import TextStepper, find_stop, stream_safe_length

EOS = 0
VOCAB = {1: "a", 2: " ", 3: "b", 4: "\n", 5: "END", 6: "\ufffd", 7: "xy", 8: "E", 9: "ND"}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def ref_offline(tokens: list[int], max_new: int, stop: list[str]) -> tuple[str, list[int], str]:
    """scoring.generate_after's loop for one row (fed ``tokens`` instead of sampling)."""
    out, done, text = [], None, ""
    for t in tokens[:max_new]:
        if t == EOS:
            done = "eos"
            break
        out.append(t)
        text = decode(out)
        if stop and find_stop(text, stop) >= 0:
            done = "stop"
            break
    cut = find_stop(text, stop) if stop else -1
    return (text[:cut] if cut >= 0 else text).strip(), out, done or "length"


def ref_server(tokens: list[int], max_new: int, stops: list[str]) -> tuple[str, list[int], str, list[str]]:
    """serve/steps.py's per-token loop and _end for one row; also what it streamed."""
    out, text, emitted, pieces = [], "", "", []

    def end(reason):
        cut = find_stop(text, stops) if stops else -1
        final = (text[:cut] if cut >= 0 else text).strip()
        if final.startswith(emitted) and final[len(emitted):]:
            pieces.append(final[len(emitted):])
        return final, out, reason, pieces

    for t in tokens:
        if t == EOS:
            return end("eos")
        out.append(t)
        text = decode(out)
        if stops and find_stop(text, stops) >= 0:
            return end("stop")
        if len(out) >= max_new:
            return end("length")
        visible = text.lstrip()
        safe = visible[: stream_safe_length(visible, stops)]
        if len(safe) > len(emitted) and safe.startswith(emitted):
            pieces.append(safe[len(emitted):])
            emitted = safe
    raise AssertionError("token stream too short")


def run_stepper(tokens: list[int], max_new: int, stops: list[str]) -> tuple[str, list[int], str, list[str]]:
    s, pieces = TextStepper(decode, EOS, max_new, stops), []
    for t in tokens:
        reason = s.push(t)
        if piece := s.delta():
            pieces.append(piece)
        if reason:
            return s.final, s.out, reason, pieces
    raise AssertionError("token stream too short")


STOPS = [[], ["END"], ["\n", "b b"], ["xyE"]]


@pytest.mark.parametrize("seed", range(200))
def test_stepper_equals_the_offline_and_server_loops(seed):
    rng = random.Random(seed)
    stops = STOPS[seed % len(STOPS)]
    max_new = rng.randint(1, 12)
    tokens = [rng.choice([EOS] * (seed % 3 == 0) + list(VOCAB)) for _ in range(max_new + 1)]
    got = run_stepper(tokens, max_new, stops)
    assert got == ref_server(tokens, max_new, stops)
    assert got[:3] == ref_offline(tokens, max_new, stops)
    assert "".join(got[3]) == got[0]  # the streamed pieces add up to the answer


def test_the_vllm_way_of_streaming_per_step_adds_up_to_the_answer():
    """vllm/steps.py takes several tokens per step and streams once per step; ending from outside
    (the server's own finish) hands out the rest of the final text."""
    s, pieces = TextStepper(decode, EOS, 100, ["END"]), []
    for chunk in ([1, 2], [3, 8], [1]):  # "a ", "bE", "a": the last 2 characters could start "END"
        for t in chunk:
            assert s.push(t) is None
        pieces.append(s.delta())
    assert pieces == ["", "a", " b"]
    assert s.end("length") == "length" and s.end("eos") == "length"  # the first reason stays
    pieces.append(s.delta())
    assert "".join(pieces) == s.final == "a bEa"


def test_eos_is_never_text_and_push_after_the_end_is_an_error():
    s = TextStepper(decode, EOS, 5)
    assert s.push(1) is None and s.push(EOS) == "eos"
    assert s.out == [1] and s.final == "a"
    with pytest.raises(RuntimeError):
        s.push(1)


def test_stream_safe_length_holds_back_what_may_change():
    assert stream_safe_length("hello world", []) == 11
    assert stream_safe_length("hello wor", ["world"]) == 5  # "wor" + one more could still become a stop string
    assert stream_safe_length("hello ", []) == 5  # trailing space: the final text is stripped
    assert stream_safe_length("caf\ufffd", []) == 3  # incomplete UTF-8 character
    assert stream_safe_length("", ["x"]) == 0


def test_find_stop():
    assert find_stop("hello\nworld END", ["END", "\n"]) == 5
    assert find_stop("hello", ["x"]) == -1
