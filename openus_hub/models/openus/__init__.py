from .configuration_openus import OPENUS_PRESETS, OpenUSConfig
from .modeling_openus import OpenUSBackbone, OpenUSForImageClassification, OpenUSModel, OpenUSPreTrainedModel

__all__ = [
    "OPENUS_PRESETS",
    "OpenUSBackbone",
    "OpenUSConfig",
    "OpenUSForImageClassification",
    "OpenUSModel",
    "OpenUSPreTrainedModel",
]
