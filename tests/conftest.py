"""Shared fixtures. Tests never touch the network: the Hub is forced offline before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["LENSRUN_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="lensrun-test-cache-")

from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through its CPU interpreter (read when triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture
def chrome(tmp_path):
    """Headless Debian Chromium through chromedriver (installed by .ci/run), with the network-quiet flags."""
    import shutil

    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("Debian chromium/chromium-driver not installed (.ci/run installs them)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    yield driver
    driver.quit()


def _png_psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p)).astype(np.float64) for p in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture
def png_psnr():
    """PSNR in dB of two 8-bit PNG files (inf when their pixels are equal): split runs against one-process ones."""
    return _png_psnr
