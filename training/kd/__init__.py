"""TransKD knowledge-distillation modules (training only; the deployed student is a stock SegFormer).

Upstream: ``CSF.py`` (CSF + PEA), ``CSF_GLMixer.py``, ``CSF_EA.py`` of RuipingL/TransKD at commit 39ab795d. Key
names and the upstream key map live in `upstream_keys.py`.
"""

from .csf import CrossSelectiveFusion, SelectiveFusion
from .distiller import TransKDDistiller, TransKDModules
from .ea import EmbeddingAssistant
from .features import FeatureTap, hierarchical_channels
from .gl_mixer import GlobalLocalMixer
from .pea import PatchEmbeddingAlignment
from .upstream_keys import convert_upstream_kd_state_dict

__all__ = [
    "CrossSelectiveFusion",
    "EmbeddingAssistant",
    "FeatureTap",
    "GlobalLocalMixer",
    "PatchEmbeddingAlignment",
    "SelectiveFusion",
    "TransKDDistiller",
    "TransKDModules",
    "convert_upstream_kd_state_dict",
    "hierarchical_channels",
]
