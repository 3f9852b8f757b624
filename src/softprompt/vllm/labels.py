"""Rank classification as vLLM requests (pure: no HTTP, no model).

Our engine scores each label as the summed log-probability of its tokens after prompt + source
(scoring.label_logprobs). vLLM returns no ``prompt_logprobs`` for embedding inputs, but a
one-token completion with ``logprob_token_ids`` returns the full-vocabulary log-probability
(``logprobs_mode`` raw_logprobs, vLLM's default) of any token ids we name at the next position. So:

- one request reads log p(first token) of every label;
- for a label of L tokens, tokens 1..L-1 are read by requests whose input is the source followed
  by the label's earlier tokens. Labels that share a prefix share the request; the server's prefix
  cache makes the repeated source cheap.

A plan is a list of :class:`Step`; :func:`label_scores` adds the answers back into (C,) scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

MAX_TOKEN_IDS = 20
"""Most ``logprob_token_ids`` per request: vLLM 0.32 wants ``logprobs`` equal to their count, and
``logprobs`` may not exceed the server's ``--max-logprobs`` (default 20; the hard cap is 128)."""


@dataclass(frozen=True)
class Step:
    """One request: the label tokens appended to the source, and the next tokens to read."""

    prefix: tuple[int, ...]
    targets: tuple[int, ...]


def label_plan(label_ids: Sequence[Sequence[int]], max_targets: int = MAX_TOKEN_IDS) -> list[Step]:
    """The requests that score every label: one per distinct label prefix (chunked by ``max_targets``).

    >>> label_plan([[5], [6, 7], [6, 8]])
    [Step(prefix=(), targets=(5, 6)), Step(prefix=(6,), targets=(7, 8))]
    """
    if not label_ids or any(len(ids) == 0 for ids in label_ids):
        raise ValueError("every label needs at least one token")
    wanted: dict[tuple[int, ...], list[int]] = {}  # prefix -> distinct next tokens, first-seen order
    for ids in label_ids:
        for j, t in enumerate(ids):
            targets = wanted.setdefault(tuple(ids[:j]), [])
            if t not in targets:
                targets.append(t)
    steps = []
    for prefix in sorted(wanted, key=lambda p: (len(p), p)):
        targets = wanted[prefix]
        for k in range(0, len(targets), max_targets):
            steps.append(Step(prefix, tuple(targets[k : k + max_targets])))
    return steps


def label_scores(
    label_ids: Sequence[Sequence[int]], plan: Sequence[Step], answers: Sequence[Mapping[int, float]]
) -> list[float]:
    """Summed log-probability of each label's tokens, (C,), from each step's {token id: log-prob}."""
    lp: dict[tuple[tuple[int, ...], int], float] = {}
    for step, got in zip(plan, answers, strict=True):
        for t in step.targets:
            if t not in got:
                raise KeyError(f"the answer to step {step} lacks token {t}")
            lp[step.prefix, t] = float(got[t])
    return [sum(lp[tuple(ids[:j]), t] for j, t in enumerate(ids)) for ids in label_ids]
