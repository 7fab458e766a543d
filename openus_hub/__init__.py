"""openus_hub: ultrasound foundation models (OpenUS) as native transformers models.

Importing the package registers every model with the transformers Auto classes, so
``AutoModel.from_pretrained(folder)`` works without ``trust_remote_code``.
"""

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
