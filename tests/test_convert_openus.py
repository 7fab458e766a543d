"""Upstream OpenUS checkpoint conversion, measured against the upstream outputs in ../shared/parity."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from conversion import convert_openus_to_hf as conv
from openus_hub import AutoBackbone, OpenUSBackbone, OpenUSConfig, OpenUSModel
from tests.conftest import REPO_ROOT, parity_path

CONFIGS = ["cfg_a", "cfg_b", "cfg_c"]
TOL = 1e-4


def _convert(tmp_path, *args) -> tuple[int, str]:
    out = tmp_path / "out"
    code = conv.main([*args, "--output-dir", str(out)])
    return code, str(out)


def _assert_outputs_match(folder, io, suffix):
    """Upstream's four out-normed stage maps through AutoBackbone, its tokens through AutoModel, from one folder."""
    x = io[f"pixel_values_{suffix}"]
    with torch.no_grad():
        maps = AutoBackbone.from_pretrained(folder).eval()(x).feature_maps
        tokens = AutoModel.from_pretrained(folder).eval()(x).last_hidden_state
    for i in range(4):
        err = (maps[i] - io[f"out{i}_{suffix}"]).abs().max().item()
        assert err <= TOL, f"out{i}_{suffix}: max abs diff {err:.2e}"
    err = (tokens - io[f"tokens_{suffix}"]).abs().max().item()
    assert err <= TOL, f"tokens_{suffix}: max abs diff {err:.2e}"


def test_cli_converts_and_automodel_reproduces_upstream_cfg_a(tmp_path):
    """The documented command, run as a script, then plain AutoModel.from_pretrained."""
    folder = parity_path("openus", "cfg_a")
    out = tmp_path / "converted"
    cmd = [sys.executable, str(REPO_ROOT / "conversion" / "convert_openus_to_hf.py"),
           "--checkpoint", str(folder / "checkpoint.pth"), "--output-dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dropped 10 tensor(s): non-backbone group 'head.*'" in res.stderr
    io = load_file(folder / "io.safetensors")
    for suffix in ("224", "96", "real"):
        _assert_outputs_match(out, io, suffix)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_converted_teacher_matches_upstream(cfg, tmp_path):
    folder = parity_path("openus", cfg)
    code, out = _convert(tmp_path, "--checkpoint", str(folder / "checkpoint.pth"))
    assert code == 0
    model = AutoBackbone.from_pretrained(out).eval()  # all four out-norms, as upstream's standalone backbone
    config = json.loads((folder / "config.json").read_text())
    kwargs = config["constructor_kwargs"]
    assert model.config.depths == kwargs["depths"] and model.config.embed_dim == kwargs["dims"]
    assert model.config.d_state == kwargs["ssm_d_state"] and model.config.ssm_ratio == kwargs["ssm_ratio"]
    assert sum(p.numel() for p in model.parameters()) == config["param_counts"]["standalone_backbone"]
    io = load_file(folder / "io.safetensors")
    for suffix in ("224", "96", "real"):
        _assert_outputs_match(out, io, suffix)


def test_plain_state_dict_and_student_source(tmp_path):
    folder = parity_path("openus", "cfg_b")
    ref = load_file(folder / "teacher_backbone.safetensors")
    code, out = _convert(tmp_path, "--checkpoint", str(folder / "teacher_backbone.safetensors"))
    assert code == 0
    from_plain = AutoBackbone.from_pretrained(out).eval()
    io = load_file(folder / "io.safetensors")
    _assert_outputs_match(out, io, "224")
    renamed, _ = conv.rename_keys(ref)
    for key, value in renamed.items():
        assert torch.equal(from_plain.state_dict()[key], value), key

    student_model, report = conv.convert(str(folder / "checkpoint.pth"), source="student")
    ckpt = conv.load_checkpoint(str(folder / "checkpoint.pth"))
    student = {k[len("module.backbone."):]: v for k, v in ckpt["student"].items() if k.startswith("module.backbone.")}
    renamed, dropped = conv.rename_keys(student)
    assert "reconstruction-loss EMA map (ema_loss_map)" in dropped
    for key, value in renamed.items():
        assert torch.equal(student_model.state_dict()[key], value), key
    assert not torch.equal(student_model.stage_norms["0"].weight, from_plain.stage_norms["0"].weight)


def test_keep_mask_token(tmp_path):
    folder = parity_path("openus", "cfg_a")
    model, _ = conv.convert(str(folder / "checkpoint.pth"), keep_mask_token=True)
    ckpt = conv.load_checkpoint(str(folder / "checkpoint.pth"))
    assert model.config.use_mask_token
    assert torch.equal(model.embeddings.mask_token, ckpt["teacher"]["backbone.masked_embed"])


def test_segmentation_backbone_matches_upstream(tmp_path):
    """Backbone of the segmentation fixture (float16 storage, amplified SSM parameters) reproduces features.0..3."""
    folder = parity_path("openus_seg")
    code, out = _convert(tmp_path, "--checkpoint", str(folder / "seg_model.safetensors"))
    assert code == 0
    model = AutoBackbone.from_pretrained(out).eval()
    io = load_file(folder / "io.safetensors")
    with torch.no_grad():
        maps = model(io["pixel_values"]).feature_maps
    for i in range(4):
        err = (maps[i] - io[f"features.{i}"]).abs().max().item()
        assert err <= TOL, f"features.{i}: max abs diff {err:.2e}"


@pytest.mark.parametrize("arch,preset", [("vmamba_small", "openus-small"), ("vmamba_base", "openus-base")])
def test_full_size_manifests_are_fully_accounted_for(arch, preset):
    """Every key of a real full-size checkpoint is kept or dropped by name; the architecture is inferred exactly."""
    manifest = json.loads(parity_path("openus", "full_manifests", f"{arch}.json").read_text())
    teacher = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
               for k, shape, dtype in manifest["teacher"]}
    backbone, dropped = conv.extract_backbone({"teacher": teacher, "student": {}}, "teacher")
    kwargs = conv.infer_config_kwargs(backbone)
    renamed, dropped_backbone = conv.rename_keys(backbone)
    config = OpenUSConfig(**kwargs, drop_path_rate=conv._drop_path_for(kwargs), out_indices=[1, 2, 3, 4])
    expected = OpenUSConfig.from_preset(preset)
    for field in ("depths", "embed_dim", "d_state", "ssm_ratio", "dt_ranks", "d_conv", "mlp_ratio", "drop_path_rate"):
        assert getattr(config, field) == getattr(expected, field), field
    with torch.device("meta"):
        model = OpenUSBackbone(config)  # what the converter builds: all four out-norms
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in renamed.items()}
    standalone = sum(v.numel() for v in renamed.values())
    assert standalone == manifest["param_counts"]["standalone_backbone"]
    assert len(renamed) == len(manifest["standalone_backbone"])
    assert sum(len(v) for v in dropped.values()) + sum(len(v) for v in dropped_backbone.values()) + len(renamed) \
        == len(teacher) + 1  # + the (empty) 'student' entry


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: _write(p / "empty.pth", b""), "is empty"),
        (lambda p: _write(p / "notes.pth", b"this is a text file\n"), "could not be read"),
        (lambda p: _write(p / "half.pth", parity_path("openus", "cfg_a", "checkpoint.pth").read_bytes()[:500_000]),
         "could not be read"),
        (lambda p: _write(p / "bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"), "not a readable"),
        (lambda p: (save_file({"encoder.weight": torch.zeros(2)}, str(p / "other.safetensors")),
                    str(p / "other.safetensors"))[1], "no OpenUS/VMamba backbone"),
        (lambda p: str(p / "missing.pth"), "not found"),
    ],
    ids=["empty", "text", "truncated", "corrupt-safetensors", "not-openus", "missing"],
)
def test_bad_checkpoints_get_a_one_line_error(tmp_path, capsys, make, match):
    path = make(tmp_path)
    code, out = _convert(tmp_path, "--checkpoint", path)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and match in err and "\n" not in err, err
    assert not os.path.exists(out)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path, capsys):
    """weights_only loading with an allowlist: a pickle that would run code is rejected, not executed."""
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"teacher": _Evil()}, f)
    code, _ = _convert(tmp_path, "--checkpoint", str(path))
    assert code == 2
    assert "weights_only=True" in capsys.readouterr().err


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    folder = parity_path("openus", "cfg_b")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = conv.main(["--checkpoint", str(folder / "checkpoint.pth"), "--output-dir", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["precious.txt"]
    code = conv.main(["--checkpoint", str(folder / "checkpoint.pth"), "--output-dir", str(out), "--overwrite"])
    assert code == 0
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out)) and not (out / "precious.txt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".openus-")]  # no temporary folders left behind


@pytest.mark.parametrize("cfg", CONFIGS)
def test_attention_map_matches_upstream(cfg):
    """output_attentions: the last block's implicit attention (upstream dino_vmamba.py:1767-1777 with
    analyze/utils.py:363-447); upstream min-max normalises it over the batch.

    cfg_c has d_state 4, where upstream's clamp(w, 1e-20) is active: we reproduce the clamp, not the exact value.
    """
    from openus_hub.ops import minmax_normalize

    folder = parity_path("openus", cfg)
    converted, _ = conv.convert(str(folder / "checkpoint.pth"))
    model = OpenUSModel(converted.config)  # the converted tensors; OpenUSModel keeps the last stage's norm only
    assert not model.load_state_dict(converted.state_dict(), strict=False).missing_keys
    model.eval()
    io = load_file(folder / "io.safetensors")
    for suffix in ("224", "real"):
        with torch.no_grad():
            out = model(io[f"pixel_values_{suffix}"], output_attentions=True)
        (attention,) = out.attentions
        assert attention.shape == io[f"attn_{suffix}"].shape
        err = (minmax_normalize(attention) - io[f"attn_{suffix}"]).abs().max().item()
        assert err <= 1e-5, f"attn_{suffix}: max abs diff {err:.2e}"
        torch.testing.assert_close(out.last_hidden_state, model(io[f"pixel_values_{suffix}"]).last_hidden_state)
