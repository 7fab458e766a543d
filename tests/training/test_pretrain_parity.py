"""Training modules loaded from upstream checkpoint.pth against upstream outputs (../shared/parity/openus)."""

import pytest
import torch
from safetensors.torch import load_file

from conversion.convert_openus_to_hf import load_checkpoint
from tests.conftest import parity_path
from training.ssl_meta_arch import build_teacher, networks_from_upstream

CONFIGS = ["cfg_a", "cfg_b", "cfg_c"]
TOL = dict(atol=1e-4, rtol=1e-4)


def _load(cfg):
    ckpt = load_checkpoint(str(parity_path("openus", cfg, "checkpoint.pth")))
    io = load_file(str(parity_path("openus", cfg, "io.safetensors")))
    student, teacher, head_kwargs = networks_from_upstream(ckpt)
    return ckpt, io, student.eval(), teacher.eval(), head_kwargs


def _close(actual, expected, what):
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, **TOL), f"{what}: max abs diff {diff:.3e}"
    return diff


@pytest.mark.parametrize("cfg", CONFIGS)
def test_student_masked_forward_and_ema_loss_map(cfg):
    ckpt, io, student, _, _ = _load(cfg)
    # the checkpoint's map is the one the first call below produces
    _close(student.recon_importance.ema_loss_map, io["student_ema_loss_map"], "checkpoint ema_loss_map")
    student.recon_importance.reset()  # a freshly built student: first-call semantics
    x = io["pixel_values_224"]
    with torch.no_grad():
        tokens, rec, imp = student.reconstruct(x, io["mask_224"])
    assert not bool(student.recon_importance.ema_initialized.logical_not())
    _close(tokens, io["student_tokens_masked"], "student_tokens_masked")
    _close(rec, io["recon_loss"], "recon_loss")
    _close(imp, io["recon_importance"], "recon_importance (first call)")
    _close(student.recon_importance.ema_loss_map, io["student_ema_loss_map"], "ema_loss_map (first call)")
    # second call: upstream's training branch of update_ema_loss_map, DropPath off
    student.recon_importance.train()
    with torch.no_grad():
        _, rec2, imp2 = student.reconstruct(x, io["mask_224_call2"])
    _close(rec2, io["recon_loss_call2"], "recon_loss_call2")
    _close(imp2, io["recon_importance_call2"], "recon_importance_call2")
    _close(student.recon_importance.ema_loss_map, io["student_ema_loss_map_call2"], "ema_loss_map_call2")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_head_outputs(cfg):
    _, io, student, teacher, _ = _load(cfg)
    assert teacher.head.shared and not student.head.shared
    with torch.no_grad():
        t_cls, t_patch = teacher.head(io["tokens_224"])
        s_cls, s_patch = student.head(io["student_tokens_masked"])
    _close(t_cls, io["teacher_head_cls_224"], "teacher_head_cls_224")
    _close(t_patch, io["teacher_head_patch_224"], "teacher_head_patch_224")
    _close(s_cls, io["student_head_cls_masked"], "student_head_cls_masked")
    _close(s_patch, io["student_head_patch_masked"], "student_head_patch_masked")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_teacher_attention_and_tokens(cfg):
    _, io, _, teacher, _ = _load(cfg)
    for key in ("224", "real"):
        cls, patch, attn = teacher.teacher_forward(io[f"pixel_values_{key}"])
        _close(attn, io[f"attn_{key}"], f"attn_{key}")
        assert attn.min().item() == 0.0 and attn.max().item() == pytest.approx(1.0)
    tokens, _, _ = teacher.encode(io["pixel_values_224"])
    _close(tokens, io["tokens_224"], "tokens_224")


def test_teacher_init_takes_student_last_layer2():
    """Upstream's teacher.load_state_dict(student.state_dict(), strict=False) leaves the student's last_layer2 in
    the teacher's shared layer."""
    ckpt, _, student, _, head_kwargs = _load("cfg_a")
    teacher = build_teacher(student, head_kwargs)
    assert torch.equal(teacher.head.last_layer.weight_v, student.head.last_layer2.weight_v)
    assert not torch.equal(teacher.head.last_layer.weight_v, student.head.last_layer.weight_v)
    assert not any(p.requires_grad for p in teacher.parameters())
