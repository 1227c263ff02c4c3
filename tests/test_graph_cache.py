"""``cuda_graphs.GraphCache``: which shapes get a graph, and when (the policy, without a GPU)."""

from __future__ import annotations

import pytest

from lensrun.cuda_graphs import GraphCache


def _builder(built: list):
    def build(pool) -> str:
        built.append(pool)
        return f"graph {len(built)}"

    return build


@pytest.mark.parametrize("sightings", [1, 2, 3])
def test_a_key_is_captured_on_its_nth_sighting_and_then_reused(sightings):
    cache, built = GraphCache(sightings=sightings), []
    for _ in range(sightings - 1):
        assert cache.get("1024²", _builder(built)) is None
    assert built == []
    assert cache.get("1024²", _builder(built)) == "graph 1"
    assert cache.get("1024²", _builder(built)) == "graph 1" and len(built) == 1
    assert cache.get("1440²", _builder(built)) == (None if sightings > 1 else "graph 2")


def test_the_oldest_graph_goes_when_the_limit_is_reached():
    cache, built = GraphCache(limit=2, sightings=1), []
    for key in ("a", "b", "c"):
        cache.get(key, _builder(built))
    assert list(cache) == ["b", "c"] and len(cache) == 2


def test_a_failed_capture_stops_captures_until_reset():
    cache, built = GraphCache(sightings=1), []

    def broken(pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    assert cache.get("a", broken) is None
    assert cache.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert cache.get("b", _builder(built)) is None and built == []
    cache.reset()
    assert cache.failed is None and cache.get("b", _builder(built)) == "graph 1"
