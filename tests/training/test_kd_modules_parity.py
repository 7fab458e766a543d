"""TransKD KD modules and losses against the upstream fixtures (../shared/parity/transkd/modules).

The fixtures were produced by upstream's code in `train()` mode under no_grad; every stored output, the SK branch
weights, the BatchNorm running statistics after the forward, the batch-1 (`fc1`) path and every loss value are
compared. Measured: max |diff| 0.0 for all of them with the fixtures' (AVX-512) kernel dispatch; with AVX2 or scalar
dispatch (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS) float32 rounding moves the module outputs
by up to 6.7e-6 (1.5e-6 of their largest value, 4.5). Bound: 1e-5 x max(1, max |reference|), a 6x margin; a wrongly
loaded or wired tensor moves outputs by > 1e-3. Losses: 1e-5 relative.
"""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import parity_path
from training.kd import TransKDModules, convert_upstream_kd_state_dict
from training.losses import TransKDLoss, WeightedCrossEntropyLoss

ATOL = 1e-5  # per unit of the reference's largest |value| (at least 1): see the module docstring
STUDENT, TEACHER = [32, 64, 160, 256], [64, 128, 320, 512]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = parity_path("transkd", "modules")
    spec = importlib.util.spec_from_file_location("transkd_materialize", root.parent / "materialize.py")
    materialize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(materialize)
    out = tmp_path_factory.mktemp("transkd_modules")
    weights = {v: materialize.build(str(root / f"{v}.safetensors.recipe.json")) for v in ("base", "gl", "ea")}
    inputs = materialize.build(str(root / "inputs.safetensors.recipe.json"))
    io = {v: load_file(root / f"{v}_io.safetensors") for v in ("base", "gl", "ea")}
    meta = {v: json.loads((root / f"{v}_io.json").read_text()) for v in ("base", "gl", "ea")}
    assert out.exists()
    return weights, inputs, io, meta


def _reduce(meta: dict, t: torch.Tensor) -> torch.Tensor:
    if meta["channel_stride"] == 1:
        return t
    idx = [slice(None)] * t.ndim
    idx[meta["channel_dim"]] = slice(None, None, meta["channel_stride"])
    return t[tuple(idx)]


def _build(variant, weights):
    modules = TransKDModules(STUDENT, TEACHER, variant)
    result = modules.load_state_dict(convert_upstream_kd_state_dict(weights[variant]), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return modules.train()


def _inputs(inputs, batch=slice(None)):
    def grab(name):
        return [inputs[f"{name}.{s}"][batch] for s in range(4)]
    return grab("student.feat"), grab("student.embed"), grab("teacher.feat"), grab("teacher.embed")


def _close(ours, meta, ref):
    ours = _reduce(meta, ours)
    assert ours.shape == ref.shape
    diff = (ours.double() - ref.double()).abs().max().item()
    assert diff <= ATOL * max(1.0, ref.abs().max().item()), diff
    return diff


@pytest.mark.parametrize("variant,expected", [("base", 843_840), ("gl", 1_499_970), ("ea", 1_814_792)])
def test_parameter_counts(variant, expected):
    modules = TransKDModules(STUDENT, TEACHER, variant)
    assert sum(p.numel() for p in modules.parameters()) == expected
    assert sum(p.numel() for p in modules.csf.parameters()) == 650_304
    assert sum(p.numel() for p in modules.pea.parameters()) == 193_536
    extra = {"base": None, "gl": modules.gl_mixer, "ea": modules.ea}[variant]
    if extra is not None:
        assert sum(p.numel() for p in extra.parameters()) == {"gl": 656_130, "ea": 970_952}[variant]


@pytest.mark.parametrize("variant", ["base", "gl", "ea"])
def test_outputs_and_losses_batch2(fixtures, variant):
    weights, inputs, io, meta = fixtures
    modules = _build(variant, weights)
    sfeat, sembed, tfeat, tembed = _inputs(inputs)
    with torch.no_grad():
        fused, branch = modules.csf(sfeat, return_weights=True)
        aligned = modules.align_embeddings(sembed, inputs["pixel_values"], sfeat)
    base_meta = meta["base"]["tensors"]
    for s in range(4):
        _close(fused[s], base_meta[f"csf.out.{s}"], io["base"][f"csf.out.{s}"])
    for s in range(3):
        _close(branch[s], base_meta[f"csf.alpha.{s}"], io["base"][f"csf.alpha.{s}"])
    assert branch[3] is None
    for name, ref in meta[variant]["outputs"].items():
        if name.startswith("embedproj."):
            s = int(name.split(".")[1])
            file, key = ref.split(":")
            src = file.split("/")[-1].replace("_io.safetensors", "")
            _close(aligned[s], meta[src]["tensors"][key], io[src][key])

    losses = meta[variant]["losses_batch2"]
    loss_fn = TransKDLoss(WeightedCrossEntropyLoss.transkd_cityscapes())
    total, parts = loss_fn(inputs["student.logits"], inputs["labels"], fused, tfeat, aligned, tembed)
    assert total.item() == pytest.approx(losses["total_with_ce"], rel=1e-5)
    assert parts["ce"].item() == pytest.approx(losses["ce"], rel=1e-5)
    assert parts["hcl"].item() == pytest.approx(losses["hcl"], rel=1e-5)
    assert parts["pe"].item() == pytest.approx(losses["pe_weighted_sum"], rel=1e-5)
    for s in range(4):
        assert parts[f"hcl.{s}"].item() == pytest.approx(losses["hcl_per_stage"][s], rel=1e-5)
        assert parts[f"pe.{s}"].item() == pytest.approx(losses["pe_mse_per_stage"][s], rel=1e-5)
    assert (total - parts["ce"]).item() == pytest.approx(losses["kd_total_without_ce"], rel=1e-5)


def test_batchnorm_running_stats_after_train_forward(fixtures):
    weights, inputs, io, meta = fixtures
    modules = _build("base", weights)
    sfeat = _inputs(inputs)[0]
    with torch.no_grad():
        modules.csf(sfeat)
    state = modules.state_dict()
    checked = 0
    for key, ref in io["base"].items():
        if not key.startswith("csf.bn_after_forward."):
            continue
        upstream = key[len("csf.bn_after_forward."):]
        ours = convert_upstream_kd_state_dict({upstream: ref})
        (ours_key,) = ours
        if ref.dtype == torch.int64:
            assert int(state[ours_key]) == int(ref)
        else:
            assert (state[ours_key] - ref).abs().max().item() <= ATOL * max(1.0, ref.abs().max().item())
        checked += 1
    assert checked == 33  # 4 stages x conv1/conv2 (+ fc for stages 1-3) x mean/var/count


def test_batch1_takes_fc1_path(fixtures):
    weights, inputs, io, meta = fixtures
    modules = _build("base", weights)
    sfeat, sembed, tfeat, tembed = _inputs(inputs, slice(0, 1))
    with torch.no_grad():
        fused, branch = modules.csf(sfeat, return_weights=True)
        aligned = modules.align_embeddings(sembed, inputs["pixel_values"][:1], sfeat)
    tensors = meta["base"]["tensors"]
    for s in range(4):
        _close(fused[s], tensors[f"csf_b1.out.{s}"], io["base"][f"csf_b1.out.{s}"])
    for s in range(3):
        _close(branch[s], tensors[f"csf_b1.alpha.{s}"], io["base"][f"csf_b1.alpha.{s}"])
    state = modules.state_dict()
    for key, ref in io["base"].items():
        if key.startswith("csf_b1.bn_after_forward.") and ref.dtype != torch.int64:
            (ours_key,) = convert_upstream_kd_state_dict({key[len("csf_b1.bn_after_forward."):]: ref})
            assert (state[ours_key] - ref).abs().max().item() <= ATOL * max(1.0, ref.abs().max().item())
    # the fc (BN) branch was not used: its running stats are still the loaded ones
    for s in range(3):
        loaded = convert_upstream_kd_state_dict(weights["base"])[f"csf.fusions.{s}.fc.1.running_mean"]
        assert torch.equal(state[f"csf.fusions.{s}.fc.1.running_mean"], loaded)
    losses = meta["base"]["losses_batch1_sample0"]
    total, parts = TransKDLoss(WeightedCrossEntropyLoss.transkd_cityscapes())(
        inputs["student.logits"][:1], inputs["labels"][:1], fused, tfeat, aligned, tembed
    )
    assert parts["hcl"].item() == pytest.approx(losses["hcl"], rel=1e-5)
    assert total.item() == pytest.approx(losses["total_with_ce"], rel=1e-5)


def test_gl_mixer_intermediates(fixtures):
    weights, inputs, io, meta = fixtures
    modules = _build("gl", weights)
    mixer = modules.gl_mixer
    assert mixer.alpha.item() == pytest.approx(meta["gl"]["alpha_beta"]["atten_weight"])
    assert mixer.beta.item() == pytest.approx(meta["gl"]["alpha_beta"]["conv_weight"])
    e4 = inputs["student.embed.3"]
    with torch.no_grad():
        _close(mixer.attn(e4), meta["gl"]["tensors"]["gl.attn4"], io["gl"]["gl.attn4"])
        _close(mixer(e4), meta["gl"]["tensors"]["gl.mixed"], io["gl"]["gl.mixed"])
    # our documented default init (upstream leaves alpha/beta uninitialised)
    fresh = TransKDModules(STUDENT, TEACHER, "gl").gl_mixer
    assert fresh.alpha.item() == 1.0 and fresh.beta.item() == 1.0


def test_ea_patch_embeddings(fixtures):
    weights, inputs, io, meta = fixtures
    modules = _build("ea", weights)
    sfeat, sembed = _inputs(inputs)[:2]
    pea = modules.pea(sembed)
    with torch.no_grad():
        mixed, assist = modules.ea(pea, inputs["pixel_values"], sfeat)
    for s in range(4):
        _close(assist[s], meta["ea"]["tensors"][f"ea.mid_embed.{s}"], io["ea"][f"ea.mid_embed.{s}"])
        _close(mixed[s], meta["ea"]["tensors"][f"ea.embedproj.{s}"], io["ea"][f"ea.embedproj.{s}"])
    assert [w.item() for w in modules.ea.fuse_weights] == pytest.approx(meta["ea"]["fuse_weights"])
    fresh = TransKDModules(STUDENT, TEACHER, "ea").ea
    assert [w.item() for w in fresh.fuse_weights] == pytest.approx([0.1 * (i + 1) for i in range(8)])
