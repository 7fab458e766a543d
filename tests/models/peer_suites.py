"""Load the peer test suites (transformers' common model tests, timm's model tests) fetched by
``scripts/fetch_peer_tests.py`` into ``.peer_tests/`` (or ``$OPENUS_PEER_TESTS_DIR``).

transformers' ``tests/`` folder is imported as the package ``transformers_peer_tests`` (its modules import one
another relatively). Four modules they import live in transformers' repository but not in its sdist; this file
provides them, written here (not copied):

* ``exporters.test_export.ExportTesterMixin``: the export tests every ``ModelTesterMixin`` inherits. Here: one test,
  ``test_torch_export``, exporting each model class with transformers' own ``DynamoExporter`` (``torch.export``,
  static shapes) and comparing the exported program's outputs with the eager ones;
* ``generation.test_utils.GenerationTesterMixin``: generation tests, for models that generate (OpenUS does not);
* ``utils.test_configuration_utils.config_common_kwargs``: non-default values of the ``PreTrainedConfig`` fields
  every config accepts (what ``ConfigTester.check_config_arguments_init`` sets and reads back);
* ``fetch_hub_objects_for_ci.url_to_local_path``: transformers' CI maps its test-image URLs to a local cache. Tests
  here run offline, so every URL maps to one real ultrasound frame (pydicom's ``ybr_color`` echo, frame 0, as PNG).

timm's ``tests/test_models.py`` is imported as ``timm_peer_test_models`` after ``import openus_hub`` has registered
the ``openus_*`` models, so its module-level ``list_models(...)`` calls (and exclusion filters) see them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_DIR = Path(os.environ.get("OPENUS_PEER_TESTS_DIR", REPO_ROOT / ".peer_tests"))
FETCH_HINT = "run `python scripts/fetch_peer_tests.py` (scripts/install.sh does), or set OPENUS_PEER_TESTS_DIR"

TRANSFORMERS_PACKAGE = "transformers_peer_tests"


class PeerSuiteMissing(RuntimeError):
    """The peer test files for the installed version are not on this machine."""


def _suite_dir(package: str) -> Path:
    import importlib.metadata

    version = importlib.metadata.version(package)
    folder = PEER_DIR / f"{package}-{version}"
    if not (folder / "MANIFEST.json").is_file():
        raise PeerSuiteMissing(f"{package} {version}'s test suite is not in {folder}; {FETCH_HINT}")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    if manifest.get("version") != version:
        raise PeerSuiteMissing(f"{folder} holds {package} {manifest.get('version')}'s tests, {version} is installed; "
                               f"{FETCH_HINT}")
    return folder


# ------------------------------------------------------------------------------------------ transformers shims


def _config_common_kwargs() -> dict:
    """A non-default value for each field every ``PreTrainedConfig`` accepts (transformers 5), as the config tester
    expects: it builds a config from these and reads each one back (``dtype`` as ``torch.float16``)."""
    return {
        "return_dict": False,
        "output_hidden_states": True,
        "output_attentions": True,
        "dtype": "float16",
        "chunk_size_feed_forward": 5,
        "architectures": ["OpenUSModel"],
        "id2label": {0: "label"},
        "label2id": {"label": "0"},
        "problem_type": "regression",
    }


def _test_image_path() -> str:
    """A real ultrasound frame as PNG (pydicom's SonoSite echo, frame 0), written once next to the peer tests."""
    path = PEER_DIR / "ultrasound_frame.png"
    if not path.is_file():
        import pydicom.examples
        from PIL import Image
        from pydicom.pixels import pixel_array

        frame = pixel_array(pydicom.examples.get_path("ybr_color"), index=0)  # (240, 320, 3) uint8
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        Image.fromarray(frame).save(tmp, format="PNG")
        os.replace(tmp, path)
    return str(path)


def _make_export_tester_mixin():
    import unittest

    import torch

    class ExportTesterMixin:
        """``torch.export`` of every model class (static shapes) with transformers' ``DynamoExporter``; the exported
        program must reproduce the eager outputs. Skipped when the test class sets ``test_torch_exportable = False``."""

        def test_torch_export(self):
            if not getattr(self, "test_torch_exportable", True):
                raise unittest.SkipTest("test_torch_exportable is False for this model")
            from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter

            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            for model_class in self.all_model_classes:
                with self.subTest(model_class.__name__):
                    model = model_class(config).eval()
                    with torch.no_grad():
                        eager = model(**inputs)
                    program, _ = DynamoExporter().export_program(model, dict(inputs), DynamoConfig())
                    with torch.no_grad():
                        exported = program.module()(**inputs)
                    eager_tensors = [t for t in torch.utils._pytree.tree_leaves(tuple(eager.values()))
                                     if isinstance(t, torch.Tensor)]
                    exported_tensors = [t for t in torch.utils._pytree.tree_leaves(exported)
                                        if isinstance(t, torch.Tensor)]
                    self.assertEqual(len(eager_tensors), len(exported_tensors))
                    for want, got in zip(eager_tensors, exported_tensors):
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    return ExportTesterMixin


def _install_shims() -> None:
    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    pkg = TRANSFORMERS_PACKAGE
    module(f"{pkg}.exporters", __path__=[])
    module(f"{pkg}.exporters.test_export", ExportTesterMixin=_make_export_tester_mixin())
    module(f"{pkg}.generation", __path__=[])
    module(f"{pkg}.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
    module(f"{pkg}.utils", __path__=[])
    module(f"{pkg}.utils.test_configuration_utils", config_common_kwargs=_config_common_kwargs())
    if "fetch_hub_objects_for_ci" not in sys.modules:
        module("fetch_hub_objects_for_ci", url_to_local_path=lambda url: _test_image_path())


def transformers_tests() -> types.ModuleType:
    """The package ``transformers_peer_tests`` (transformers' ``tests/`` for the installed version)."""
    if TRANSFORMERS_PACKAGE in sys.modules:
        return sys.modules[TRANSFORMERS_PACKAGE]
    tests_dir = _suite_dir("transformers") / "tests"
    spec = importlib.util.spec_from_file_location(
        TRANSFORMERS_PACKAGE, tests_dir / "__init__.py", submodule_search_locations=[str(tests_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[TRANSFORMERS_PACKAGE] = package
    spec.loader.exec_module(package)
    _install_shims()
    return package


def transformers_module(name: str) -> types.ModuleType:
    """One module of transformers' tests, e.g. ``test_modeling_common``."""
    transformers_tests()
    return importlib.import_module(f"{TRANSFORMERS_PACKAGE}.{name}")


# ---------------------------------------------------------------------------------------------------------- timm


def timm_test_models() -> types.ModuleType:
    """timm's ``tests/test_models.py`` for the installed timm, imported after the openus_* models are registered."""
    name = "timm_peer_test_models"
    if name in sys.modules:
        return sys.modules[name]
    path = _suite_dir("timm") / "tests" / "test_models.py"
    import openus_hub  # noqa: F401  (registers openus_* with timm before the module lists the models)

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
