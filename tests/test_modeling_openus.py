"""OpenUS backbone as a transformers model: output contract, Auto classes, save/load, init, gradients, dtypes."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

import openus_hub
from openus_hub import OpenUSBackbone, OpenUSConfig, OpenUSForImageClassification, OpenUSModel


def tiny_config(**kwargs) -> OpenUSConfig:
    kwargs = {"embed_dim": 8, "depths": [1, 1, 2, 2], "drop_path_rate": 0.0, **kwargs}
    return OpenUSConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_model():
    return OpenUSModel(tiny_config()).eval()


def test_output_contract(tiny_model):
    x = torch.randn(2, 3, 64, 96)
    out = tiny_model(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 1 + 2 * 3, 64)
    assert out.pooler_output.shape == (2, 64)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 8, 16, 24), (2, 16, 8, 12), (2, 32, 4, 6), (2, 64, 2, 3)]
    last = out.hidden_states[-1]
    # tokens are the last stage map, row-major; the first token is their mean
    torch.testing.assert_close(out.last_hidden_state[:, 1:], last.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state[:, 0], last.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0], rtol=0, atol=0)
    # stage maps are out-normed: per-position LayerNorm with weight 1 / bias 0 at init -> zero mean over channels
    assert last.mean(dim=1).abs().max() < 1e-5
    plain = tiny_model(x, return_dict=False)
    assert isinstance(plain, tuple) and torch.equal(plain[0], out.last_hidden_state)
    assert tiny_model(x).hidden_states is None


def test_bad_inputs_get_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="multiples of 32.*e.g. to 64x64"):
        tiny_model(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match="replicate grayscale"):
        tiny_model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="use_mask_token=True"):
        tiny_model(torch.randn(1, 3, 64, 64), bool_masked_pos=torch.zeros(1, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"depths": []}, "depths"),
        ({"embed_dim": 7}, "embed_dim"),
        ({"d_state": 0}, "d_state"),
        ({"dt_ranks": [1, 2]}, "dt_ranks"),
        ({"d_conv": 4}, "d_conv"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"scan_implementation": "triton"}, "scan_implementation"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_presets_and_parameter_counts():
    """Parameter counts of the full-size models match upstream's (spec §1.9), built on the meta device."""
    assert OpenUSConfig().to_diff_dict() == OpenUSConfig.from_preset("openus-small").to_diff_dict()
    expected = {"openus-small": 49_380_096, "openus-base": 87_534_592}
    for name in ("openus-tiny", "openus-small", "openus-base"):
        config = OpenUSConfig.from_preset(name)
        with torch.device("meta"):
            model = OpenUSModel(config)
        count = sum(p.numel() for p in model.parameters())
        if name in expected:
            assert count == expected[name], name
        assert config.dt_ranks == [math.ceil(c / 16) for c in config.hidden_sizes]
    assert OpenUSConfig.from_preset("openus-tiny").depths == [2, 2, 8, 2]
    assert OpenUSConfig.from_preset("openus-base", drop_path_rate=0.1).drop_path_rate == 0.1
    with pytest.raises(ValueError, match="openus-small"):
        OpenUSConfig.from_preset("openus-huge")


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("openus", embed_dim=8, depths=[1, 1, 1, 2])
    assert isinstance(config, OpenUSConfig)
    assert isinstance(AutoModel.from_config(config), OpenUSModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), OpenUSForImageClassification)
    backbone = AutoBackbone.from_config(config)
    assert isinstance(backbone, OpenUSBackbone)
    assert backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert backbone.channels == [8, 16, 32, 64]


def test_backbone_feature_maps_match_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    backbone = OpenUSBackbone.from_pretrained(tmp_path, out_features=["stage2", "stage4"]).eval()
    x = torch.randn(1, 3, 64, 64)
    maps = backbone(x).feature_maps
    hidden = tiny_model(x, output_hidden_states=True).hidden_states
    assert len(maps) == 2
    torch.testing.assert_close(maps[0], hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(maps[1], hidden[3], rtol=0, atol=0)


def test_upernet_decoder_uses_the_backbone():
    """A stock transformers UperNet head builds on OpenUS through AutoBackbone (as users of dense tasks do)."""
    config = UperNetConfig(
        backbone_config=tiny_config(), hidden_size=16, auxiliary_in_channels=32, num_labels=3, use_auxiliary_head=False
    )
    model = UperNetForSemanticSegmentation(config).eval()
    logits = model(torch.randn(1, 3, 64, 64)).logits
    assert logits.shape == (1, 3, 64, 64) and torch.isfinite(logits).all()


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = OpenUSModel(tiny_config(use_mask_token=True, d_state=2)).eval()
    with torch.no_grad():  # make every parameter distinguishable from any init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    ref, new = model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys()
    for key in ref:
        assert torch.equal(ref[key], new[key]), key
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 2, 2) > 0.5
    assert torch.equal(model(x, bool_masked_pos=mask).last_hidden_state, loaded(x, bool_masked_pos=mask).last_hidden_state)
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()


def test_initialisation_follows_upstream():
    config = tiny_config(d_state=3, use_mask_token=True)
    model = OpenUSModel(config)
    mixer = model.encoder.stages[2].layers[0].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 4.0)).repeat(mixer.A_log.shape[0], 1))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    dt = F.softplus(mixer.dt_proj_bias)
    assert dt.min() >= config.dt_init_floor * 0.999 and dt.max() <= config.dt_max * 1.001
    rank = mixer.dt_proj_weight.shape[-1]
    assert mixer.dt_proj_weight.abs().max() <= rank**-0.5
    assert mixer.x_proj_weight.abs().max() <= mixer.x_proj_weight.shape[-1] ** -0.5
    big = OpenUSModel(OpenUSConfig(embed_dim=64, depths=[1, 1, 1, 1]))
    w = big.encoder.stages[3].layers[0].mlp.fc1.weight
    # timm/upstream trunc_normal_(std=.02) truncates at +-2 absolute, i.e. effectively a plain normal(0, .02)
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(big.encoder.stages[3].layers[0].mlp.fc1.bias, torch.zeros_like(big.encoder.stages[3].layers[0].mlp.fc1.bias))
    assert torch.equal(model.stage_norms[0].weight, torch.ones(8)) and torch.equal(model.embeddings.mask_token, torch.zeros(1, 8))


def test_meta_device_loading_initialises_new_weights(tmp_path):
    """Loading a backbone folder into the classification head: backbone bit-identical, new head properly initialised."""
    base = OpenUSModel(tiny_config())
    base.save_pretrained(tmp_path)
    clf = OpenUSForImageClassification.from_pretrained(tmp_path, num_labels=3)
    for key, value in base.state_dict().items():
        assert torch.equal(clf.openus.state_dict()[key], value), key
    w = clf.classifier.weight
    assert torch.isfinite(w).all() and 0 < w.std() < 0.05 and torch.equal(clf.classifier.bias, torch.zeros(3))


def test_classification_loss_and_every_parameter_gets_a_gradient():
    model = OpenUSForImageClassification(tiny_config(num_labels=3, drop_path_rate=0.2, use_mask_token=True))
    model.train()
    labels = torch.tensor([0, 2])
    out = model(torch.randn(2, 3, 64, 64), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    # the classifier reads only the last stage; the other stage norms serve hidden_states / the backbone
    unused = ("mask_token", "stage_norms.0.", "stage_norms.1.", "stage_norms.2.")
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and not any(u in n for u in unused)]
    assert not no_grad, no_grad
    # with every output used (and a masked input), every parameter of the backbone gets a gradient
    model.zero_grad()
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[:, 0, 0] = True
    out = model.openus(torch.randn(2, 3, 64, 64), bool_masked_pos=mask, output_hidden_states=True)
    (out.pooler_output.sum() + sum(h.square().mean() for h in out.hidden_states)).backward()
    no_grad = [n for n, p in model.openus.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_gradient_checkpointing_leaves_outputs_and_gradients_unchanged():
    model = OpenUSModel(tiny_config()).train()
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad()
        out = model(x, output_hidden_states=True)
        (out.last_hidden_state.square().mean() + sum(h.mean() for h in out.hidden_states)).backward()
        return out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_a, grads_a = run()
    model.gradient_checkpointing_enable()
    assert model.encoder.stages[0].gradient_checkpointing
    out_b, grads_b = run()
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bfloat16_loading(tmp_path):
    model = OpenUSModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    bf16 = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    x = torch.randn(1, 3, 64, 64)
    out = bf16(x).last_hidden_state
    assert out.dtype == torch.bfloat16
    ref = model(x).last_hidden_state
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.slow
def test_torch_compile(tiny_model):
    compiled = torch.compile(tiny_model)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(compiled(x).last_hidden_state, tiny_model(x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_remote_code_loads_without_openus_hub(tmp_path):
    """A saved folder carries its code: plain transformers + trust_remote_code, with openus_hub made unimportable."""
    model = OpenUSModel(tiny_config()).eval()
    model.save_pretrained(tmp_path / "model")
    x = torch.randn(1, 3, 64, 64)
    torch.save({"x": x, "y": model(x).last_hidden_state}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "openus_hub" or name.startswith("openus_hub."):
                    raise ImportError("openus_hub is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModel
        try:
            import openus_hub  # noqa: F401
            raise SystemExit("openus_hub should not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert "openus_hub" not in type(model).__module__, type(model).__module__
        io = torch.load({str(tmp_path / 'io.pt')!r})
        print("MAXDIFF", (model(io["x"]).last_hidden_state - io["y"]).abs().max().item())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("MAXDIFF")[1]) == 0.0


def test_package_import_is_quiet():
    out = subprocess.run([sys.executable, "-c", "import openus_hub"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    assert openus_hub.__version__
