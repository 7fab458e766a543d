"""Student and EMA teacher of OpenUS pretraining (upstream ``main_openus.py:251-331`` of XZheng0427/OpenUS at commit
6b9f6d2e): backbone + pixel decoder + reconstruction-importance EMA map + iBOT head, and the loading of upstream
``checkpoint.pth`` entries into them."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from openus_hub import OpenUSConfig, OpenUSModel
from openus_hub.ops.ss2d import minmax_normalize

from .heads.ibot_head import IBOTHead
from .heads.pixel_decoder import PixelDecoder
from .losses.reconstruction import ReconstructionImportance, patch_pixel_loss, reconstruction_loss


class OpenUSPretrainNetwork(nn.Module):
    """One network of the pair: upstream's ``MultiCropWrapper(Backbone_DINOv2_VSSM_2, iBOTHead)``.

    * ``backbone``: the library's ``OpenUSModel`` with a mask token (upstream ``masked_embed``);
    * ``decoder``: 1x1 conv + PixelShuffle(32) from the last stage map to pixels (upstream ``decoder``);
    * ``recon_importance``: the EMA map of the per-cell reconstruction loss (upstream ``ema_loss_map``);
    * ``head``: the iBOT head (shared last layer for the teacher).

    Upstream's unused ``decoder2`` is not built (it never enters forward; see training/README.md).
    """

    def __init__(self, config: OpenUSConfig, head_kwargs: dict, shared_head: bool = False):
        super().__init__()
        if not config.use_mask_token:
            config = copy.deepcopy(config)
            config.use_mask_token = True
        self.config = config
        self.patch_size = config.output_stride
        self.backbone = OpenUSModel(config)
        width = config.hidden_sizes[-1]
        self.decoder = PixelDecoder(width, self.patch_size)
        self.recon_importance = ReconstructionImportance(width)
        self.head = IBOTHead(width, shared_head=shared_head, **head_kwargs)

    def encode(self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None, attention: bool = False):
        """Tokens ``(B, 1+L, C)`` (upstream ``x_out``), the last stage map ``(B, C, h, w)`` and, on request, the raw
        implicit attention ``(B, L, L)`` of the last block (not normalised)."""
        out = self.backbone(pixel_values, bool_masked_pos=mask, output_attentions=attention, return_dict=True)
        tokens = out.last_hidden_state
        b, _, c = tokens.shape
        h, w = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        last_map = tokens[:, 1:].transpose(1, 2).reshape(b, c, h, w)  # [B, C, h, w] = upstream out_3
        return tokens, last_map, (out.attentions[0] if attention else None)

    def reconstruct(self, pixel_values: torch.Tensor, mask: torch.Tensor, importance: bool = True):
        """Upstream ``forward(x, mask, return_rec_loss=True)``: tokens, the masked-pixel loss and (for global crops)
        the reconstruction importance ``(B, C, L)``, which updates the EMA map."""
        tokens, last_map, _ = self.encode(pixel_values, mask)
        x_rec = self.decoder(last_map)  # [B, 3, H, W]
        loss = reconstruction_loss(x_rec, pixel_values, mask, self.patch_size)
        imp = self.recon_importance(patch_pixel_loss(x_rec, pixel_values, mask, self.patch_size)) if importance else None
        return tokens, loss, imp

    def forward(self, global_crops: torch.Tensor, global_masks: torch.Tensor, local_crops: torch.Tensor | None,
                local_masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The student's whole step in one call (one DDP forward per backward): masked global crops with their
        reconstruction loss and importance, masked local crops with theirs, and the head on both."""
        g_tokens, g_rec, g_imp = self.reconstruct(global_crops, global_masks, importance=True)
        g_cls, g_patch = self.head(g_tokens)
        out = {"global_cls": g_cls, "global_patch": g_patch, "global_rec": g_rec, "importance": g_imp}
        if local_crops is not None:
            l_tokens, l_rec, _ = self.reconstruct(local_crops, local_masks, importance=False)
            out["local_cls"] = self.head(l_tokens)[0]  # local patch logits are unused (main_openus.py:563-565)
            out["local_rec"] = l_rec
        return out

    @torch.no_grad()
    def teacher_forward(self, global_crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unmasked: ``(cls (B, K), patch (B, L, K), attention (B, L, L))``, the attention min-max normalised over the
        whole batch tensor as upstream."""
        tokens, _, attention = self.encode(global_crops, attention=True)
        cls, patch = self.head(tokens)
        return cls, patch, minmax_normalize(attention)


def build_teacher(student: OpenUSPretrainNetwork, head_kwargs: dict) -> OpenUSPretrainNetwork:
    """Upstream initialisation (main_openus.py:327): ``teacher.load_state_dict(student.state_dict(), strict=False)``.
    The shared head module is loaded twice, so it ends up with the student's ``last_layer2``."""
    teacher = OpenUSPretrainNetwork(student.config, head_kwargs, shared_head=True)
    teacher.load_state_dict(student.state_dict(), strict=False)
    teacher.recon_importance.reset()  # the teacher never reconstructs: no EMA map, as upstream
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` over the parameter names both have (upstream main_openus.py:609).
    The teacher's de-duplicated names hold only ``head.last_layer``, so the student's ``last_layer2`` never enters."""
    s_params = dict(student.named_parameters())
    pairs = [(t, s_params[n]) for n, t in teacher.named_parameters() if n in s_params]
    t_list, s_list = [t for t, _ in pairs], [s.detach() for _, s in pairs]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1 - momentum)


def param_groups(model: nn.Module) -> list[dict]:
    """Upstream ``utils.get_params_groups``: weight decay on every trainable tensor with ndim > 1 not named ``.bias``
    (so also A_log, dt_proj_bias, x_proj_weight, the mask token); none on biases and 1-D tensors (norms, D)."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """Upstream ``utils.clip_gradients``: each parameter's gradient scaled to norm <= ``clip`` on its own."""
    norms = []
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            norms.append(float(norm))
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    return norms


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Upstream ``utils.cancel_gradients_last_layer``: in the first ``freeze_last_layer`` epochs, drop the gradients of
    every parameter whose name contains ``last_layer``."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


# ---------------------------------------------------------------------------------------------------------------------
# upstream checkpoints


def _upstream_entry(state: dict, which: str) -> tuple[dict, dict]:
    """Split an upstream ``student``/``teacher`` entry into (backbone-module keys, head keys), prefixes removed."""
    prefix = "module." if which == "student" and any(k.startswith("module.") for k in state) else ""
    backbone, head = {}, {}
    for key, value in state.items():
        if key.startswith(prefix + "backbone."):
            backbone[key[len(prefix + "backbone."):]] = value
        elif key.startswith(prefix + "head."):
            head[key[len(prefix + "head."):]] = value
    return backbone, head


def upstream_head_kwargs(head_state: dict) -> dict:
    """iBOT head widths from an upstream head state dict."""
    return {
        "hidden_dim": head_state["mlp.0.weight"].shape[0],
        "bottleneck_dim": head_state["mlp.4.weight"].shape[0],
        "out_dim": head_state["last_layer.weight_v"].shape[0],
        "patch_out_dim": head_state["last_layer2.weight_v"].shape[0],
    }


def upstream_to_network_state(backbone: dict, head: dict) -> dict:
    """Upstream backbone-module + head keys -> this module's keys (renames through the conversion table)."""
    from conversion.convert_openus_to_hf import rename_keys

    core = {k: v for k, v in backbone.items() if not re.match(r"^(decoder2?\.|ema_)", k)}
    renamed, _ = rename_keys(core, keep_mask_token=True)
    state = {f"backbone.{k}": v for k, v in renamed.items()}
    state.update({k: v for k, v in backbone.items() if k.startswith("decoder.")})
    if "ema_loss_map" in backbone:
        state["recon_importance.ema_loss_map"] = backbone["ema_loss_map"]
        state["recon_importance.ema_initialized"] = torch.tensor(True)
    state.update({f"head.{k}": v for k, v in head.items()})
    return state


def networks_from_upstream(checkpoint: dict, **config_overrides) -> tuple[OpenUSPretrainNetwork, OpenUSPretrainNetwork, dict]:
    """Student and teacher built and loaded from an upstream pretraining checkpoint (``conversion.load_checkpoint``
    output). The architecture comes from the weights, never from ``args``. Returns (student, teacher, head_kwargs)."""
    from conversion.convert_openus_to_hf import infer_config_kwargs

    s_backbone, s_head = _upstream_entry(checkpoint["student"], "student")
    t_backbone, t_head = _upstream_entry(checkpoint["teacher"], "teacher")
    kwargs = infer_config_kwargs({k: v for k, v in t_backbone.items()})
    kwargs.update(config_overrides)
    config = OpenUSConfig(**kwargs, use_mask_token=True)
    head_kwargs = upstream_head_kwargs(s_head)
    student = OpenUSPretrainNetwork(config, head_kwargs, shared_head=False)
    teacher = OpenUSPretrainNetwork(config, head_kwargs, shared_head=True)
    for net, backbone, head in ((student, s_backbone, s_head), (teacher, t_backbone, t_head)):
        state = upstream_to_network_state(backbone, head)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("recon_importance.")]
        # OpenUSModel holds the last stage's out-norm only: upstream's outnorm0-2 never enter pretraining
        unexpected = [k for k in unexpected if not re.match(r"backbone\.stage_norms\.\d+\.", k)]
        if missing or unexpected:
            raise ValueError(f"upstream checkpoint does not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, head_kwargs
