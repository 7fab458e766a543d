from .configuration_openus import OPENUS_PRESETS, OpenUSConfig
from .image_processing_openus import OpenUSImageProcessor, OpenUSImageProcessorPil
from .modeling_openus import (
    OpenUSBackbone,
    OpenUSForImageClassification,
    OpenUSForSemanticSegmentation,
    OpenUSModel,
    OpenUSPreTrainedModel,
)

__all__ = [
    "OPENUS_PRESETS",
    "OpenUSBackbone",
    "OpenUSConfig",
    "OpenUSForImageClassification",
    "OpenUSImageProcessor",
    "OpenUSImageProcessorPil",
    "OpenUSForSemanticSegmentation",
    "OpenUSModel",
    "OpenUSPreTrainedModel",
]
