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


@pytest.mark.parametrize(("precision", "first_capture"), [("bf16", 2), ("fp8", 1), ("int8-weight", 1)])
def test_a_quantized_dit_captures_a_shapes_step_on_its_first_sighting(precision, first_capture):
    """bf16's compiled loop is close to its replays, a quantized DiT's is launch-bound: the pipeline's graphs
    follow its precision whenever they are reset."""
    from lensrun import LensPipeline

    pipe = LensPipeline.tiny_random()
    pipe.precision = precision  # what quantizing sets (torchao needs a GPU)
    pipe._reset_graphs()
    built: list = []
    for sighting in range(1, first_capture + 1):
        got = pipe.step_graphs.graphs.get("1024² bucket 128", _builder(built))
        assert (got is not None) == (sighting == first_capture)
    assert len(built) == 1
