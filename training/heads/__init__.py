from .ibot_head import IBOTHead, WeightNormLinear
from .pixel_decoder import PixelDecoder

__all__ = ["IBOTHead", "PixelDecoder", "WeightNormLinear"]
