"""OpenUS (VMamba) backbone configuration."""

from __future__ import annotations

import copy
import math

from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig

SCAN_IMPLEMENTATIONS = ("auto", "reference", "cpu_kernel", "mamba_ssm", "chunked")

# Architecture presets (spec §1.1, §1.10). openus-small is the paper's model (VMamba-S "s2l15").
OPENUS_PRESETS: dict[str, dict] = {
    "openus-tiny": {"depths": [2, 2, 8, 2], "embed_dim": 96, "ssm_ratio": 1.0, "d_state": 1, "drop_path_rate": 0.2},
    "openus-small": {"depths": [2, 2, 15, 2], "embed_dim": 96, "ssm_ratio": 2.0, "d_state": 1, "drop_path_rate": 0.3},
    "openus-base": {"depths": [2, 2, 15, 2], "embed_dim": 128, "ssm_ratio": 2.0, "d_state": 1, "drop_path_rate": 0.6},
}


class OpenUSConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of an OpenUS backbone: the VMamba (SS2D cross-scan) network of OpenUS (arXiv 2511.11510), in the
    upstream "v05_noz" form (no gating branch, SiLU after the depth-wise conv, LayerNorm over the inner width after
    the four-direction merge). `OpenUSConfig()` is openus-small, the paper's model; `from_preset` gives the others.

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            Input channels. Grayscale ultrasound is replicated to 3 channels by the image processor.
        embed_dim (`int`, *optional*, defaults to 96):
            Width of stage 1; stage `i` has `embed_dim * 2**i` channels.
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
            Hidden width of the block MLP as a multiple of the stage width.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the block MLP and of the stem.
        drop_path_rate (`float`, *optional*, defaults to 0.3):
            Stochastic depth, rising linearly from 0 over all blocks.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal used for linear layers.
        dt_min (`float`, *optional*, defaults to 0.001), dt_max (`float`, *optional*, defaults to 0.1),
        dt_init_floor (`float`, *optional*, defaults to 1e-4):
            Range and floor of the initial step size (Mamba "v0" initialisation).
        use_mask_token (`bool`, *optional*, defaults to `False`):
            Adds a learned token that replaces stage-0 features at masked 32x32 cells (`bool_masked_pos`), as in
            OpenUS pretraining.
        scan_implementation (`str`, *optional*, defaults to `"auto"`):
            Selective-scan path: `"auto"`, `"reference"` (pure PyTorch), `"cpu_kernel"` (fused C++ kernel) or
            `"mamba_ssm"` (CUDA) or `"chunked"` (standard operations only, used for ONNX export). All compute the same
            function.
        out_features (`list[str]`, *optional*), out_indices (`list[int]`, *optional*):
            Stages returned by `OpenUSBackbone` (`"stem"`, `"stage1"`..`"stage4"`); defaults to all four stages.

        Segmentation head (`OpenUSForSemanticSegmentation`, upstream's MambaDecoder, spec §3.2; unused by the other
        models). The number of classes is the standard `num_labels` (default 2, as upstream).

        decoder_embed_dim (`int`, *optional*):
            Width of the decoder's finest level; level `i` has `decoder_embed_dim * 2**i` channels. The decoder adds
            the backbone's stage maps to its own (no projections), so this must equal `embed_dim`, which is the
            default.
        decoder_depths (`list[int]`, *optional*, defaults to `[4, 4, 4, 4]`):
            CVSS decoder blocks per level, indexed like the backbone stages (entry 0 = the stride-4 level). The last
            level has no blocks (it is only patch-expanded), so, as upstream, its entry only shifts the drop-path
            schedule over all `sum(decoder_depths)` positions.
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
    >>> config = OpenUSConfig.from_preset("openus-tiny")
    >>> model = OpenUSModel(config)
    ```
    """

    model_type = "openus"
    attribute_map = {"num_hidden_layers": "num_stages"}

    def __init__(
        self,
        num_channels: int = 3,
        embed_dim: int = 96,
        depths: list[int] | tuple[int, ...] = (2, 2, 15, 2),
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_ranks: list[int] | None = None,
        d_conv: int = 3,
        conv_bias: bool = False,
        ssm_act: str = "silu",
        mlp_ratio: float = 4.0,
        hidden_act: str = "gelu",
        drop_path_rate: float = 0.3,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        use_mask_token: bool = False,
        scan_implementation: str = "auto",
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        decoder_embed_dim: int | None = None,
        decoder_depths: list[int] | tuple[int, ...] = (4, 4, 4, 4),
        decoder_d_state: int = 4,
        decoder_ssm_ratio: float = 2.0,
        decoder_drop_path_rate: float = 0.1,
        decoder_ca_compress: int = 3,
        decoder_ca_squeeze: int = 30,
        loss_ignore_index: int = 255,
        use_dice_loss: bool = False,
        dice_loss_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.d_state = d_state
        self.ssm_ratio = float(ssm_ratio)
        self.d_conv = d_conv
        self.conv_bias = conv_bias
        self.ssm_act = ssm_act
        self.mlp_ratio = float(mlp_ratio)
        self.hidden_act = hidden_act
        self.drop_path_rate = float(drop_path_rate)
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.use_mask_token = use_mask_token
        self.scan_implementation = scan_implementation
        self.num_stages = len(self.depths)
        self.hidden_sizes = [embed_dim * 2**i for i in range(self.num_stages)]
        self.dt_ranks = list(dt_ranks) if dt_ranks is not None else [math.ceil(c / 16) for c in self.hidden_sizes]
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_stages + 1)]
        if out_features is None and out_indices is None:
            out_indices = list(range(1, self.num_stages + 1))
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        self.decoder_embed_dim = embed_dim if decoder_embed_dim is None else decoder_embed_dim
        self.decoder_depths = list(decoder_depths)
        self.decoder_d_state = decoder_d_state
        self.decoder_ssm_ratio = float(decoder_ssm_ratio)
        self.decoder_drop_path_rate = float(decoder_drop_path_rate)
        self.decoder_ca_compress = decoder_ca_compress
        self.decoder_ca_squeeze = decoder_ca_squeeze
        self.loss_ignore_index = loss_ignore_index
        self.use_dice_loss = use_dice_loss
        self.dice_loss_weight = float(dice_loss_weight)
        self.validate()

    @property
    def inner_sizes(self) -> list[int]:
        """Inner (SS2D) width per stage: `int(ssm_ratio * width)`."""
        return [int(self.ssm_ratio * c) for c in self.hidden_sizes]

    @property
    def mlp_sizes(self) -> list[int]:
        return [int(self.mlp_ratio * c) for c in self.hidden_sizes]

    @property
    def decoder_hidden_sizes(self) -> list[int]:
        """Width of each decoder level (level `i` is added to backbone stage `i`): `decoder_embed_dim * 2**i`."""
        return [self.decoder_embed_dim * 2**i for i in range(self.num_stages)]

    @property
    def output_stride(self) -> int:
        """Downsampling of the last stage: 4 (stem) x 2 per later stage = 32 for four stages."""
        return 4 * 2 ** (self.num_stages - 1)

    def validate(self) -> None:
        def fail(msg: str):
            raise ValueError(f"OpenUSConfig: {msg}")

        if not self.depths or any(not isinstance(d, int) or d < 1 for d in self.depths):
            fail(f"depths must be a non-empty list of positive ints, got {self.depths}")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 2 or self.embed_dim % 2:
            fail(f"embed_dim must be an even int >= 2 (the stem's first conv has embed_dim // 2 channels), got {self.embed_dim}")
        if not isinstance(self.d_state, int) or self.d_state < 1:
            fail(f"d_state must be a positive int, got {self.d_state}")
        if self.ssm_ratio <= 0 or any(d < 1 for d in self.inner_sizes):
            fail(f"ssm_ratio must be > 0 and give an inner width >= 1, got {self.ssm_ratio}")
        if len(self.dt_ranks) != self.num_stages or any(not isinstance(r, int) or r < 1 for r in self.dt_ranks):
            fail(f"dt_ranks must list one positive int per stage ({self.num_stages}), got {self.dt_ranks}")
        if not isinstance(self.d_conv, int) or self.d_conv < 1 or self.d_conv % 2 == 0:
            fail(f"d_conv must be an odd positive int (same-size padding), got {self.d_conv}")
        if self.mlp_ratio < 0:
            fail(f"mlp_ratio must be >= 0 (0 disables the MLP), got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0 < self.dt_min <= self.dt_max:
            fail(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.scan_implementation not in SCAN_IMPLEMENTATIONS:
            fail(f"scan_implementation must be one of {SCAN_IMPLEMENTATIONS}, got {self.scan_implementation!r}")
        # segmentation head (spec §3.2)
        if self.decoder_embed_dim != self.embed_dim:
            fail(f"decoder_embed_dim ({self.decoder_embed_dim}) must equal embed_dim ({self.embed_dim}): the decoder "
                 "adds the backbone's stage maps to its own without projections")
        if len(self.decoder_depths) != self.num_stages or any(
            not isinstance(d, int) or d < 0 for d in self.decoder_depths
        ):
            fail(f"decoder_depths must list one int >= 0 per backbone stage ({self.num_stages}), got "
                 f"{self.decoder_depths}")
        if self.num_stages < 2:
            fail("the segmentation decoder needs at least 2 backbone stages")
        if not isinstance(self.decoder_d_state, int) or self.decoder_d_state < 1:
            fail(f"decoder_d_state must be a positive int, got {self.decoder_d_state}")
        if self.decoder_ssm_ratio <= 0 or int(self.decoder_ssm_ratio * self.decoder_embed_dim) < 1:
            fail(f"decoder_ssm_ratio must be > 0 and give an inner width >= 1, got {self.decoder_ssm_ratio}")
        if not 0.0 <= self.decoder_drop_path_rate < 1.0:
            fail(f"decoder_drop_path_rate must be in [0, 1), got {self.decoder_drop_path_rate}")
        for name in ("decoder_ca_compress", "decoder_ca_squeeze"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive int, got {value}")
        if not isinstance(self.loss_ignore_index, int):
            fail(f"loss_ignore_index must be an int, got {self.loss_ignore_index!r}")
        if self.dice_loss_weight < 0:
            fail(f"dice_loss_weight must be >= 0, got {self.dice_loss_weight}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> OpenUSConfig:
        """Config of a named architecture (`openus-tiny`, `openus-small`, `openus-base`), with optional overrides."""
        if name not in OPENUS_PRESETS:
            raise ValueError(f"unknown OpenUS preset {name!r}; choose one of {sorted(OPENUS_PRESETS)}")
        kwargs = copy.deepcopy(OPENUS_PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["OPENUS_PRESETS", "OpenUSConfig"]
