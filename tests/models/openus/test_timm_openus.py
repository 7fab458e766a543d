"""OpenUS under timm's own model tests: `tests/test_models.py` of the installed timm, restricted to `openus_*`.

The test functions are timm's, run unchanged (`scripts/fetch_peer_tests.py` fetches the file from timm's sdist; see
`tests/models/peer_suites.py`). timm parametrizes each test over `list_models(...)` with its own inclusion and
exclusion filters; here each parametrization keeps the `openus_*` names it lists, which is what
`pytest tests/test_models.py -k openus` selects in timm's repository. Two differences, each the equivalent of a line
an in-tree model would add to timm's file:

* OpenUS implements `forward_intermediates` and `prune_intermediate_layers` and builds `features_only` through
  `FeatureGetterNet`: in timm's file its module would be listed in `FEAT_INTER_FILTERS`, and `openus_tiny` in the
  explicit model lists of the pruning tests. Those tests are parametrized over OpenUS here (`_FEATURE_INTERMEDIATES`).
* TorchScript: OpenUS's layers are transformers modules, which `torch.jit.script` cannot compile; timm excludes such
  models from its scripting tests with `EXCLUDE_JIT_FILTERS` (e.g. `hiera_*`, `*naflex*`). The same exclusion here.

timm's time limits (`@pytest.mark.timeout`) are kept and apply to the test body only: the one-time build of the
CPU scan kernel happens in a fixture before them.
"""

import types

import pytest

from tests.conftest import skip_or_fail
from tests.models import peer_suites

try:
    import timm  # noqa: F401
except Exception as err:  # noqa: BLE001  (not installed, or beside a torchvision that does not match torch)
    pytest.skip(f"timm does not import ({type(err).__name__}: {err}); pip install 'openus_hub[timm]'",
                allow_module_level=True)

OPENUS_NAMES = ["openus_tiny", "openus_small", "openus_base"]

# timm tests selected by `list_models(module=FEAT_INTER_FILTERS)` (models with forward_intermediates and the feature
# getter), or by an explicit list of models with prune_intermediate_layers; OpenUS has both. The explicit list names
# the smallest variant of each family (convnext_atto, mambaout_femto, ...): openus_tiny here. The pruning contract
# test prunes every model at every index and timm leaves it out of its CI for its cost; it runs on openus_tiny.
_FEATURE_INTERMEDIATES = {
    "test_model_forward_intermediates_features": OPENUS_NAMES,
    "test_model_forward_intermediates": OPENUS_NAMES,
    "test_prune_intermediate_layers_params_used": ["openus_tiny"],
    "test_prune_intermediate_layers_contract": ["openus_tiny"],
}
# what timm's EXCLUDE_JIT_FILTERS would hold for OpenUS: transformers modules are not TorchScript-compilable
_EXCLUDE_JIT = {"test_model_forward_torchscript", "test_model_forward_fx_torchscript"}

try:
    _peer = peer_suites.timm_test_models()
except peer_suites.PeerSuiteMissing as err:
    _peer, _MISSING = None, str(err)


def _openus_version(name: str, func: types.FunctionType) -> types.FunctionType | None:
    """A copy of timm's test ``func`` whose ``model_name`` parametrization lists only OpenUS models (None if timm's
    filters select none of them), with timm's timeout applied to the test body only."""
    marks, selected = [], False
    for mark in getattr(func, "pytestmark", []):
        if mark.name == "parametrize" and mark.args and mark.args[0] == "model_name":
            values = list(mark.args[1])
            names = _FEATURE_INTERMEDIATES.get(name) or [v for v in values if v in OPENUS_NAMES]
            if not names:
                return None
            selected = True
            mark = pytest.mark.parametrize("model_name", names).mark
        elif mark.name == "timeout":
            mark = pytest.mark.timeout(*mark.args, **{**mark.kwargs, "func_only": True}).mark
        marks.append(mark)
    if not selected or name in _EXCLUDE_JIT:
        return None
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__doc__, copy.__module__ = func.__doc__, __name__
    copy.pytestmark = marks + [pytest.mark.usefixtures("_built_scan_kernel")]
    return copy


@pytest.fixture(scope="module")
def _built_scan_kernel():
    """One small OpenUS forward: compiles the CPU scan kernel (once per machine) outside timm's time limits."""
    import torch

    from openus_hub import OpenUSConfig, OpenUSModel

    with torch.no_grad():
        OpenUSModel(OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 1]))(torch.randn(1, 3, 32, 32))


if _peer is None:
    def test_timm_model_tests_available():
        skip_or_fail(_MISSING)
else:
    cfg_device = _peer.cfg_device  # the fixture timm's default-cfg tests use
    for _name, _func in sorted(vars(_peer).items()):
        if _name.startswith("test_") and isinstance(_func, types.FunctionType):
            _test = _openus_version(_name, _func)
            if _test is not None:
                globals()[_name] = _test
    del _name, _func, _test
