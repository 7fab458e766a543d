"""Shared test fixtures. Tests run offline, on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("OPENUS_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))


def parity_path(*parts: str) -> Path:
    """Path inside ../shared/parity; skips the test with the reason when the fixtures are not there."""
    path = PARITY_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"parity fixtures not found at {path} (set OPENUS_PARITY_DIR or check out ../shared/parity)")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
