"""What one request may cost, checked before it is queued (pure; no model, no threads).

Every request's work is bounded at admission, so that no single request can hold the model thread
for long: its input (``--max-input-tokens``, template included), a classification's labels
(``--max-labels``, ``--max-label-tokens`` each, and ``--max-scoring-tokens`` for the whole label
scoring), a generation's length and stop strings, a batch call's size. The same label checks run
when a prompt file is loaded (its own labels). Errors name the limit and the flag.

Not here: tokenizing (admission.py), the batching loop (scheduler.py), HTTP schemas (schemas.py).
"""

from __future__ import annotations

from typing import Sequence

from .config import EngineConfig
from .errors import InvalidRequestError, RequestTooLargeError

CHARS_PER_TOKEN_LIMIT = 64
"""A text longer than this many characters per allowed token is refused before it is tokenized
(no tokenizer makes tokens that long; it keeps a huge string from costing tokenizer time)."""

MIN_TEMPERATURE = 1e-3
"""A sampling temperature below this samples greedily (its limit): dividing logits by 1e-300
overflows to inf and would make the probabilities NaN."""

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The range ``torch.Generator.manual_seed`` accepts."""


def check_unicode(value: str, what: str) -> str:
    """Refuse text that cannot be encoded as UTF-8 (a lone surrogate such as ``"\\ud800"``, which
    JSON allows but no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{what}: invalid Unicode (a lone surrogate {value[e.start]!r} at character {e.start})"
        ) from None
    return value


def check_chars(value: str, what: str, tokens: int, flag: str) -> str:
    """Refuse a string that cannot fit ``tokens`` tokens, before tokenizing it."""
    if len(value) > CHARS_PER_TOKEN_LIMIT * tokens:
        raise RequestTooLargeError(f"{what} has {len(value)} characters, too long for {flag} {tokens}")
    return check_unicode(value, what)


def check_label_names(labels: Sequence[str], config: EngineConfig, what: str = "labels") -> None:
    """Count and size of label strings, before they are tokenized."""
    if len(labels) > config.max_labels:
        raise RequestTooLargeError(f"{what}: {len(labels)} labels, more than --max-labels {config.max_labels}")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise InvalidRequestError(f"{what}[{i}] is not a string")
        check_chars(label, f"{what}[{i}]", config.max_label_tokens, "--max-label-tokens")


def check_label_ids(label_ids: Sequence[Sequence[int]], config: EngineConfig, what: str = "labels") -> None:
    """Tokens of each label, once tokenized."""
    if len(label_ids) > config.max_labels:
        raise RequestTooLargeError(f"{what}: {len(label_ids)} labels, more than --max-labels {config.max_labels}")
    for i, ids in enumerate(label_ids):
        if len(ids) > config.max_label_tokens:
            raise RequestTooLargeError(
                f"{what}[{i}] is {len(ids)} tokens, more than --max-label-tokens {config.max_label_tokens}")


def scoring_tokens(prefix_len: int, source_len: int, label_lens: Sequence[int]) -> int:
    """Tokens the model holds to score the labels of one row (pure).

    ``scoring.label_logprobs`` reads the first label token from the source's last position; labels
    of several tokens continue the row once per label, over a copy of its cache (prompt + input):
    labels x (prompt + input + longest label). Single-token labels need no copy.
    """
    longest = max(label_lens, default=1)
    if longest <= 1:
        return 0
    return len(label_lens) * (prefix_len + source_len + longest - 1)


def classify_cost(source_len: int, label_lens: Sequence[int]) -> int:
    """A classification row's share of ``--max-batch-tokens``: its input plus the label tokens it
    runs through the model (labels x (longest - 1) continuation tokens) (pure)."""
    longest = max(label_lens, default=1)
    return source_len + (len(label_lens) * (longest - 1) if longest > 1 else 0)


def check_scoring(total: int, config: EngineConfig) -> None:
    if total > config.max_scoring_tokens:
        raise RequestTooLargeError(
            f"scoring the labels takes {total} tokens (labels x (prompt + input + longest label)), more than "
            f"--max-scoring-tokens {config.max_scoring_tokens}")


def check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidRequestError(f"seed must be a whole number between -2**63 and 2**64-1, got {seed!r}")


def check_stop(stop: Sequence[str], config: EngineConfig) -> None:
    if len(stop) > config.max_stop:
        raise RequestTooLargeError(f"{len(stop)} stop strings, more than --max-stop {config.max_stop}")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop[{i}] must be a non-empty string")
        if len(s) > config.max_stop_chars:
            raise RequestTooLargeError(f"stop[{i}] has {len(s)} characters, more than --max-stop-chars {config.max_stop_chars}")
        check_unicode(s, f"stop[{i}]")


def check_batch_size(n: int, config: EngineConfig) -> None:
    """A ``/batch`` call that could never be queued is refused as too large (not 'retry later')."""
    if n > config.batch_requests:
        flag = "--max-batch-requests" if config.max_batch_requests <= config.max_queue else "--max-queue"
        raise RequestTooLargeError(f"{n} requests in one batch call, more than {flag} {config.batch_requests}")
