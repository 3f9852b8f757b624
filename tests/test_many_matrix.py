"""bench/many_prompts_matrix.py's pure parts: every cell draws from its own pool, the streams send
the same texts with and without prompts, deep copies are valid format-2 prompt files of the base,
and each row is compared with the bare rows of its own stream."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

from softprompt import load_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mm():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("many_prompts_matrix", ROOT / "bench" / "many_prompts_matrix.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_cells_draw_from_disjoint_pools_and_the_start_up_files_sort_first(mm):
    cells = mm.layout([1, 100], 40, 0.25)
    names = [n for c in cells.values() for pool in c.values() for n in pool]
    assert len(names) == len(set(names)) == mm.WARM_AT_START + 1 + 100 + 40
    assert len(cells["mix"]["generate"]) == 10 and len(cells["mix"]["classify"]) == 30
    assert sorted(names)[: mm.WARM_AT_START] == cells["0start"]["classify"]  # what the server reads at start-up


def test_bare_and_prompt_streams_send_the_same_texts_and_tasks(mm):
    texts = [f"text {i}" for i in range(50)]
    items = mm.stream_items(400, 0.25, seed=3, texts=texts)
    assert items == mm.stream_items(400, 0.25, seed=3, texts=texts)
    assert 50 < sum(k == "generate" for k, _ in items) < 150
    pools = {"classify": [f"c{i}" for i in range(30)], "generate": [f"g{i}" for i in range(10)]}
    with_prompts, bare = mm.bodies(items, pools, 0, 8), mm.bodies(items, None, 0, 8)
    for (kind, text), (route, body), (bare_route, bare_body) in zip(items, with_prompts, bare):
        assert route == bare_route == f"/v1/{kind}"
        assert body["prompt"] in pools[kind] and "prompt" not in bare_body
        assert bare_body["text"] == (text if kind == "classify" else mm.GEN.render(text))
        assert body.get("max_new_tokens") == bare_body.get("max_new_tokens") == (8 if kind == "generate" else None)
    drawn = Counter(b["prompt"] for _, b in with_prompts if b["prompt"].startswith("c"))
    assert drawn.most_common(1)[0][0] == "c0"  # Zipf by rank: the first name is the most used


def test_rows_are_compared_with_the_mean_of_their_streams_bare_rows(mm):
    rows = [{"prompts": "bare", "stream": "classify", "requests/s": 10.0, "p99 ms": 100.0},
            {"prompts": "input", "stream": "classify", "requests/s": 9.0, "p99 ms": 150.0},
            {"prompts": "bare", "stream": "classify", "requests/s": 8.0, "p99 ms": 50.0},
            {"prompts": "bare", "stream": "mix", "requests/s": 4.0, "p99 ms": 400.0},
            {"prompts": "deep", "stream": "mix", "requests/s": 2.0, "p99 ms": 800.0}]
    mm.ratios(rows)
    assert [r["x bare req/s"] for r in rows] == [1.111, 1.0, 0.889, 1.0, 0.5]
    assert [r["x bare p99"] for r in rows] == [1.333, 2.0, 0.667, 1.0, 2.0]
    order = mm.plan(["input", "deep"], [1, 1000])
    assert order[0] == order[5] == ("bare", "classify", "") and order[6] == order[-1] == ("bare", "mix", "")


def test_copies_are_valid_prompt_files_of_the_base_input_and_deep(mm, tiny, tmp_path):
    cells = {"c2": {"classify": ["c2/p0", "c2/p1"]}, "mix": {"generate": ["mix/g0"]}}
    mm.write_copies(tiny, tmp_path, cells, ["input", "deep"], 4, seed=0)
    L, H, hd = tiny.kv_layout
    a, b = (load_prompt(tmp_path / "deep" / f"c2/p{i}.safetensors", tiny) for i in (0, 1))
    assert a.meta.method == "prefix" and a.meta.format_version == 2 and a.meta.task == "classify"
    assert tuple(a.tensor.shape) == (L, 2, H, 4, hd) and not a.tensor.equal(b.tensor)  # noisy copies
    gen = load_prompt(tmp_path / "input" / "mix/g0.safetensors", tiny)
    assert gen.meta.method == "prompt" and gen.meta.task == "generate" and tuple(gen.tensor.shape) == (4, tiny.dim)


def test_fresh_texts_keep_each_pass_s_kinds_and_prompts_and_change_its_texts(mm):
    texts = [f"text {i}" for i in range(500)]
    items = mm.stream_items(200, 0.25, seed=3, texts=texts)
    pools = {"classify": [f"c{i}" for i in range(50)], "generate": [f"g{i}" for i in range(50)]}
    same = mm.passes_items(items, texts, 3, False, 0)
    assert same == [items] * 3
    first, second, third = mm.passes_items(items, texts, 3, True, 0)
    assert first == items
    assert [k for k, _ in second] == [k for k, _ in items] == [k for k, _ in third]
    assert sum(a[1] == b[1] for a, b in zip(items, second)) < 10  # 200 draws of 500 texts: ~0.4 alike by chance
    assert second != third
    prompts = [[b["prompt"] for _, b in mm.bodies(x, pools, 0, 8)] for x in (first, second, third)]
    assert prompts[0] == prompts[1] == prompts[2]
