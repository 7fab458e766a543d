"""TransKD -> stock transformers SegFormer conversion, against the upstream outputs in ../shared/parity/transkd.

Weights are rebuilt bit-exactly from the fixture recipes with the fixtures' own materialize.py (in memory, then
saved under pytest's tmp dir, never into ../shared)."""

import copy
import importlib.util
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, SegformerForSemanticSegmentation

from conversion import convert_transkd_to_hf as conv
from conversion.model_card import validate_card
from tests.conftest import parity_path

MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = parity_path("transkd")
    spec = importlib.util.spec_from_file_location("transkd_materialize", root / "materialize.py")
    mat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mat)
    out = tmp_path_factory.mktemp("transkd")
    files = {}
    for name, recipe in (("b0", "b0/state_dict.pth"), ("b2", "b2/state_dict.pth"),
                         ("base", "transkd_base/checkpoint.pth")):
        sd = mat.build(root / f"{recipe}.recipe.json")
        files[name] = out / f"{name}.pth"
        torch.save(sd, files[name])
        if name == "base":
            files["base_dp"] = out / "base_dataparallel.pth"
            torch.save(mat.with_module_prefix(sd), files["base_dp"])
    for v in ("gl", "ea"):
        files[f"{v}_modules"] = mat.build(root / f"modules/{v}.safetensors.recipe.json")
    images = load_file(root / "images.safetensors")
    io = {a: load_file(root / a / "io.safetensors") for a in ("b0", "b2")}
    return {"files": files, "images": images, "io": io, "out": out, "root": root}


def _convert(fixtures, tmp_path, key, variant, *extra):
    out = tmp_path / f"{key}-{variant}"
    code = conv.main(["--checkpoint", str(fixtures["files"][key]), "--variant", variant, "--output-dir", str(out),
                      *extra])
    assert code == 0
    return out


def _upstream(io, tag):
    return {"logits": io[f"{tag}.logits"], "feats": [io[f"{tag}.feat.{s}"] for s in range(4)],
            "embeds": [io[f"{tag}.embed.{s}"] for s in range(4)]}


def _embed_diffs(model, x, expected):
    got = []
    hooks = [model.segformer.stages[s].patch_embeddings.register_forward_hook(lambda m, i, o: got.append(o[0]))
             for s in range(4)]
    with torch.no_grad():
        model(pixel_values=x)
    for h in hooks:
        h.remove()
    return max((g - e).abs().max().item() for g, e in zip(got, expected["embeds"]))


@pytest.mark.parametrize("arch", ["b0", "b2"])
def test_stock_segformer_reproduces_upstream(fixtures, tmp_path, arch):
    out = _convert(fixtures, tmp_path, arch, arch, "--no-card")  # the card and its self-check: tested on transkd-base
    assert not (out / "README.md").exists()
    stock = SegformerForSemanticSegmentation.from_pretrained(out).eval()
    assert stock.config.model_type == "segformer" and stock.config.num_labels == 20
    assert stock.config.id2label[19] == "void" and stock.config.id2label[0] == "road"
    assert stock.config.hidden_sizes == conv.ARCHS[arch]["hidden_sizes"]
    assert sum(p.numel() for p in stock.parameters()) == {"b0": 3_719_284, "b2": 27_362_004}[arch]
    fixed = copy.deepcopy(stock)
    assert conv.set_upstream_layernorm_eps(fixed) == 2 * sum(conv.ARCHS[arch]["depths"]) + 4
    for tag in ("rand", "real"):
        x, expected = fixtures["images"][f"{tag}.pixel_values"], _upstream(fixtures["io"][arch], tag)
        for label, model, tol in (("stock", stock, 5e-5), ("eps1e-6", fixed, 1e-5)):
            d = conv.max_diffs(model, x, expected)
            d["embeds"] = _embed_diffs(model, x, expected)
            for what, value in d.items():
                MEASURED[f"{arch} {tag} {label} {what}"] = value
                assert value <= tol, f"{arch} {tag} {label} {what}: {value:.2e} > {tol:.0e}"
        # the eps difference is real and is what the stock class costs
        assert MEASURED[f"{arch} {tag} stock logits"] > MEASURED[f"{arch} {tag} eps1e-6 logits"]
    print("\n" + "\n".join(f"{k}: {v:.2e}" for k, v in MEASURED.items() if k.startswith(arch)))


def test_reference_forward_matches_upstream(fixtures):
    """The converter's self-check reference (original keys, upstream semantics) reproduces the upstream outputs."""
    state, _ = conv.load_checkpoint(str(fixtures["files"]["b0"]))
    for tag in ("rand", "real"):
        expected = _upstream(fixtures["io"]["b0"], tag)
        with torch.no_grad():
            ref = conv.reference_forward(state, fixtures["images"][f"{tag}.pixel_values"], "b0")
        assert (ref["logits"] - expected["logits"]).abs().max() <= 1e-5
        for s in range(4):
            assert (ref["feats"][s] - expected["feats"][s]).abs().max() <= 1e-5
            assert (ref["embeds"][s] - expected["embeds"][s]).abs().max() <= 1e-5


@pytest.mark.parametrize("key", ["base", "base_dp"])
def test_kd_checkpoint_converts_to_the_student_only(fixtures, tmp_path, key, caplog):
    caplog.set_level(logging.INFO, logger="convert_transkd_to_hf")
    out = _convert(fixtures, tmp_path, key, "transkd-base")
    log = caplog.text
    assert "192 upstream keys -> 208 transformers keys, 3,719,284 parameters" in log
    assert "dropped 81 key(s): CSF (skfs.*)" in log and "dropped 8 key(s): PEA (embed*_linearproject.*)" in log
    recipe = json.loads((fixtures["root"] / "transkd_base/checkpoint.pth.recipe.json").read_text())
    module_keys = [t["key"] for t in recipe["tensors"] if not t["key"].startswith("student.")]
    assert len(module_keys) == 89
    for k in module_keys:  # every dropped key is named
        assert f"    {k}\n" in log, k
    student = load_file(out / "model.safetensors")
    b0 = load_file(_convert(fixtures, tmp_path, "b0", "b0", "--no-card") / "model.safetensors")
    assert student.keys() == b0.keys() and all(torch.equal(student[k], b0[k]) for k in b0)
    card = validate_card(out / "README.md", require_verification=True)
    assert card.data.license == "other" and card.data.license_name == "no-upstream-licence"
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "transformers"
    assert "dropped 89 training-only tensors" in card.text and conv.UPSTREAM_COMMIT in card.text
    assert conv.sha256_file(str(fixtures["files"][key])) in card.text
    assert card.data.eval_results[0].metric_value == 68.58


@pytest.mark.parametrize("variant", ["gl", "ea"])
def test_gl_and_ea_wrappers_drop_their_modules(fixtures, tmp_path, variant):
    b0, _ = conv.load_checkpoint(str(fixtures["files"]["b0"]))
    modules = fixtures["files"][f"{variant}_modules"]
    ckpt = {**{f"student.{k}": v for k, v in b0.items()}, **modules}
    if variant == "ea":  # EA's own patch embeds share names with the student's: filter before stripping
        assert "patch_embed1.proj.weight" in modules
    model, report = conv.convert(_save(tmp_path, ckpt), f"transkd-{variant}")
    dropped = {k for keys in report["dropped"].values() for k in keys}
    assert dropped == set(modules) and report["original_keys"] == len(b0)
    got = model.state_dict()
    assert torch.equal(got["segformer.stages.0.patch_embeddings.proj.weight"], b0["patch_embed1.proj.weight"])
    with pytest.raises(conv.ConversionError, match=f"looks like --variant transkd-{variant}"):
        conv.convert(_save(tmp_path, ckpt), "transkd-base")


def _save(tmp_path, sd):
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    return str(path)


def test_wrong_variant_errors(fixtures, tmp_path, capsys):
    assert conv.main(["--checkpoint", str(fixtures["files"]["b0"]), "--variant", "transkd-base",
                      "--output-dir", str(tmp_path / "x")]) == 2
    assert "a plain SegFormer state dict: use --variant b0 or b2" in capsys.readouterr().err
    with pytest.raises(conv.ConversionError, match="use --variant transkd-base, transkd-gl or transkd-ea"):
        conv.convert(str(fixtures["files"]["base"]), "b0")
    with pytest.raises(conv.ConversionError, match="not a MiT-B2 SegFormer .* is it --variant b0"):
        conv.convert(str(fixtures["files"]["b0"]), "b2")


def test_folder_loads_with_plain_transformers_and_processor_matches_transkd_input(fixtures, tmp_path):
    out = _convert(fixtures, tmp_path, "base", "transkd-base", "--no-card")
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForSemanticSegmentation.from_pretrained({str(out)!r})\n"
        f"p = transformers.AutoImageProcessor.from_pretrained({str(out)!r})\n"
        "assert 'openus_hub' not in sys.modules\n"
        "print(type(m).__name__, m.config.model_type, p.do_normalize, m(torch.zeros(1, 3, 64, 64)).logits.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SegformerForSemanticSegmentation segformer False torch.Size([1, 20, 16, 16])" in res.stdout
    # the processor reproduces the fixtures' real input: pydicom ybr_color frame 0, PIL bilinear, /255, no mean/std
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(pydicom.examples.get_path("ybr_color"))
    frame = Image.fromarray(ds.pixel_array[0])
    # the PIL backend is TransKD's pipeline exactly; where torchvision is installed, transformers defaults to its
    # backend, whose uint8 resize rounds differently (at most one grey level, 1/255)
    proc = AutoImageProcessor.from_pretrained(out, backend="pil")
    assert proc.size == {"height": 512, "width": 1024} and not proc.do_normalize
    x = proc(frame, size={"height": 128, "width": 256}, return_tensors="pt").pixel_values
    err = (x - fixtures["images"]["real.pixel_values"]).abs().max().item()
    MEASURED["processor vs fixture real input"] = err
    assert err <= 1e-6, err
    default = AutoImageProcessor.from_pretrained(out)
    x = default(frame, size={"height": 128, "width": 256}, return_tensors="pt").pixel_values
    assert (x - fixtures["images"]["real.pixel_values"]).abs().max().item() <= 1 / 255 + 1e-6
