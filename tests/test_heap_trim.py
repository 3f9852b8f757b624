"""serve/heap_trim.py: the heap is trimmed after the store's counters move, and only then; the
engine runs the trimmer while it runs. (Its effect on RSS is measured in bench/, not here.)"""

from __future__ import annotations

import itertools
import platform
import time

import pytest

from softprompt.serve.heap_trim import HeapTrimmer, libc_trim


def test_trims_once_per_change_of_the_counters():
    counters, calls = [0, 0], []
    trimmer = HeapTrimmer(lambda: tuple(counters), trim=lambda: calls.append(1) or True, interval=60)
    assert not trimmer.check()  # nothing moved since it was made
    counters[1] += 3  # three evictions
    assert trimmer.check() and calls == [1]
    assert not trimmer.check() and calls == [1]
    counters[0] += 1
    assert trimmer.check() and trimmer.trims == 2


def test_without_a_trim_call_nothing_runs():
    counters = [0]
    trimmer = HeapTrimmer(lambda: counters[0], trim=None)
    counters[0] = 1
    assert not trimmer.check()
    trimmer.start()
    assert trimmer._thread is None
    trimmer.stop()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_malloc_trim_is_found_and_callable():
    trim = libc_trim()
    assert trim is not None
    assert trim() in (True, False)


def test_the_engine_runs_its_trimmer_while_it_runs(tmp_path):
    from softprompt.serve.engine import Engine
    from softprompt.testing import tiny_base

    eng = Engine(tiny_base(tmp_path / "m"))
    calls = []
    eng.trimmer.trim, eng.trimmer.interval = (lambda: calls.append(1) or True), 0.01
    before = eng._store_activity()
    assert eng._store_activity() == before  # looking does not move it
    ticks = itertools.count()
    eng.trimmer.activity = lambda: next(ticks)  # moves at every look
    with eng:
        assert eng.trimmer._thread is not None and eng.trimmer._thread.is_alive()
        thread = eng.trimmer._thread
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls  # the thread looked and trimmed
    assert not thread.is_alive() and eng.trimmer._thread is None
