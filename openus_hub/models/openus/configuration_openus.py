"""OpenUS (VMamba) configuration: one typed, strict config for the backbone and every head."""

import copy
import math

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import auto_docstring
from transformers.utils.auto_docstring import HARDCODED_CONFIG_FOR_MODELS

from openus_hub.ops.ss2d import SCAN_IMPLEMENTATIONS

# `@auto_docstring` finds a model's config class in transformers' static table of in-tree models; OpenUS is
# registered with the Auto classes instead. This is the documented entry for models the table does not list (without
# it, decorating the OpenUS classes prints "[ERROR] Config not found for openus").
HARDCODED_CONFIG_FOR_MODELS.setdefault("openus", "OpenUSConfig")

# Architecture presets. openus-small is the paper's model (VMamba-S "s2l15"); the drop-path rates are upstream's
# pretraining ones (XZheng0427/OpenUS at 6b9f6d2e, `vmamba_models/vmamba.py` model factories).
OPENUS_PRESETS: dict[str, dict] = {
    "openus-tiny": {"depths": [2, 2, 8, 2], "embed_dim": 96, "ssm_ratio": 1.0, "d_state": 1, "drop_path_rate": 0.2},
    "openus-small": {"depths": [2, 2, 15, 2], "embed_dim": 96, "ssm_ratio": 2.0, "d_state": 1, "drop_path_rate": 0.3},
    "openus-base": {"depths": [2, 2, 15, 2], "embed_dim": 128, "ssm_ratio": 2.0, "d_state": 1, "drop_path_rate": 0.6},
}

# Keys that configs written by earlier openus_hub versions stored, now derived from the fields: they are checked
# against the derived value when present and not stored again.
_DERIVED_KEYS = ("hidden_sizes", "num_stages", "stage_names", "decoder_embed_dim")


@auto_docstring(
    custom_intro="""
    Configuration of an OpenUS model: the VMamba (SS2D cross-scan) network of OpenUS (arXiv 2511.11510) in the
    upstream "v05_noz" form (no gating branch, SiLU after the depth-wise conv, LayerNorm over the inner width after
    the four-direction merge), and the segmentation head. `OpenUSConfig()` is openus-small, the paper's model;
    `OpenUSConfig.from_preset(name)` gives the others.
    """
)
@strict
class OpenUSConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    num_channels (`int`, *optional*, defaults to 3):
        Input channels. Grayscale ultrasound is replicated to 3 channels by the image processor.
    embed_dim (`int`, *optional*, defaults to 96):
        Width of stage 1; stage `i` has `embed_dim * 2**i` channels (`hidden_sizes`).
    depths (`list[int]`, *optional*, defaults to `[2, 2, 15, 2]`):
        Number of VSS blocks per stage.
    d_state (`int`, *optional*, defaults to 1):
        State size N of the selective scan.
    ssm_ratio (`float`, *optional*, defaults to 2.0):
        Inner width of the SS2D mixer as a multiple of the stage width.
    dt_ranks (`list[int]`, *optional*):
        Rank R of the step-size projection per stage. Defaults to `ceil(width / 16)` (upstream's "auto").
    d_conv (`int`, *optional*, defaults to 3):
        Kernel size of the depth-wise convolution inside SS2D.
    conv_bias (`bool`, *optional*, defaults to `False`):
        Whether that depth-wise convolution has a bias.
    ssm_act (`str`, *optional*, defaults to `"silu"`):
        Activation after the depth-wise convolution.
    mlp_ratio (`float`, *optional*, defaults to 4.0):
        Hidden width of the block MLP as a multiple of the stage width; 0 removes the MLP.
    hidden_act (`str`, *optional*, defaults to `"gelu"`):
        Activation of the block MLP and of the stem.
    drop_path_rate (`float`, *optional*, defaults to 0.3):
        Stochastic depth, rising linearly from 0 over all blocks.
    layer_norm_eps (`float`, *optional*, defaults to 1e-05):
        Epsilon of every LayerNorm.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the truncated normal used for linear layers.
    dt_min (`float`, *optional*, defaults to 0.001):
        Smallest initial step size (Mamba "v0" initialisation).
    dt_max (`float`, *optional*, defaults to 0.1):
        Largest initial step size.
    dt_init_floor (`float`, *optional*, defaults to 0.0001):
        Floor of the initial step size.
    use_mask_token (`bool`, *optional*, defaults to `False`):
        Adds a learned token that replaces stage-1 features at masked 32x32 cells (`bool_masked_pos`), as in OpenUS
        pretraining.
    scan_implementation (`str`, *optional*, defaults to `"auto"`):
        Selective-scan path, one of `openus_hub.ops.ss2d.SCAN_IMPLEMENTATIONS`: `"auto"` (the fastest available),
        `"reference"` (sequential PyTorch), `"chunked"` (standard operators; ONNX export), `"cpu_kernel"` (fused C++
        CPU kernel), `"triton"` (fused Triton kernel, CUDA) or `"mamba_ssm"` (CUDA). All compute the same function.
    out_features (`list[str]`, *optional*):
        Stages `OpenUSBackbone` returns (`"stem"`, `"stage1"`..`"stage4"`). With neither this nor `out_indices`,
        the last stage only (the transformers convention). `OpenUSForSemanticSegmentation` uses every stage.
    out_indices (`list[int]`, *optional*):
        The same stages by index into `stage_names` (`0` = `"stem"`).
    decoder_depths (`list[int]`, *optional*, defaults to `[4, 4, 4, 4]`):
        Segmentation head (upstream's MambaDecoder): CVSS blocks per level, indexed like the backbone stages (entry
        0 = the stride-4 level). The last level has no blocks (it is only patch-expanded), so, as upstream, its
        entry only shifts the drop-path schedule over all `sum(decoder_depths)` positions. The decoder's widths are
        the backbone's (`hidden_sizes`): it adds the stage maps to its own without projections.
    decoder_d_state (`int`, *optional*, defaults to 4):
        State size N of the decoder's selective scans.
    decoder_ssm_ratio (`float`, *optional*, defaults to 2.0):
        Inner width of the decoder's SS2D mixers as a multiple of the level width (dt rank is `ceil(width/16)`).
    decoder_drop_path_rate (`float`, *optional*, defaults to 0.1):
        Stochastic depth of the decoder blocks, `linspace(0, rate, sum(decoder_depths))`.
    decoder_ca_compress (`int`, *optional*, defaults to 3):
        Channel reduction of the convolutional attention block (CAB) inside each decoder block: `width // 3`.
    decoder_ca_squeeze (`int`, *optional*, defaults to 30):
        Squeeze factor of the channel attention inside the CAB: `width // 30` (at least 1).
    loss_ignore_index (`int`, *optional*, defaults to 255):
        Label value ignored by the segmentation loss (upstream `CrossEntropyLoss(ignore_index=255)`).
    use_dice_loss (`bool`, *optional*, defaults to `False`):
        Adds a soft Dice term to the segmentation loss. Off upstream (cross-entropy only).
    dice_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of that Dice term.

    Example:

    ```python
    >>> from openus_hub import OpenUSConfig, OpenUSModel

    >>> # the paper's model (openus-small), or another preset
    >>> configuration = OpenUSConfig()
    >>> configuration = OpenUSConfig.from_preset("openus-tiny")

    >>> # a randomly initialised model from it
    >>> model = OpenUSModel(configuration)
    ```"""

    model_type = "openus"
    attribute_map = {"num_hidden_layers": "num_stages"}

    num_channels: int = 3
    embed_dim: int = 96
    depths: list[int] | tuple[int, ...] = (2, 2, 15, 2)
    d_state: int = 1
    ssm_ratio: float | int = 2.0
    dt_ranks: list[int] | tuple[int, ...] | None = None
    d_conv: int = 3
    conv_bias: bool = False
    ssm_act: str = "silu"
    mlp_ratio: float | int = 4.0
    hidden_act: str = "gelu"
    drop_path_rate: float | int = 0.3
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    use_mask_token: bool = False
    scan_implementation: str = "auto"
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    decoder_depths: list[int] | tuple[int, ...] = (4, 4, 4, 4)
    decoder_d_state: int = 4
    decoder_ssm_ratio: float | int = 2.0
    decoder_drop_path_rate: float | int = 0.1
    decoder_ca_compress: int = 3
    decoder_ca_squeeze: int = 30
    loss_ignore_index: int = 255
    use_dice_loss: bool = False
    dice_loss_weight: float | int = 1.0

    def __post_init__(self, **kwargs):
        self.depths = list(self.depths)
        self.decoder_depths = list(self.decoder_depths)
        if self.dt_ranks is None:  # upstream's dt_rank="auto"
            self.dt_ranks = [math.ceil(c / 16) for c in self.hidden_sizes]
        self.dt_ranks = list(self.dt_ranks)
        for key in _DERIVED_KEYS:
            if key in kwargs and _plain(kwargs[key]) != _plain(getattr(self, key)):
                raise ValueError(
                    f"OpenUSConfig: {key}={kwargs[key]!r} contradicts the fields it is derived from (it would be "
                    f"{getattr(self, key)!r}); set embed_dim/depths instead, or drop {key} from the config"
                )
            kwargs.pop(key, None)
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    # -- derived sizes (computed from the fields, never stored) ------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def hidden_sizes(self) -> list[int]:
        """Width of each stage: `embed_dim * 2**i`."""
        return [self.embed_dim * 2**i for i in range(self.num_stages)]

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, self.num_stages + 1)]

    @property
    def inner_sizes(self) -> list[int]:
        """Inner (SS2D) width per stage: `int(ssm_ratio * width)`."""
        return [int(self.ssm_ratio * c) for c in self.hidden_sizes]

    @property
    def mlp_sizes(self) -> list[int]:
        return [int(self.mlp_ratio * c) for c in self.hidden_sizes]

    @property
    def decoder_embed_dim(self) -> int:
        """Width of the decoder's finest level: `embed_dim`, since the decoder adds the backbone's stage maps to its
        own without projections (upstream MambaDecoder)."""
        return self.embed_dim

    @property
    def decoder_hidden_sizes(self) -> list[int]:
        """Width of each decoder level (level `i` is added to backbone stage `i`): the backbone's `hidden_sizes`."""
        return self.hidden_sizes

    @property
    def output_stride(self) -> int:
        """Downsampling of the last stage: 4 (stem) x 2 per later stage = 32 for four stages."""
        return 4 * 2 ** (self.num_stages - 1)

    # -- validation: these run after the base class's validators (`@strict` collects every `validate_*`) ---------

    def validate_backbone(self) -> None:
        if not self.depths or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in self.depths):
            raise ValueError(f"OpenUSConfig: depths must be a non-empty list of positive ints, got {self.depths}")
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"OpenUSConfig: embed_dim must be an even int >= 2 (the stem's first conv has "
                             f"embed_dim // 2 channels), got {self.embed_dim}")
        if self.num_channels < 1:
            raise ValueError(f"OpenUSConfig: num_channels must be >= 1, got {self.num_channels}")
        if self.d_state < 1:
            raise ValueError(f"OpenUSConfig: d_state must be a positive int, got {self.d_state}")
        if self.ssm_ratio <= 0 or any(d < 1 for d in self.inner_sizes):
            raise ValueError(f"OpenUSConfig: ssm_ratio must be > 0 and give an inner width >= 1, got {self.ssm_ratio}")
        if len(self.dt_ranks) != self.num_stages or any(
            not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in self.dt_ranks
        ):
            raise ValueError(f"OpenUSConfig: dt_ranks must list one positive int per stage ({self.num_stages}), got "
                             f"{self.dt_ranks}")
        if self.d_conv < 1 or self.d_conv % 2 == 0:
            raise ValueError(f"OpenUSConfig: d_conv must be an odd positive int (same-size padding), got {self.d_conv}")
        if self.mlp_ratio < 0:
            raise ValueError(f"OpenUSConfig: mlp_ratio must be >= 0 (0 removes the MLP), got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"OpenUSConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"OpenUSConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"OpenUSConfig: need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.scan_implementation not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"OpenUSConfig: scan_implementation must be one of {SCAN_IMPLEMENTATIONS}, got "
                             f"{self.scan_implementation!r}")

    def validate_segmentation_head(self) -> None:
        if self.num_stages < 2:
            raise ValueError("OpenUSConfig: the segmentation decoder needs at least 2 backbone stages")
        if len(self.decoder_depths) != self.num_stages or any(
            not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.decoder_depths
        ):
            raise ValueError(f"OpenUSConfig: decoder_depths must list one int >= 0 per backbone stage "
                             f"({self.num_stages}), got {self.decoder_depths}")
        if self.decoder_d_state < 1:
            raise ValueError(f"OpenUSConfig: decoder_d_state must be a positive int, got {self.decoder_d_state}")
        if self.decoder_ssm_ratio <= 0 or int(self.decoder_ssm_ratio * self.embed_dim) < 1:
            raise ValueError(f"OpenUSConfig: decoder_ssm_ratio must be > 0 and give an inner width >= 1, got "
                             f"{self.decoder_ssm_ratio}")
        if not 0.0 <= self.decoder_drop_path_rate < 1.0:
            raise ValueError(f"OpenUSConfig: decoder_drop_path_rate must be in [0, 1), got "
                             f"{self.decoder_drop_path_rate}")
        for name in ("decoder_ca_compress", "decoder_ca_squeeze"):
            if getattr(self, name) < 1:
                raise ValueError(f"OpenUSConfig: {name} must be a positive int, got {getattr(self, name)}")
        if self.dice_loss_weight < 0:
            raise ValueError(f"OpenUSConfig: dice_loss_weight must be >= 0, got {self.dice_loss_weight}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OpenUSConfig":
        """Config of a named architecture (`openus-tiny`, `openus-small`, `openus-base`), with optional overrides."""
        if name not in OPENUS_PRESETS:
            raise ValueError(f"unknown OpenUS preset {name!r}; choose one of {sorted(OPENUS_PRESETS)}")
        kwargs = copy.deepcopy(OPENUS_PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


def _plain(value):
    """Lists and tuples compare equal when their items do (JSON gives lists, defaults may be tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


__all__ = ["OPENUS_PRESETS", "OpenUSConfig"]
