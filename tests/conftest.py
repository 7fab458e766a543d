"""Shared test fixtures. Tests run offline, on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
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
# CPU scan kernel, optional test dependencies, the peer test suites) fails the test instead of skipping it. On a user's
# machine it skips. Under STRICT, every skip whose reason does not match _ALLOWED_SKIPS is reported as a failure
# (pytest_runtest_makereport / pytest_make_collect_report below), so a skip added anywhere cannot hide a missing
# prerequisite in CI.
STRICT = os.environ.get("OPENUS_HUB_STRICT_TESTS", "") not in ("", "0")
# What CI cannot have: a CUDA device (and mamba-ssm, which needs one), and facts of a machine that tests state with a
# reason starting "environment:" (e.g. a file system without renameat2 RENAME_EXCHANGE, an optional decoder installed).
# Also allowed: a test that does not apply to OpenUS, declared with a reason starting "not applicable:" (the skips an
# in-tree model of this kind has, e.g. ConvNeXt's), and the peer suites' own decisions, raised inside transformers' or
# timm's test files (`.peer_tests/`: "test is slow", "Model does not have a TP plan", ...).
_ALLOWED_SKIPS = re.compile(r"CUDA|GPU|mamba[-_]ssm|^environment:|^not applicable:", re.IGNORECASE)
_PEER_TESTS = re.compile(r"(^|[/\\])\.peer_tests[/\\]")


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


# pydicom's ybr_color (a JPEG echo cine) frame 0 as the parity fixtures decoded it: pydicom 3.0.2 with its Pillow
# plugin (Pillow 13.0.0, libjpeg-turbo). The fixture READMEs record the first 16 hex digits (52353e7c7c11b14a). Other
# JPEG decoders (pylibjpeg from the [dicom] extra, GDCM) round the YCbCr upsampling differently, by up to 2/255.
YBR_FRAME0_SHA256 = "52353e7c7c11b14a3b82a7b9258df5f844f5ac01c504fb2198d98e755043202d"


def ybr_fixture_frame():
    """Frame 0 of pydicom's ``ybr_color`` decoded the way the parity fixtures were made (Pillow plugin), checked by
    sha256 first so that a different decode fails with this message, not as a numeric difference further on."""
    import hashlib

    import pydicom.examples
    from pydicom.pixels import pixel_array

    frame = pixel_array(pydicom.examples.get_path("ybr_color"), index=0, decoding_plugin="pillow")
    digest = hashlib.sha256(frame.tobytes()).hexdigest()
    if digest != YBR_FRAME0_SHA256:
        pytest.fail(f"pydicom's Pillow plugin decodes ybr_color frame 0 to sha256 {digest[:16]}..., the parity "
                    f"fixtures were made from {YBR_FRAME0_SHA256[:16]}... (Pillow 13.0.0): a different Pillow/libjpeg "
                    "build decodes JPEG differently, so the fixtures' real-image inputs cannot be reproduced here",
                    pytrace=False)
    return frame


@contextlib.contextmanager
def read_only_dir(folder: Path):
    """A folder nobody may write into: mode 555, or for root (which ignores modes) the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                         capture_output=True).returncode != 0:
        pytest.skip("environment: cannot make a read-only folder here (root, on a file system without chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _skip_allowed(report) -> bool:
    longrepr = report.longrepr
    where = str(longrepr[0]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
    return bool(_ALLOWED_SKIPS.search(_skip_reason(report)) or _PEER_TESTS.search(where))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail") and not _skip_allowed(report):
        report.outcome = "failed"
        report.longrepr = f"skipped under OPENUS_HUB_STRICT_TESTS=1, where CI must have this: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:  # a module-level skip (importorskip of an optional test dependency)
        reason = _skip_reason(report)
        if not _ALLOWED_SKIPS.search(reason):
            report.outcome = "failed"
            report.longrepr = f"{collector.nodeid} skipped under OPENUS_HUB_STRICT_TESTS=1, where CI must have this: " \
                              f"{reason}"


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


TINY_OPENUS_SIZE = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def tiny_openus(tmp_path_factory):
    """A tiny random OpenUSModel (seeded) saved with an image processor at ``TINY_OPENUS_SIZE``: ``(model, folder)``."""
    from openus_hub import OpenUSConfig, OpenUSImageProcessor, OpenUSModel

    torch.manual_seed(0)
    model = OpenUSModel(OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 2], drop_path_rate=0.0)).eval()
    folder = tmp_path_factory.mktemp("tiny_openus")
    model.save_pretrained(folder)
    OpenUSImageProcessor(size=TINY_OPENUS_SIZE).save_pretrained(folder)
    return model, folder
