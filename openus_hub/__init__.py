"""openus_hub: ultrasound foundation models (OpenUS) as native transformers models.

Importing the package registers every model with the transformers Auto classes, so
``AutoModel.from_pretrained(folder)`` works without ``trust_remote_code``.
"""

import importlib.util as _importlib_util
import logging as _logging

from .models import (
    OpenUSBackbone,
    OpenUSConfig,
    OpenUSForImageClassification,
    OpenUSForSemanticSegmentation,
    OpenUSImageProcessor,
    OpenUSImageProcessorPil,
    OpenUSModel,
)
from .models.openus import OPENUS_PRESETS
from .features import FeatureOutput, extract_features
from .auto import (
    AutoBackbone,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    pipeline,
)
from .pretrained import list_models, list_pretrained, register_pretrained
from .version import __version__

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# pipeline("image-feature-extraction") on an OpenUS model reads DICOM files, datasets and cine loops
from . import pipelines as _pipelines  # noqa: E402

_pipelines.register()

# with timm installed, the backbones are timm models too: timm.create_model("openus_small", features_only=True)
if _importlib_util.find_spec("timm") is not None:
    from . import timm_models as _timm_models

    _timm_models.register()

__all__ = [
    "AutoBackbone",
    "AutoImageProcessor",
    "AutoModel",
    "AutoModelForImageClassification",
    "AutoModelForSemanticSegmentation",
    "list_models",
    "list_pretrained",
    "pipeline",
    "register_pretrained",
    "OPENUS_PRESETS",
    "OpenUSBackbone",
    "OpenUSConfig",
    "OpenUSForImageClassification",
    "FeatureOutput",
    "OpenUSForSemanticSegmentation",
    "OpenUSImageProcessor",
    "OpenUSImageProcessorPil",
    "OpenUSModel",
    "__version__",
    "extract_features",
]
