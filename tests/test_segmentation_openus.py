"""OpenUSForSemanticSegmentation: upstream parity (converted with the CLI), loss, init, round trip, post-processing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSemanticSegmentation

from tests.conftest import parity_path
from conversion.convert_openus_to_hf import main as convert_main
from openus_hub import OpenUSConfig, OpenUSForSemanticSegmentation, OpenUSModel
from openus_hub.models.openus.modeling_openus import (
    OpenUSDecoderLayer,
    OpenUSMambaDecoder,
    OpenUSMixer,
    soft_dice_loss,
)
from openus_hub.models.openus.segmentation_utils import post_process_semantic_segmentation

ATOL_OUTPUTS = 1e-4  # features, decoder stages, logits: the parity bound the README states
ATOL_LOSS = 1e-5


def tiny_config(**overrides) -> OpenUSConfig:
    kwargs = dict(embed_dim=16, depths=[1, 1, 1, 1], decoder_depths=[1, 1, 1, 1], num_labels=2,
                  drop_path_rate=0.0, decoder_drop_path_rate=0.0)
    kwargs.update(overrides)
    return OpenUSConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ upstream parity


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """The parity fixtures converted with the CLI: seg_model.safetensors as backbone + head_checkpoint.pth as head."""
    folder = parity_path("openus_seg")
    out = tmp_path_factory.mktemp("openus_seg") / "hf"
    rc = convert_main(["--checkpoint", str(folder / "seg_model.safetensors"),
                       "--seg-head", str(folder / "head_checkpoint.pth"), "--output-dir", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def io_tensors():
    return load_file(str(parity_path("openus_seg", "io.safetensors")))


def test_converted_config(converted_dir):
    model = AutoModelForSemanticSegmentation.from_pretrained(converted_dir)
    assert isinstance(model, OpenUSForSemanticSegmentation)
    cfg = model.config
    assert (cfg.embed_dim, cfg.depths, cfg.d_state) == (32, [1, 1, 2, 1], 1)
    assert (cfg.num_labels, cfg.decoder_depths, cfg.decoder_d_state, cfg.decoder_ssm_ratio) == (2, [1, 1, 1, 1], 4, 2.0)
    assert (cfg.decoder_ca_compress, cfg.decoder_ca_squeeze, cfg.loss_ignore_index) == (3, 30, 255)
    assert sum(p.numel() for p in model.decoder.parameters()) == 411_689  # upstream head (README)
    assert len(model.decoder.state_dict()) == 85


def test_upstream_parity(converted_dir, io_tensors):
    model = AutoModelForSemanticSegmentation.from_pretrained(converted_dir).eval()
    caught: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            caught.setdefault(name, output.detach())  # returns None: the output is left alone

        return hook

    # upstream decoder.layers_up.0 = our patch expansion, layers_up.{j+1} = our decoder stage j (all channel-last)
    handles = [model.decoder.patch_expand.register_forward_hook(keep("decoder.layers_up.0"))]
    handles += [stage.register_forward_hook(keep(f"decoder.layers_up.{j + 1}"))
                for j, stage in enumerate(model.decoder.stages)]
    with torch.no_grad():
        out = model(io_tensors["pixel_values"], labels=io_tensors["labels"])
        features = model.openus(io_tensors["pixel_values"]).feature_maps  # the out-normed maps the decoder reads
    for h in handles:
        h.remove()
    with torch.no_grad():
        logits_real = model(io_tensors["pixel_values_real"]).logits

    diffs = {f"features.{i}": (h - io_tensors[f"features.{i}"]).abs().max().item() for i, h in enumerate(features)}
    for name in sorted(caught):
        assert caught[name].shape == io_tensors[name].shape, name
        diffs[name] = (caught[name] - io_tensors[name]).abs().max().item()
    diffs["logits"] = (out.logits - io_tensors["logits"]).abs().max().item()
    diffs["logits_real"] = (logits_real - io_tensors["logits_real"]).abs().max().item()
    assert len(diffs) == 10
    bad = {k: v for k, v in diffs.items() if not v <= ATOL_OUTPUTS}
    assert not bad, f"max |diff| above {ATOL_OUTPUTS}: {bad} (all: {diffs})"
    assert abs(out.loss.item() - io_tensors["loss"].item()) <= ATOL_LOSS, (out.loss.item(), io_tensors["loss"].item())


def test_convert_head_from_combined_state_dict(converted_dir, tmp_path):
    """`--seg-head` without a value reads the head's `decoder.*` keys beside `backbone.*` in --checkpoint."""
    seg_model = parity_path("openus_seg", "seg_model.safetensors")
    out = tmp_path / "combined"
    assert convert_main(["--checkpoint", str(seg_model), "--seg-head", "--output-dir", str(out)]) == 0
    a = load_file(str(converted_dir / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # float16-stored == float32 head values (README)


def test_convert_seg_head_errors(tmp_path, capsys):
    seg_model = parity_path("openus_seg", "seg_model.safetensors")
    not_a_head = tmp_path / "not_a_head.safetensors"
    save_file({"classifier.weight": torch.zeros(2, 3)}, str(not_a_head))
    rc = convert_main(["--checkpoint", str(seg_model), "--seg-head", str(not_a_head), "--output-dir",
                       str(tmp_path / "out")])
    assert rc == 2
    assert "no segmentation head found" in capsys.readouterr().err
    # a head whose widths do not fit the backbone
    head = {k[len("decoder."):]: v for k, v in load_file(str(seg_model)).items() if k.startswith("decoder.")}
    head["output.weight"] = torch.zeros(2, 48, 1, 1)
    wrong = tmp_path / "wrong_width.safetensors"
    save_file({f"decoder.{k}": v.contiguous() for k, v in head.items()}, str(wrong))
    rc = convert_main(["--checkpoint", str(seg_model), "--seg-head", str(wrong), "--output-dir", str(tmp_path / "o2")])
    assert rc == 2
    assert "does not match the backbone" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ model behaviour


def test_registered_and_shapes():
    config = tiny_config(num_labels=3)
    model = AutoModelForSemanticSegmentation.from_config(config).eval()
    assert isinstance(model, OpenUSForSemanticSegmentation)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        tup = model(x, labels=torch.zeros(2, 64, 96, dtype=torch.long), return_dict=False)
    assert out.logits.shape == (2, 3, 64, 96)
    # hidden_states: the stem output and the raw stage outputs (OpenUSModel's); the decoder reads the out-normed maps
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == [
        (16, 16, 24), (16, 16, 24), (32, 8, 12), (64, 4, 6), (128, 2, 3)]
    assert len(model.openus(x).feature_maps) == 4 and list(model.openus.stage_norms) == ["0", "1", "2", "3"]
    assert out.loss is None and tup[0].ndim == 0 and torch.equal(tup[1], out.logits)


def test_save_load_round_trip(tmp_path):
    model = OpenUSForSemanticSegmentation(tiny_config()).eval()
    x = torch.randn(1, 3, 64, 64)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is OpenUSForSemanticSegmentation
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_head_initialised_on_meta_load(tmp_path):
    """A backbone-only folder loads into the segmentation model; every head tensor is initialised (meta device)."""
    backbone = OpenUSModel(tiny_config())
    backbone.save_pretrained(tmp_path)
    model = OpenUSForSemanticSegmentation.from_pretrained(tmp_path, num_labels=3)
    assert model.decoder.classifier.weight.shape[0] == 3
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.openus.state_dict()[key], value), key
    for name, p in model.decoder.named_parameters():
        assert torch.isfinite(p).all(), name
    for module in model.decoder.modules():
        if isinstance(module, OpenUSDecoderLayer):
            assert torch.equal(module.scale1, torch.ones_like(module.scale1))
            assert torch.equal(module.scale2, torch.ones_like(module.scale2))
        if isinstance(module, OpenUSMixer):
            n = module.A_log.shape[1]
            assert torch.allclose(module.A_log, torch.log(torch.arange(1, n + 1.0)).expand_as(module.A_log))
            assert torch.equal(module.D, torch.ones_like(module.D))
            dt = F.softplus(module.dt_proj_bias)
            assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    # head linears keep PyTorch's default (kaiming-uniform) scale, not the backbone's trunc_normal(0.02)
    w = model.decoder.patch_expand.expand.weight
    assert w.abs().max() <= 1 / math.sqrt(w.shape[1]) + 1e-6 and w.std() > 0.5 / math.sqrt(3 * w.shape[1])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64)).logits).all()


def test_every_parameter_gets_a_gradient():
    model = OpenUSForSemanticSegmentation(tiny_config(use_dice_loss=True)).train()
    labels = torch.randint(0, 2, (2, 64, 64))
    labels[:, :8] = 255
    out = model(torch.randn(2, 3, 64, 64), labels=labels)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    zero_or_bad = [n for n, p in model.named_parameters()
                   if not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not zero_or_bad, zero_or_bad


def test_labels_255_are_ignored():
    torch.manual_seed(1)
    model = OpenUSForSemanticSegmentation(tiny_config()).eval()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 2, (2, 64, 64))
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[0, 10:40, 5:50] = True
    ignored[1, :, :20] = True
    with torch.no_grad():
        logits = model(x).logits
        noisy = labels.clone()
        noisy[ignored] = 255
        loss = model(x, labels=noisy.to(torch.uint8)).loss  # uint8 masks as stored by the fixtures
        other = labels.clone()
        other[ignored] = 1 - other[ignored]  # what the ignored pixels said does not matter
        other[ignored] = 255
    valid = ~ignored
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, labels))
    with torch.no_grad():
        assert torch.equal(model(x, labels=other).loss, loss)
    all_ignored = model(x, labels=torch.full((2, 64, 64), 255))
    assert all_ignored.loss.item() == 0.0
    all_ignored.loss.backward()  # finite (zero) gradients, no NaN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dice_term_and_binary_head():
    torch.manual_seed(2)
    logits = torch.randn(2, 2, 16, 16)
    labels = torch.randint(0, 2, (2, 16, 16))
    # perfect, confident prediction -> Dice loss ~ 0; ignored pixels left out
    perfect = F.one_hot(labels, 2).permute(0, 3, 1, 2).float() * 40 - 20
    labels_ign = labels.clone()
    labels_ign[:, :4] = 255
    assert soft_dice_loss(perfect, labels_ign).item() < 1e-6
    assert 0 < soft_dice_loss(logits, labels).item() < 1
    model = OpenUSForSemanticSegmentation(tiny_config(use_dice_loss=True, dice_loss_weight=0.5)).eval()
    x = torch.randn(1, 3, 64, 64)
    lab = torch.randint(0, 2, (1, 64, 64))
    with torch.no_grad():
        out = model(x, labels=lab)
        ce = F.cross_entropy(out.logits, lab)
        assert torch.allclose(out.loss, ce + 0.5 * soft_dice_loss(out.logits, lab), atol=1e-6)
    binary = OpenUSForSemanticSegmentation(tiny_config(num_labels=1)).eval()
    with torch.no_grad():
        out = binary(x, labels=lab)
    assert out.logits.shape == (1, 1, 64, 64)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits[:, 0], lab.float()), atol=1e-6)


def test_config_validation():
    # the decoder's width is the backbone's: derived, not a field; configs written before still load when consistent
    with pytest.raises(ValueError, match="decoder_embed_dim"):
        OpenUSConfig(embed_dim=32, decoder_embed_dim=64)
    assert OpenUSConfig(embed_dim=32, decoder_embed_dim=32).decoder_embed_dim == 32
    assert "decoder_embed_dim" not in OpenUSConfig().to_dict()
    with pytest.raises(StrictDataclassError, match="decoder_depths"):
        OpenUSConfig(decoder_depths=[4, 4, 4])
    with pytest.raises(StrictDataclassError, match="decoder_d_state"):
        OpenUSConfig(decoder_d_state=0)
    with pytest.raises(ValueError, match="labels must hold integer"):
        OpenUSForSemanticSegmentation(tiny_config()).compute_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 8, 8))
    cfg = OpenUSConfig()
    assert (cfg.decoder_embed_dim, cfg.decoder_depths, cfg.decoder_d_state, cfg.decoder_drop_path_rate) == (
        96, [4, 4, 4, 4], 4, 0.1)
    assert cfg.decoder_hidden_sizes == [96, 192, 384, 768] and not cfg.use_dice_loss


def test_full_size_head_matches_upstream_count():
    """The default (openus-small) head: 10,241,408 parameters and 292 tensors, as upstream's MambaDecoder
    (MambaDecoder.py:151-280 with embed_dim 96, depths [4, 4, 4, 4])."""
    head = OpenUSMambaDecoder(OpenUSConfig())  # the head alone: no need to build the 49M-parameter backbone
    assert sum(p.numel() for p in head.parameters()) == 10_241_408
    assert len(head.state_dict()) == 292
    with torch.device("meta"):  # the whole model also builds on the meta device (drop-path rates computed on CPU)
        model = OpenUSForSemanticSegmentation(OpenUSConfig())
    assert sum(p.numel() for p in model.decoder.parameters()) == 10_241_408


# ------------------------------------------------------------------------------------------------ post-processing


def test_post_process_semantic_segmentation():
    logits = torch.randn(2, 3, 16, 16)
    maps = post_process_semantic_segmentation(logits)
    assert len(maps) == 2 and all(torch.equal(m, logits[i].argmax(0)) for i, m in enumerate(maps))
    model_out = type("Out", (), {"logits": logits})()
    sized = post_process_semantic_segmentation(model_out, target_sizes=[(32, 20), (8, 8)])
    assert [tuple(m.shape) for m in sized] == [(32, 20), (8, 8)] and sized[0].dtype == torch.long
    expected = F.interpolate(logits[:1], size=(32, 20), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(sized[0], expected)
    # transformers 5's API: with the per-class scores, resized like the maps
    scored = post_process_semantic_segmentation(model_out, target_sizes=[(32, 20), (8, 8)],
                                                return_segmentation_scores=True)
    assert torch.equal(scored[0].segmentation, sized[0]) and torch.equal(scored[1]["segmentation"], sized[1])
    assert scored[0].segmentation_scores.shape == (3, 32, 20) and scored[1].segmentation_scores.shape == (3, 8, 8)
    assert torch.equal(post_process_semantic_segmentation(logits, torch.tensor([[16, 16], [16, 16]]))[1], maps[1])
    binary = post_process_semantic_segmentation(torch.tensor([[[[-1.0, 2.0]]]]))
    assert binary[0].tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="target_sizes"):
        post_process_semantic_segmentation(logits, target_sizes=[(8, 8)])
