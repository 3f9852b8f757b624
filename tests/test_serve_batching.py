"""Pure batching functions of the serving engine (no model)."""

from __future__ import annotations

import pytest
import torch

from softprompt.prefix import PrefixKV, source_positions, stack_prefixes
from softprompt.serve.batching import (
    concat_rows, ensemble_probs, group_indices, label_chunks, select_jobs, select_rows, split_rows,
    task_cost, trim_left,
)


def prefix(P: int, fill: float, layers: int = 2, H: int = 2, hd: int = 3) -> PrefixKV:
    if P == 0:
        return PrefixKV.empty()
    return PrefixKV(tuple((torch.full((H, P, hd), fill), torch.full((H, P, hd), -fill)) for _ in range(layers)), P)


def test_select_jobs_fills_in_order_and_skips_what_does_not_fit():
    kinds = ["classify", "generate", "classify", "classify", "generate", "classify"]
    rows = [3, 1, 4, 1, 1, 2]
    toks = [10] * 6
    # classify: 3 + 4 > 6, so the 4-row ensemble is skipped and the ones behind it still run
    assert select_jobs(kinds, rows, toks, max_rows=6, free_generate_rows=1, max_tokens=100) == [0, 1, 3, 5]
    assert select_jobs(kinds, rows, toks, max_rows=6, free_generate_rows=0, max_tokens=100) == [0, 3, 5]
    assert select_jobs(kinds, rows, toks, max_rows=8, free_generate_rows=2, max_tokens=100) == [0, 1, 2, 3, 4]
    assert select_jobs([], [], [], 4, 4, 100) == []


def test_select_jobs_keeps_a_step_within_the_token_budget():
    kinds = ["classify", "generate", "classify", "classify"]
    rows = [1, 1, 1, 1]
    assert select_jobs(kinds, rows, [50, 30, 40, 20], 8, 8, max_tokens=100) == [0, 1, 3]
    assert select_jobs(kinds, rows, [500, 30, 40, 20], 8, 8, max_tokens=100) == [0]  # a long first job still runs
    assert select_jobs(kinds, rows, [500, 30, 40, 20], 8, 0, max_tokens=100) == [0]


def test_stack_prefixes_right_aligns_behind_a_masked_gap():
    layers, mask = stack_prefixes([prefix(2, 1.0), prefix(0, 0.0), prefix(3, 2.0)])
    assert mask.tolist() == [[0, 1, 1], [0, 0, 0], [1, 1, 1]]
    assert len(layers) == 2
    k, v = layers[0]
    assert k.shape == (3, 2, 3, 3) and v.shape == (3, 2, 3, 3)
    assert torch.equal(k[0, :, 0], torch.zeros(2, 3))  # the gap is zeros
    assert torch.equal(k[0, :, 1:], torch.ones(2, 2, 3))
    assert torch.equal(v[2], torch.full((2, 3, 3), -2.0))
    assert torch.equal(k[1], torch.zeros(2, 3, 3))


def test_stack_prefixes_of_bare_rows_is_empty():
    layers, mask = stack_prefixes([PrefixKV.empty(), PrefixKV.empty()])
    assert layers == [] and mask.shape == (2, 0)


def test_source_positions_continue_from_each_prefix_length():
    pmask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 0]])
    smask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    mask, pos = source_positions(pmask, smask)
    assert mask.tolist() == [[0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]
    assert pos[:, -1].tolist() == [3, 5, 0]  # last token: P_i + n_i - 1
    assert pos[0, 1:].tolist() == [2, 3] and pos[1].tolist() == [3, 4, 5]


def test_select_and_trim_rows():
    k = torch.arange(3 * 1 * 4 * 1, dtype=torch.float).view(3, 1, 4, 1)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    layers, m = select_rows([(k, -k)], mask, [0, 2])
    assert m.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert torch.equal(layers[0][0], k[[0, 2]])
    layers, m = trim_left(layers, m)
    assert m.tolist() == [[0, 1, 1], [1, 1, 1]]  # the first column was masked in every row left
    assert torch.equal(layers[0][0], k[[0, 2]][:, :, 1:])
    assert torch.equal(layers[0][1], -k[[0, 2]][:, :, 1:])


def test_concat_rows_left_pads_the_shorter_batch():
    a = ([(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))], torch.tensor([[1, 1, 1]]))
    b = ([(torch.full((2, 2, 1, 4), 5.0), torch.full((2, 2, 1, 4), 6.0))], torch.tensor([[1], [1]]))
    layers, mask = concat_rows(a, b)
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1]]
    k, v = layers[0]
    assert k.shape == (3, 2, 3, 4)
    assert torch.equal(k[1, :, :2], torch.zeros(2, 2, 4)) and torch.equal(k[1, :, 2], torch.full((2, 4), 5.0))
    assert torch.equal(v[2, :, 2], torch.full((2, 4), 6.0))
    layers2, mask2 = concat_rows(b, a)  # either order
    assert mask2.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1]]


def test_group_and_split():
    keys = [("a",), ("b",), ("a",), ("c",), ("b",)]
    assert group_indices(keys) == [(("a",), [0, 2]), (("b",), [1, 4]), (("c",), [3])]
    assert split_rows(list("abcdef"), [1, 3, 2]) == [["a"], ["b", "c", "d"], ["e", "f"]]
    with pytest.raises(ValueError):
        split_rows([1, 2], [3])


def test_ensemble_probs_average_member_probabilities():
    scores = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5]]))
    torch.testing.assert_close(ensemble_probs(scores), torch.tensor([0.7, 0.3]))
    torch.testing.assert_close(ensemble_probs(scores[:1]), torch.tensor([0.9, 0.1]))


def test_label_chunks_bound_each_step_of_label_scoring():
    assert task_cost(4, [(1,), (2,), (3,)]) == 0  # single-token labels: no continuation
    assert task_cost(2, [(1, 2, 3), (4,)]) == 2 * 2 * 2
    single = [(i,) for i in range(100)]
    assert label_chunks(single, 16, 8) == [(0, tuple(single))]  # one step however many
    labels = [(1, 2), (3, 4, 5), (6,), (7, 8, 9, 10), (11, 12)]
    chunks = label_chunks(labels, 2, 8)
    assert [start for start, _ in chunks] == [0, 2, 3, 4]
    assert [lab for _, chunk in chunks for lab in chunk] == labels  # in order, nothing lost
    assert all(task_cost(2, c) <= 8 or len(c) == 1 for _, c in chunks)
    assert label_chunks(labels, 50, 1) == [(i, (lab,)) for i, lab in enumerate(labels)]  # at least one label a step
