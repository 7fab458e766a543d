"""Shared test fixtures. Tests run offline, on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA the Triton scan tests run on Triton's CPU interpreter, which must be chosen before triton is first
# imported (its standard library is decorated at import): tests/test_ops_triton.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("OPENUS_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))

# CI (.ci/run) exports OPENUS_HUB_STRICT_TESTS=1: then a missing prerequisite that CI always has (parity fixtures, the
# CPU scan kernel, the peer test suites) fails the test instead of skipping it. On a user's machine it skips.
STRICT = os.environ.get("OPENUS_HUB_STRICT_TESTS", "") not in ("", "0")


def skip_or_fail(reason: str) -> None:
    """Skip the current test with ``reason``, or fail it under OPENUS_HUB_STRICT_TESTS=1 (CI)."""
    if STRICT:
        pytest.fail(f"{reason} [OPENUS_HUB_STRICT_TESTS=1: CI must have this]", pytrace=False)
    pytest.skip(reason)


def parity_path(*parts: str) -> Path:
    """Path inside ../shared/parity; skips (fails under CI) with the reason when the fixtures are not there."""
    path = PARITY_DIR.joinpath(*parts)
    if not path.exists():
        skip_or_fail(f"parity fixtures not found at {path} (set OPENUS_PARITY_DIR or check out ../shared/parity)")
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
