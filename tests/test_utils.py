"""Small shared helpers: the prefetching iterator and atomic writes."""

from __future__ import annotations

import threading

import pytest

from mmalign.utils import atomic_path, prefetch


def test_prefetch_keeps_order_and_reads_ahead():
    seen: list[int] = []

    def source():
        for i in range(20):
            seen.append(i)
            yield i

    it = prefetch(source(), depth=2)
    assert next(it) == 0
    assert list(it) == list(range(1, 20))
    assert seen == list(range(20))


def test_prefetch_raises_the_threads_error_with_its_type():
    def source():
        yield 1
        raise KeyError("bad sample 7")

    it = prefetch(source())
    assert next(it) == 1
    with pytest.raises(KeyError, match="bad sample 7"):
        next(it)


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    before = threading.active_count()
    it = prefetch(iter(range(10_000)), depth=2)
    next(it)
    it.close()
    assert threading.active_count() == before


def test_atomic_path_leaves_the_old_output_when_the_writer_fails(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
