"""Reading ultrasound inputs: DICOM images and cine loops, and image files at their native bit depth."""

from .dicom import (
    BurnedInAnnotationWarning,
    DicomDecoderMissingError,
    DicomImage,
    DicomMetadata,
    DicomReadError,
    UltrasoundRegion,
    heuristic_crop_box,
    is_dicom_file,
    number_of_frames,
    read_dicom,
    region_crop_box,
    select_frames,
    ultrasound_regions,
)
from .images import IMAGE_EXTENSIONS, ImageReadError, find_inputs, is_supported_file, load_image_file
from .inputs import InputItem, expand_input

__all__ = [
    "IMAGE_EXTENSIONS",
    "BurnedInAnnotationWarning",
    "DicomDecoderMissingError",
    "DicomImage",
    "DicomMetadata",
    "DicomReadError",
    "ImageReadError",
    "InputItem",
    "UltrasoundRegion",
    "expand_input",
    "find_inputs",
    "heuristic_crop_box",
    "is_dicom_file",
    "is_supported_file",
    "load_image_file",
    "number_of_frames",
    "read_dicom",
    "region_crop_box",
    "select_frames",
    "ultrasound_regions",
]
