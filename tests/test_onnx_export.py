"""ONNX export of OpenUS models: parity with PyTorch in ONNX Runtime, standard operators only, a runtime without
openus_hub, dynamic batch, upstream fixtures, ORTModel in extract_features / embed, and one-line errors."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pydicom.examples
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import parity_path, skip_or_fail

try:
    import onnx
    import onnxruntime
except ImportError:  # CI installs the onnx extra: there this fails instead of skipping
    onnx = onnxruntime = None

from openus_hub import (
    OpenUSBackbone,
    OpenUSConfig,
    OpenUSForImageClassification,
    OpenUSImageProcessor,
    OpenUSModel,
)
from openus_hub.cli import main as cli_main
from openus_hub.features import out_normed_stage_maps

ATOL = 1e-4  # acceptance; measured ORT vs PyTorch fp32: <= 6.2e-6 (tiny, small), <= 1.1e-5 (upstream fixtures)

# Every operator type the OpenUS graphs use (opset 17, default domain). A new one must be added here on purpose:
# every runtime in the README's list has to support it.
OPENUS_OPERATORS = {
    "Abs", "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Erf", "Exp", "Gather", "Identity",
    "LayerNormalization", "Log", "MatMul", "Mul", "Neg", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape",
    "Sigmoid", "Slice", "Split", "Transpose", "Unsqueeze",
}


@pytest.fixture(autouse=True)
def _need_onnxruntime():
    if onnxruntime is None:
        skip_or_fail('onnx/onnxruntime not installed (pip install "openus_hub[onnx]")')


def _echo_frames(count: int = 4, start: int = 0, step: int = 7) -> list[np.ndarray]:
    frames = pydicom.examples.ybr_color.pixel_array  # (30, 240, 320, 3) RGB echo cine
    return [frames[(start + i * step) % len(frames)] for i in range(count)]


def _echo_pixels(size=(224, 224), count=3) -> torch.Tensor:
    processor = OpenUSImageProcessor(size={"height": size[0], "width": size[1]})
    return processor(_echo_frames(count), return_tensors="pt")["pixel_values"]


def _torch_outputs(model, x, stage_maps=True, backbone=None):
    """PyTorch's outputs: tokens and pooled feature from ``model``; stage maps from ``backbone.feature_maps`` (a
    folder's own out-norms) or, without one, ``out_normed_stage_maps`` as extract_features computes them."""
    with torch.no_grad():
        out = model(x, output_hidden_states=stage_maps)
        res = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        if stage_maps:
            maps = backbone(x).feature_maps if backbone else out_normed_stage_maps(model, out.hidden_states)
            res.update({f"stage_maps.{i}": m for i, m in enumerate(maps)})
    return {k: v.numpy() for k, v in res.items()}


@functools.lru_cache(maxsize=4)
def _session(path: str):  # building a session takes seconds (ORT optimises ~9000 nodes): build each once
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def _ort_outputs(path, x):
    session = _session(str(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"pixel_values": x.numpy()})))


def _assert_close(got: dict, expected: dict, atol=ATOL, label=""):
    assert set(got) == set(expected), (label, set(got), set(expected))
    diffs = {k: float(np.abs(got[k] - expected[k]).max()) for k in expected}
    assert all(v <= atol for v in diffs.values()), f"{label} max |ORT - PyTorch| above {atol}: {diffs}"
    return diffs


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """openus-tiny (random weights) saved as a folder, exported with the CLI: stage maps, dynamic batch."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = OpenUSModel(OpenUSConfig.from_preset("openus-tiny")).eval()
    model.save_pretrained(root / "model")
    out = root / "onnx" / "openus-tiny.onnx"
    out.parent.mkdir()
    rc = cli_main(["export-onnx", str(root / "model"), "--output", str(out), "--dynamic-batch", "--stage-maps"])
    assert rc == 0
    return model, out


def test_tiny_export_matches_pytorch_on_random_and_echo_inputs(tiny_export):
    model, path = tiny_export
    for x in (torch.randn(1, 3, 224, 224), torch.randn(3, 3, 224, 224), _echo_pixels()):
        _assert_close(_ort_outputs(path, x), _torch_outputs(model, x), label=f"batch {x.shape[0]}")


def test_graph_is_standard_onnx(tiny_export):
    _, path = tiny_export
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert not proto.functions
    assert {node.op_type for node in proto.graph.node} == OPENUS_OPERATORS
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state", "pooler_output"] + [
        f"stage_maps.{i}" for i in range(4)]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["openus_hub.task"] == "feature-extraction" and json.loads(meta["openus_hub.image_size"]) == [224, 224]
    # the exporter's own check rejects anything else
    from openus_hub.onnx.export import ExportError, default_domain_only

    assert set(default_domain_only(proto)) == OPENUS_OPERATORS
    proto.graph.node[0].domain = "com.microsoft"
    with pytest.raises(ExportError, match="outside the default ONNX domain"):
        default_domain_only(proto)


def test_files_beside_the_graph_reproduce_preprocessing(tiny_export):
    _, path = tiny_export
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "openus-tiny.onnx",
                                                              "preprocessor_config.json"]
    config = json.loads((path.parent / "config.json").read_text())
    assert config["model_type"] == "openus" and config["scan_implementation"] == "auto"
    processor = json.loads((path.parent / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 224, "width": 224}


_RUNNER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "openus_hub" or name.startswith("openus_hub."):
                raise ImportError("openus_hub is blocked in this process")
            return None
    sys.meta_path.insert(0, Block())
    import numpy as np, onnxruntime
    try:
        import openus_hub  # noqa: F401
        raise SystemExit("openus_hub was importable")
    except ImportError:
        pass
    graph, inputs, outputs = sys.argv[1:4]
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    data = dict(np.load(inputs))
    result = {}
    for key, x in data.items():
        for name, value in zip(names, session.run(names, {"pixel_values": x})):
            result[key + "/" + name] = value
    np.savez(outputs, **result)
    """
)


def test_runs_in_a_process_that_cannot_import_openus_hub(tiny_export, tmp_path):
    """onnxruntime alone (isolated mode, openus_hub blocked on sys.meta_path), batch 1 and 3."""
    model, path = tiny_export
    batches = {"b1": torch.randn(1, 3, 224, 224), "b3": _echo_pixels(count=3)}
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in batches.items()})
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-I", str(script), str(path), str(tmp_path / "in.npz"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = dict(np.load(tmp_path / "out.npz"))
    for key, x in batches.items():
        mine = {name.split("/", 1)[1]: v for name, v in got.items() if name.startswith(key + "/")}
        _assert_close(mine, _torch_outputs(model, x), label=key)


def test_ortmodel_in_extract_features_and_embed(tiny_export, tmp_path):
    from openus_hub import extract_features
    from openus_hub.cli import read_output
    from openus_hub.onnx import ORTModel

    model, path = tiny_export
    ort_model = ORTModel.from_pretrained(path)
    assert ort_model.task == "feature-extraction" and ort_model.image_size == (224, 224)
    frames = _echo_frames(3)
    ours = extract_features(str(path), frames, batch_size=2)
    ref = extract_features(model, frames, processor=OpenUSImageProcessor(), batch_size=2)
    assert torch.allclose(ours.pooled, ref.pooled, atol=ATOL)
    for a, b in zip(ours.stage_maps, ref.stage_maps):
        assert torch.allclose(a, b, atol=ATOL)
    # openus-hub embed --model FILE.onnx: same embeddings as the PyTorch folder
    shutil.copy(pydicom.examples.get_path("ybr_color"), tmp_path / "cine.dcm")
    model_dir = path.parent.parent / "model"
    rc_onnx = cli_main(["embed", str(tmp_path / "cine.dcm"), "--model", str(path), "--output",
                        str(tmp_path / "onnx.npz"), "--num-frames", "3", "--no-progress"])
    rc_torch = cli_main(["embed", str(tmp_path / "cine.dcm"), "--model", str(model_dir), "--output",
                         str(tmp_path / "torch.npz"), "--num-frames", "3", "--no-progress"])
    assert rc_onnx == 0 and rc_torch == 0
    a, meta = read_output(tmp_path / "onnx.npz")
    b, _ = read_output(tmp_path / "torch.npz")
    assert a["embeddings"].shape == (3, 768)
    assert np.abs(a["embeddings"] - b["embeddings"]).max() <= ATOL
    assert meta["model_fingerprint"] == ort_model.fingerprint()


@pytest.mark.slow
def test_small_export_matches_pytorch(tmp_path):
    """openus-small, the paper's model (random weights), fixed batch 1: tokens and pooled output on noise and echo."""
    from openus_hub.onnx import export_onnx

    torch.manual_seed(0)
    model = OpenUSModel(OpenUSConfig.from_preset("openus-small")).eval()
    result = export_onnx(model, tmp_path / "small.onnx")
    assert result.max_abs_diff["pooler_output"] <= ATOL
    for x in (torch.randn(1, 3, 224, 224), _echo_pixels(count=1)):
        _assert_close(_ort_outputs(result.path, x), _torch_outputs(model, x, stage_maps=False), label="small")


@pytest.mark.parametrize("cfg", ["cfg_a", "cfg_b", "cfg_c"])
def test_parity_fixture_backbones_match_pytorch_and_upstream(cfg, tmp_path):
    """Converted upstream checkpoints: ORT == PyTorch (1e-4) and ORT == upstream's stage maps and tokens (1e-4)."""
    from conversion import convert_openus_to_hf as conv

    folder = parity_path("openus", cfg)
    assert conv.main(["--checkpoint", str(folder / "checkpoint.pth"), "--output-dir", str(tmp_path / "hf")]) == 0
    io = load_file(folder / "io.safetensors")
    model = OpenUSModel.from_pretrained(tmp_path / "hf").eval()
    backbone = OpenUSBackbone.from_pretrained(tmp_path / "hf").eval()  # the converted folder's four out-norms
    assert len(backbone.out_features) == 4
    for size, suffixes in (((224, 224), ("224", "real")), ((96, 96), ("96",))):
        out = tmp_path / f"{size[0]}" / "model.onnx"
        out.parent.mkdir()
        rc = cli_main(["export-onnx", str(tmp_path / "hf"), "--output", str(out), "--stage-maps", "--dynamic-batch",
                       "--image-size", str(size[0]), str(size[1])])
        assert rc == 0
        for suffix in suffixes:
            x = io[f"pixel_values_{suffix}"]
            got = _ort_outputs(out, x)
            _assert_close(got, _torch_outputs(model, x, backbone=backbone), label=f"{cfg} {suffix}")
            upstream = {"last_hidden_state": io[f"tokens_{suffix}"].numpy()}
            upstream.update({f"stage_maps.{i}": io[f"out{i}_{suffix}"].numpy() for i in range(4)})
            _assert_close({k: got[k] for k in upstream}, upstream, label=f"{cfg} {suffix} vs upstream")


def test_segmentation_fixture_reproduces_upstream_logits(tmp_path):
    """openus_seg converted with its head, exported with --task semantic-segmentation: upstream logits in ORT."""
    from conversion.convert_openus_to_hf import main as convert_main
    from openus_hub.onnx import ORTModel

    folder = parity_path("openus_seg")
    assert convert_main(["--checkpoint", str(folder / "seg_model.safetensors"), "--seg-head",
                         str(folder / "head_checkpoint.pth"), "--output-dir", str(tmp_path / "hf")]) == 0
    out = tmp_path / "onnx" / "seg.onnx"
    out.parent.mkdir()
    assert cli_main(["export-onnx", str(tmp_path / "hf"), "--output", str(out), "--task", "semantic-segmentation",
                     "--dynamic-batch"]) == 0
    io = load_file(str(folder / "io.safetensors"))
    ort_model = ORTModel.from_pretrained(out)
    logits = ort_model(io["pixel_values"]).logits
    logits_real = ort_model(io["pixel_values_real"]).logits
    errs = {"logits": (logits - io["logits"]).abs().max().item(),
            "logits_real": (logits_real - io["logits_real"]).abs().max().item()}
    assert all(v <= ATOL for v in errs.values()), errs
    # the same post-processing as the PyTorch model's processor
    from transformers import AutoModelForSemanticSegmentation

    torch_model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch_out = torch_model(io["pixel_values"])
    sizes = [(240, 320), (100, 80)]
    ours = ort_model.processor.post_process_semantic_segmentation(ort_model(io["pixel_values"]), sizes)
    ref = OpenUSImageProcessor().post_process_semantic_segmentation(torch_out, sizes)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and (a == b).float().mean().item() >= 0.999


def test_classification_export(tmp_path):
    config = OpenUSConfig(embed_dim=16, depths=[1, 1, 1, 1], num_labels=3, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = OpenUSForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "cls")
    out = tmp_path / "onnx" / "cls.onnx"
    out.parent.mkdir()
    assert cli_main(["export-onnx", str(tmp_path / "cls"), "--output", str(out), "--image-size", "64", "96"]) == 0
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x).logits.numpy()
    _assert_close(_ort_outputs(out, x), {"logits": expected})
    # a backbone-only folder has no classification head to export
    OpenUSModel(config).save_pretrained(tmp_path / "backbone")
    assert cli_main(["export-onnx", str(tmp_path / "backbone"), "--output", str(tmp_path / "x.onnx"), "--task",
                     "image-classification"]) == 2


@pytest.mark.parametrize("opset", [18, 20])
def test_other_opsets_and_a_non_square_size(opset, tmp_path):
    config = OpenUSConfig(embed_dim=16, depths=[1, 1, 1, 1], d_state=2, drop_path_rate=0.0)
    model = OpenUSModel(config).eval()
    from openus_hub.onnx import export_onnx

    result = export_onnx(model, tmp_path / "m.onnx", opset=opset, image_size=(64, 96), dynamic_batch=True,
                         stage_maps=True)
    assert onnx.load(str(result.path)).opset_import[0].version == opset
    x = torch.randn(2, 3, 64, 96)
    _assert_close(_ort_outputs(result.path, x), _torch_outputs(model, x), label=f"opset {opset}")


def test_fp16_export_runs_close_to_fp32(micro_folder, tmp_path):
    """--fp16: float16 graph (float32 input/outputs), standard operators, within 2% of the output scale."""
    out = tmp_path / "fp16.onnx"
    assert cli_main(["export-onnx", str(micro_folder), "--output", str(out), "--fp16", "--image-size", "64", "64"]) == 0
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer) > 10
    model = OpenUSModel.from_pretrained(micro_folder).eval()
    x = _echo_pixels(size=(64, 64), count=1)
    expected = _torch_outputs(model, x, stage_maps=False)
    got = _ort_outputs(out, x)
    for name, value in expected.items():
        err = float(np.abs(got[name] - value).max())
        assert got[name].dtype == np.float32 and err <= 2e-2 * max(1.0, float(np.abs(value).max())), (name, err)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    OpenUSModel(OpenUSConfig(embed_dim=16, depths=[1, 1, 1, 1], drop_path_rate=0.0)).save_pretrained(root / "m")
    return root / "m"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs_get_one_line_errors(micro_folder, tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    cases = [
        ([str(tmp_path / "bert"), "--output", str(tmp_path / "a.onnx")], "not an OpenUS or SegFormer model"),
        ([str(tmp_path), "--output", str(tmp_path / "a.onnx")], "has no config.json"),
        ([str(micro_folder), "--output", str(tmp_path / "a.onnx"), "--image-size", "224", "100"],
         "multiples of 32"),
        ([str(micro_folder), "--output", str(tmp_path / "a.txt")], "must end in .onnx"),
        ([str(micro_folder), "--output", str(tmp_path / "a.onnx"), "--quantize", "dynamic"], "SegFormer students"),
        ([str(micro_folder), "--output", str(tmp_path / "a.onnx"), "--opset", "11"], "--opset"),
        ([str(micro_folder), "--output", str(tmp_path / "missing" / "a.onnx")], "does not exist"),
    ]
    for args, match in cases:
        assert cli_main(["export-onnx", *args]) == 2, args
        assert match in _one_line_error(capsys), (args, match)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*"))


def test_existing_output_is_kept_without_overwrite_and_writes_are_atomic(micro_folder, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    args = ["export-onnx", str(micro_folder), "--output", str(out), "--image-size", "64", "64"]
    assert cli_main(args) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # a failure while writing (after the graph was built and checked) leaves the old file and no temporary files
    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx, "save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        cli_main([*args, "--overwrite"])
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    monkeypatch.undo()
    assert cli_main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "m.onnx", "preprocessor_config.json"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_missing_extra_is_named(micro_folder, tmp_path):
    """Without onnxruntime the CLI exits 2 with one line naming the extra."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["onnxruntime"] = None  # what Python reports for a package that is not installed
        from openus_hub.cli import main
        sys.exit(main(["export-onnx", {str(micro_folder)!r}, "--output", {str(tmp_path / 'a.onnx')!r}]))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: onnxruntime is not installed") and 'openus_hub[onnx]' in err, err
    assert not (tmp_path / "a.onnx").exists()
