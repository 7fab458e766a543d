"""Model families of openus_hub, registered with the transformers Auto classes on import."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .openus import (
    OpenUSBackbone,
    OpenUSConfig,
    OpenUSForImageClassification,
    OpenUSForSemanticSegmentation,
    OpenUSImageProcessor,
    OpenUSImageProcessorPil,
    OpenUSModel,
)


def _register() -> None:
    AutoConfig.register(OpenUSConfig.model_type, OpenUSConfig, exist_ok=True)
    AutoModel.register(OpenUSConfig, OpenUSModel, exist_ok=True)
    AutoBackbone.register(OpenUSConfig, OpenUSBackbone, exist_ok=True)
    AutoModelForImageClassification.register(OpenUSConfig, OpenUSForImageClassification, exist_ok=True)
    # both backends map to the PIL implementation: upstream parity needs PIL's resize (see image_processing_openus)
    AutoImageProcessor.register(
        OpenUSConfig,
        image_processor_classes={"pil": OpenUSImageProcessorPil, "torchvision": OpenUSImageProcessor},
        exist_ok=True,
    )
    AutoModelForSemanticSegmentation.register(OpenUSConfig, OpenUSForSemanticSegmentation, exist_ok=True)
    # saved folders carry `auto_map` + the code, so they also load with trust_remote_code where we are not installed
    OpenUSConfig.register_for_auto_class()
    OpenUSModel.register_for_auto_class("AutoModel")
    OpenUSBackbone.register_for_auto_class("AutoBackbone")
    OpenUSForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    OpenUSForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")


_register()
