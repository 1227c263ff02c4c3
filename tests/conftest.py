"""Shared fixtures. Tests never touch the network: the Hub is forced offline before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["LENSRUN_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="lensrun-test-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Lens in the real diffusers layout, transformer and encoder split into several shards."""
    from lensrun.random_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "Lens-Tiny", size="tiny", seed=3, max_shard_bytes=2**21)


@pytest.fixture(scope="session")
def tiny_pipe():
    from lensrun import LensPipeline

    return LensPipeline.tiny_random(device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
