"""How generated tokens become text: one pure stepper for every generation path.

A :class:`TextStepper` takes a row's generated token ids one at a time and decides when the row ends
(end-of-sequence token, a stop string, the token limit), what of its text may already be streamed
(never anything a later token could take back) and what the final text is (cut before the first
stop string, stripped). Offline generation (``scoring.generate``), the in-process server
(``serve/steps.py``) and the vLLM backend (``vllm/steps.py``) all drive one, so the three cannot
drift apart. No tensors, no model: the tokenizer's ``decode`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

FinishReason = Literal["eos", "stop", "length"]


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1 (pure)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def stream_safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of a partial generation can be streamed without ever being taken back (pure).

    Holds back what could still become the start of a stop string (the last ``len(stop) - 1``
    characters), a trailing incomplete UTF-8 character (decoded as U+FFFD), and trailing
    whitespace (the final text is stripped).
    """
    n = len(text)
    hold = max((len(s) for s in stops if s), default=1) - 1
    n = max(0, n - hold)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    while n and text[n - 1].isspace():
        n -= 1
    return n


@dataclass
class TextStepper:
    """One generation row's text, advanced token by token.

    Args:
        decode: token ids -> text (the tokenizer's, special tokens skipped).
        eos: the end-of-sequence id (ends the row, never part of the text), or None.
        max_new: the row ends with ``"length"`` once it holds this many tokens.
        stops: stop strings; the row ends with ``"stop"`` once its text contains one.
    """

    decode: Callable[[list[int]], str]
    eos: int | None
    max_new: int
    stops: Sequence[str] = ()
    out: list[int] = field(default_factory=list)
    """The generated ids so far (the EOS token excluded)."""
    text: str = ""
    """The decoded text of ``out`` (stop strings not yet cut)."""
    emitted: str = ""
    """What :meth:`delta` has handed out so far."""
    reason: FinishReason | None = None
    """Why the row ended, once it has."""

    @classmethod
    def for_tokenizer(cls, tokenizer, max_new: int, stops: Sequence[str] = ()) -> "TextStepper":
        """A stepper decoding with ``tokenizer`` (special tokens skipped), ending at its EOS token."""
        return cls(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), tokenizer.eos_token_id, max_new,
                   list(stops))

    def push(self, token: int) -> FinishReason | None:
        """Take one generated token; the finish reason if the row ends with it, else None."""
        if self.reason is not None:
            raise RuntimeError("push() after the row ended")
        if token == self.eos:
            return self.end("eos")
        self.out.append(token)
        self.text = self.decode(self.out)
        if self.stops and find_stop(self.text, self.stops) >= 0:
            return self.end("stop")
        if len(self.out) >= self.max_new:
            return self.end("length")
        return None

    def end(self, reason: FinishReason) -> FinishReason:
        """End the row (also for reasons decided outside, e.g. the server ran out of tokens)."""
        self.reason = self.reason or reason
        return self.reason

    @property
    def final(self) -> str:
        """The answer: the text before the first stop string, stripped."""
        cut = find_stop(self.text, self.stops) if self.stops else -1
        return (self.text[:cut] if cut >= 0 else self.text).strip()

    def delta(self) -> str:
        """Text not yet handed out that no later token can change ("" if none); marks it handed out.
        Once the row has ended this is the rest of :attr:`final`."""
        if self.reason is not None:
            new = self.final
        else:
            visible = self.text.lstrip()
            new = visible[: stream_safe_length(visible, self.stops)]
        if len(new) <= len(self.emitted) or not new.startswith(self.emitted):
            return ""
        piece, self.emitted = new[len(self.emitted):], new
        return piece
