"""CI runs exactly the README's test command, strictly: skips for what CI always has become failures."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_ci_runs_the_readme_test_command_strictly():
    readme = (REPO_ROOT / "README.md").read_text()
    (command,) = re.findall(r"^(\.venv/bin/python -m pytest[^\n#]*?)\s*# tests", readme, re.MULTILINE)
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command and " -rs" in command  # the last step of CI is the README's command, with skip reasons
    assert "export OPENUS_HUB_STRICT_TESTS=1" in ci


SAMPLE = '''
import pytest

def test_missing_fixture():
    pytest.skip("parity fixtures not found at /nowhere")

@pytest.mark.skipif(True, reason="the C++ CPU scan kernel did not compile here")
def test_kernel():
    pass

def test_cuda():
    pytest.skip("needs a CUDA device")

def test_environment():
    pytest.skip("environment: renameat2 is not supported here")
'''


def test_strict_mode_fails_skips_ci_must_not_have(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_skip.py").write_text("import pytest\npytest.importorskip('no_such_module_xyz')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    results = {}
    for strict in ("0", "1"):
        env["OPENUS_HUB_STRICT_TESTS"] = strict
        for name in ("test_sample.py", "test_module_skip.py"):
            res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", name],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            results[strict, name] = (res.returncode, res.stdout.splitlines()[-1])
    assert results["0", "test_sample.py"][1].startswith("4 skipped"), results
    assert results["0", "test_module_skip.py"][1].startswith("1 skipped"), results
    # strict: the fixture skip fails, the kernel's skipif (a setup-time skip) errors, CUDA and environment skips stay
    # skips; a module-level skip of a missing test dependency is a collection error
    code, summary = results["1", "test_sample.py"]
    assert code == 1 and summary.startswith("1 failed, 2 skipped, 1 error"), results
    code, summary = results["1", "test_module_skip.py"]
    assert code != 0 and "1 error" in summary, results
