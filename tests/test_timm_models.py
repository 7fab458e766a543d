"""OpenUS as timm models: registry names, pretrained_cfg, timm's own pretrained loading from a transformers folder,
features_only maps equal to OpenUSBackbone's, and a classification head.

The tiny architecture is passed through ``timm.create_model`` as keywords (``embed_dim=8, depths=[1, 1, 2, 2]``)
over the ``openus_tiny`` entry, so no test-only name is registered."""

import pytest

try:
    timm = pytest.importorskip("timm", reason="timm not installed (pip install openus_hub[timm])")
except Exception as err:  # noqa: BLE001  (installed beside a torchvision that does not match torch)
    pytest.skip(f"timm is installed but does not import: {type(err).__name__}: {err}", allow_module_level=True)

import torch

import openus_hub
from openus_hub import OpenUSBackbone, OpenUSConfig, OpenUSForImageClassification, OpenUSModel
from openus_hub.pretrained import PretrainedEntry, UnpublishedModelError, get_pretrained, register_pretrained
from openus_hub.timm_models import OpenUS, _cfg, checkpoint_filter_fn

TINY = {"embed_dim": 8, "depths": [1, 1, 2, 2]}
ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A transformers folder as the converter writes it (keys without the ``openus.`` prefix, the out-norms of all
    four stages), with random weights."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("openus-tiny-hf")
    # the openus_tiny preset (ssm_ratio 1.0) with the keywords _create passes to timm
    config = OpenUSConfig.from_preset("openus-tiny", drop_path_rate=0.0, out_features=ALL_STAGES, **TINY)
    model = OpenUSBackbone(config).eval()
    with torch.no_grad():  # distinguishable norms
        for norm in model.stage_norms.values():
            norm.weight.add_(torch.rand_like(norm.weight))
    model.save_pretrained(folder)
    return folder


def _create(hf_folder, **kwargs):
    return timm.create_model(
        "openus_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(hf_folder / "model.safetensors")},
        **TINY, **kwargs,
    ).eval()


def test_list_models_and_entry_points():
    assert timm.list_models("openus*") == ["openus_base", "openus_small", "openus_tiny"]
    assert timm.is_model("openus_small")
    assert openus_hub.timm_models.register()  # a second call is a no-op


@pytest.mark.parametrize("timm_name,name", [("openus_tiny", "openus-tiny"), ("openus_small", "openus-small"),
                                            ("openus_base", "openus-base")])
def test_pretrained_cfg_follows_the_registry_entry(timm_name, name):
    entry = get_pretrained(name)
    cfg = timm.models.get_pretrained_cfg(timm_name).to_dict()
    # nothing is published: timm must not list the models as having weights
    assert not entry.published and cfg.get("hf_hub_id") is None and cfg.get("url") is None
    assert timm.list_pretrained("openus*") == [] and timm_name not in timm.list_models(pretrained=True)
    assert cfg["input_size"] == (3, 224, 224) == entry.input_size
    assert cfg["mean"] == (0.485, 0.456, 0.406) == entry.mean and cfg["std"] == (0.229, 0.224, 0.225) == entry.std
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert cfg["license"] == entry.license == "cc-by-nc-4.0"
    assert cfg["num_classes"] == 0 and cfg["classifier"] == "head"
    # timm's data config comes from it
    data = timm.data.resolve_data_config({}, model=timm.create_model(timm_name, **TINY))
    assert data["input_size"] == (3, 224, 224) and data["interpolation"] == "bilinear"


def test_published_entry_gets_its_hub_id():
    """Once the registry lists weights as published, the cfg names them (timm then lists the model as pretrained)."""
    entry = get_pretrained("openus-small")
    published = PretrainedEntry(**{**entry.to_dict(), "repo_id": "lab/openus-small", "revision": "a" * 40,
                                   "sha256": "0" * 64, "status": "published"})
    old = register_pretrained(published, overwrite=True)
    try:
        assert _cfg("openus_small")["hf_hub_id"] == "lab/openus-small@" + "a" * 40
    finally:
        register_pretrained(old, overwrite=True)
    assert "hf_hub_id" not in _cfg("openus_small")


def test_unknown_arguments_device_and_dtype():
    """As every timm model: an unknown keyword is a TypeError (not swallowed into the config); device and dtype
    place the weights."""
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model("openus_tiny", not_a_model_arg=1, **TINY)
    with pytest.raises(TypeError, match="num_channels"):
        timm.create_model("openus_tiny", num_channels=1, **TINY)  # timm's name for it is in_chans
    meta = timm.create_model("openus_small", device="meta", dtype=torch.bfloat16, num_classes=4)
    tensors = [*meta.parameters(), *meta.buffers()]
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in tensors)
    assert not hasattr(meta.openus.config, "device") and meta.openus.config.dtype is None
    assert meta.get_classifier().weight.device.type == "meta"


def test_features_only_equals_openus_backbone(hf_folder):
    """timm's features_only model gives the same four stage maps as OpenUSBackbone for the same weights, with the
    weights read by timm's own pretrained loading from the transformers folder's model.safetensors."""
    backbone = OpenUSBackbone.from_pretrained(hf_folder).eval()
    assert backbone.out_features == ALL_STAGES
    features = _create(hf_folder, features_only=True)
    assert features.feature_info.channels() == [8, 16, 32, 64] == backbone.channels
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = backbone(x).feature_maps
        maps = features(x)
    assert len(maps) == 4
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    # out_indices prunes later stages; maps unchanged
    pruned = _create(hf_folder, features_only=True, out_indices=(0, 2))
    assert len(pruned.model.openus.encoder.stages) == 3
    with torch.no_grad():
        two = pruned(x)
    torch.testing.assert_close(two[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(two[1], expected[2], rtol=0, atol=0)


def test_pooled_features_and_forward_intermediates(hf_folder):
    hf = OpenUSModel.from_pretrained(hf_folder).eval()
    maps = OpenUSBackbone.from_pretrained(hf_folder).eval()
    model = _create(hf_folder)
    # a classifier keeps the last stage's out-norm only: every parameter is trained
    assert model.num_classes == 0 and model.num_features == 64 and list(model.openus.stage_norms) == ["3"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        normed = maps(x).feature_maps
        pooled = model(x)
        final, inter = model.forward_intermediates(x, indices=[1, -1])
        nhwc = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        last_normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(final, normed[3], rtol=0, atol=0)  # forward_features: the last map, out-normed
    torch.testing.assert_close(last_normed[0], normed[3], rtol=0, atol=0)
    # intermediates without norm are the raw stage outputs (OpenUSModel's hidden_states after the stem output)
    torch.testing.assert_close(inter[0], out.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(inter[1], out.hidden_states[4], rtol=0, atol=0)
    torch.testing.assert_close(nhwc[0], out.hidden_states[3].permute(0, 2, 3, 1), rtol=0, atol=0)


def test_classification_head(hf_folder):
    model = _create(hf_folder, num_classes=3)  # backbone from the folder, new head
    assert isinstance(model.get_classifier(), torch.nn.Linear)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_checkpoint_filter_accepts_every_transformers_layout(tmp_path):
    config = OpenUSConfig(drop_path_rate=0.0, num_labels=3, use_mask_token=True, **TINY)
    clf = OpenUSForImageClassification(config).eval()
    model = OpenUS(num_classes=3, **TINY)
    sd = checkpoint_filter_fn(clf.state_dict(), model)  # openus.* + classifier.*, mask token dropped
    model.load_state_dict(sd, strict=True)
    # a folder with every stage's out-norm (converter, OpenUSBackbone, segmentation): the unused ones are dropped
    full = OpenUSBackbone(OpenUSConfig(drop_path_rate=0.0, out_features=ALL_STAGES, **TINY))
    assert set(checkpoint_filter_fn(full.state_dict(), model)) == set(model.state_dict()) - {"head.weight", "head.bias"}
    features = OpenUS(all_stage_norms=True, **TINY)
    features.load_state_dict(checkpoint_filter_fn(full.state_dict(), features), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), clf(x).logits, rtol=0, atol=0)
    # a bare OpenUSModel state dict, and timm's own, load strictly too
    model.load_state_dict(checkpoint_filter_fn(clf.openus.state_dict(), model) | {
        "head.weight": model.head.weight, "head.bias": model.head.bias}, strict=True)
    model.load_state_dict(checkpoint_filter_fn(model.state_dict(), model), strict=True)
    # an architecture mismatch is not hidden by the filter
    with pytest.raises(RuntimeError):
        OpenUS(embed_dim=8, depths=[1, 1, 1, 2]).load_state_dict(checkpoint_filter_fn(clf.state_dict(), model))


def test_unpublished_weights_raise_instead_of_random_init():
    with pytest.raises(UnpublishedModelError, match="pretrained_cfg_overlay"):
        timm.create_model("openus_small", pretrained=True)
