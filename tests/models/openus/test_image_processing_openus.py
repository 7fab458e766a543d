"""OpenUSImageProcessor under transformers' own image-processing tests (`ImageProcessingTestMixin` and
`PostProcessSemanticSegmentationTestMixin` from the installed version's sdist, see `tests/models/peer_suites.py`), as
a processor added to transformers is tested. OpenUS-specific behaviour (upstream parity, ultrasound inputs, DICOM) is
tested in tests/test_image_processing_openus.py.

Without the peer files every test here skips on a user's machine and fails under OPENUS_HUB_STRICT_TESTS=1 (CI).
"""

import unittest

from transformers import AutoImageProcessor

from openus_hub import OpenUSConfig
from tests.conftest import skip_or_fail
from tests.models import peer_suites

try:
    _common = peer_suites.transformers_module("test_image_processing_common")
    ImageProcessingTester, ImageProcessingTestMixin = _common.ImageProcessingTester, _common.ImageProcessingTestMixin
    PostProcessSemanticSegmentationTestMixin = _common.PostProcessSemanticSegmentationTestMixin
except peer_suites.PeerSuiteMissing as err:
    _MISSING = str(err)

    class ImageProcessingTestMixin:
        def setUp(self):
            skip_or_fail(_MISSING)

    class ImageProcessingTester:
        def __init__(self, *args, **kwargs):
            pass

    class PostProcessSemanticSegmentationTestMixin:
        pass


class OpenUSImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 18, "width": 18})
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("do_normalize", True)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        kwargs.setdefault("do_convert_rgb", True)
        kwargs.setdefault("num_labels", 2)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # The common tester looks the processors up in transformers' static table of in-tree models; OpenUS's are
        # registered with AutoImageProcessor instead (openus_hub/models/__init__.py): the same backend -> class map.
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

        return dict(IMAGE_PROCESSOR_MAPPING[OpenUSConfig])


class OpenUSImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = OpenUSImageProcessingTester

    def test_registered_backends(self):
        # OpenUS: both backend names resolve to the PIL implementation, on purpose: upstream preprocessing resizes with
        # PIL and parity with it to 1e-5 needs PIL (see openus_hub/models/openus/image_processing_openus.py)
        classes = self.image_processing_classes
        self.assertEqual(set(classes), {"pil", "torchvision"})
        self.assertTrue(issubclass(classes["torchvision"], classes["pil"]))
        self.assertIs(type(AutoImageProcessor.from_pretrained.__self__), type)  # AutoImageProcessor is importable
