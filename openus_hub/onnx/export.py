"""ONNX export of OpenUS models (backbone, classification, segmentation) and SegFormer students.

The graph contains only operators of the default ONNX domain. The OpenUS selective scan is exported through the
``"chunked"`` scan implementation (:mod:`openus_hub.ops.chunked_scan`), whose loops unroll for the image size given at
export time: the height and width are fixed, the batch size can be dynamic (``dynamic_batch=True``).

Layout of an export (optimum's conventions): ``FILE.onnx`` with input ``pixel_values`` ``(batch, 3, H, W)`` and
outputs ``last_hidden_state`` + ``pooler_output`` (feature extraction, plus ``stage_maps.0..3`` with
``stage_maps=True``) or ``logits`` (classification, segmentation), and beside it ``config.json`` and
``preprocessor_config.json``, whose resize size is the export size, so that the folder reproduces the preprocessing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._deps import require

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "ExportError", "ExportResult", "export_onnx", "default_domain_only"]

TASKS = ("feature-extraction", "image-classification", "semantic-segmentation")
DEFAULT_OPSET = 17  # first opset with LayerNormalization, which ONNX Runtime runs as one fused kernel
MAX_OPSET = 20  # newest opset of torch.onnx's TorchScript-based exporter
STRIDE = 32  # OpenUS and SegFormer both downsample by 32
FP32_ATOL = 1e-4  # acceptance tolerance of the export check (measured errors are <= 1.1e-5, see the tests)
FP16_RTOL = 2e-2  # fp16 graphs: max |ORT - PyTorch fp32| <= 2e-2 x max(1, max |output|) (measured ~1e-3)

# architecture class -> task it is exported for by default, and the head class each task needs
_TASK_OF_ARCHITECTURE = {
    "OpenUSModel": "feature-extraction",
    "OpenUSBackbone": "feature-extraction",
    "OpenUSForImageClassification": "image-classification",
    "OpenUSForSemanticSegmentation": "semantic-segmentation",
    "SegformerForSemanticSegmentation": "semantic-segmentation",
}
_HEAD_OF_TASK = {
    "openus": {
        "feature-extraction": None,  # any OpenUS folder has the backbone
        "image-classification": "OpenUSForImageClassification",
        "semantic-segmentation": "OpenUSForSemanticSegmentation",
    },
    "segformer": {"semantic-segmentation": "SegformerForSemanticSegmentation"},
}


class ExportError(ValueError):
    """Bad input to the exporter; the message is one line that names the file and the fix."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    task: str
    image_size: tuple[int, int]
    output_names: list[str]
    max_abs_diff: dict[str, float]  # per output: ONNX Runtime vs PyTorch on the check input (fp32 or fp16 graph)
    operators: list[str]  # sorted operator types of the graph
    quantization: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def default_domain_only(model_proto) -> list[str]:
    """Sorted operator types of ``model_proto``; raises ExportError when one is outside the default ONNX domain."""
    ops, foreign = set(), set()
    graphs = [model_proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            (ops if node.domain in ("", "ai.onnx") else foreign).add(f"{node.domain}::{node.op_type}" if node.domain
                                                                     not in ("", "ai.onnx") else node.op_type)
            for attr in node.attribute:  # subgraphs of If / Loop / Scan
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    if foreign or model_proto.functions:
        raise ExportError(f"the graph uses operators outside the default ONNX domain: {sorted(foreign)} "
                          f"(functions: {[f.name for f in model_proto.functions]})")
    return sorted(ops)


# ------------------------------------------------------------------------------------------------ loading
def _model_type(config) -> str:
    return getattr(config, "model_type", "") or ""


def _resolve_task(model_type: str, architectures: list[str], task: str | None, source: str) -> str:
    if model_type not in _HEAD_OF_TASK:
        raise ExportError(f"{source} is not an OpenUS or SegFormer model (model_type {model_type!r}); export-onnx "
                          "takes a folder written by save_pretrained, the converters or training.export_student")
    if task is None:
        task = next((_TASK_OF_ARCHITECTURE[a] for a in architectures if a in _TASK_OF_ARCHITECTURE), None)
        task = task or next(iter(_HEAD_OF_TASK[model_type]))
    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task not in _HEAD_OF_TASK[model_type]:
        raise ExportError(f"{source}: a {model_type} model exports only for "
                          f"{', '.join(_HEAD_OF_TASK[model_type])}, not {task!r}")
    head = _HEAD_OF_TASK[model_type][task]
    if head is not None and head not in architectures:
        raise ExportError(f"{source} holds {', '.join(architectures) or 'no saved head'}; --task {task} needs a folder "
                          f"saved from {head} (its head weights), e.g. a fine-tuning export")
    return task


def _load(model: Any, task: str | None, check=lambda task, model_type: None) -> tuple[nn.Module, str, str, Path | None]:
    """(model, task, model_type, folder) for a folder / registered name or an in-memory model; ``check(task,
    model_type)`` runs before any weights are read."""
    if isinstance(model, nn.Module):
        config = model.config
        architectures = [type(model).__name__]
        task = _resolve_task(_model_type(config), architectures, task, type(model).__name__)
        check(task, _model_type(config))
        return model, task, _model_type(config), None
    source = str(model)
    folder = Path(source)
    if folder.is_file():
        raise ExportError(f"{source} is a file; export-onnx takes a model folder (config.json + model.safetensors) "
                          "or a registered model name")
    if not folder.is_dir():  # a registry name or Hub id: openus_hub's resolver makes it a folder (or says why not)
        from openus_hub.pretrained import OpenUSHubError, resolve

        try:
            folder = Path(resolve(source)[0])
        except OpenUSHubError as e:
            raise ExportError(str(e)) from None
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{source} has no config.json: not a saved model folder (write one with "
                          "save_pretrained, the converters or training.export_student)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{config_path} is not readable JSON ({type(e).__name__})") from e
    model_type, architectures = raw.get("model_type", ""), list(raw.get("architectures") or [])
    task = _resolve_task(model_type, architectures, task, source)
    check(task, model_type)
    import openus_hub.auto as auto

    loader = {
        "feature-extraction": auto.AutoModel,
        "image-classification": auto.AutoModelForImageClassification,
        "semantic-segmentation": auto.AutoModelForSemanticSegmentation,
    }[task]
    if task == "feature-extraction" and model_type == "openus":  # every out-norm the folder holds (stage maps)
        from openus_hub.features import load_feature_model

        loaded = load_feature_model(folder)
    else:
        loaded = loader.from_pretrained(str(folder))
    return loaded, task, model_type, folder


def _load_processor(model: nn.Module, model_type: str, folder: Path | None):
    """The model's own processor when the folder has one, else the default for its type."""
    from transformers import AutoImageProcessor

    name = str(folder) if folder is not None else (getattr(model.config, "_name_or_path", "") or "")
    if name and Path(name, "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(name, backend="pil") if model_type == "segformer" else \
            AutoImageProcessor.from_pretrained(name)
    if model_type == "segformer":
        try:
            from transformers import SegformerImageProcessorPil as cls
        except ImportError:  # pragma: no cover - older transformers
            from transformers import SegformerImageProcessor as cls
        return cls()
    from openus_hub.models.openus import OpenUSImageProcessor

    return OpenUSImageProcessor()


def _processor_size(processor) -> tuple[int, int] | None:
    size = getattr(processor, "size", None)
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    return None


def _with_size(processor, size: tuple[int, int]):
    processor = copy.deepcopy(processor)
    processor.size = {"height": size[0], "width": size[1]}
    return processor


# ------------------------------------------------------------------------------------------------ graph
class _ExportWrapper(nn.Module):
    """Calls the model through its public forward and returns the exported outputs as a tuple of tensors."""

    def __init__(self, model: nn.Module, task: str, stage_maps: bool):
        super().__init__()
        self.model, self.task, self.stage_maps = model, task, stage_maps

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.task == "feature-extraction" and hasattr(self.model, "stage_norms"):  # OpenUS: as extract_features
            from openus_hub.features import out_normed_stage_maps

            out = self.model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            maps = out_normed_stage_maps(self.model, out.hidden_states)  # S x [B, C_i, H_i, W_i]
            tokens = maps[-1].flatten(2).transpose(1, 2)  # [B, H*W, C] row-major, as OpenUSModel's tokens
            pooled = tokens.mean(dim=1)  # [B, C]
            return (torch.cat([pooled[:, None], tokens], dim=1), pooled, *(maps if self.stage_maps else ()))
        if self.task == "feature-extraction":
            out = self.model(pixel_values=pixel_values, return_dict=True)
            return out.last_hidden_state, out.pooler_output
        return (self.model(pixel_values=pixel_values, return_dict=True).logits,)


def output_names_for(task: str, stage_maps: bool = False) -> list[str]:
    if task == "feature-extraction":
        return ["last_hidden_state", "pooler_output"] + ([f"stage_maps.{i}" for i in range(4)] if stage_maps else [])
    return ["logits"]


def _tmp_path(dest: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plainly created file, not mkstemp's 0600
    return Path(tmp)


def _session(path_or_bytes):
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs log a warning per node it cannot constant-fold
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def export_onnx(
    model: Any,
    output: str | os.PathLike,
    *,
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    image_size: tuple[int, int] | None = None,
    stage_maps: bool = False,
    fp16: bool = False,
    quantize: str | None = None,
    calibration_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    check_input: torch.Tensor | None = None,
) -> ExportResult:
    """Export ``model`` (a folder, a registered name or a loaded model) to ``output`` (``.onnx``).

    Args:
        task: ``feature-extraction``, ``image-classification`` or ``semantic-segmentation``; default from the saved
            architecture. SegFormer students export for ``semantic-segmentation``.
        opset: ONNX opset, 17 to 20.
        dynamic_batch: the batch dimension is symbolic (``batch_size``); otherwise the graph takes batch 1.
        image_size: ``(height, width)``, multiples of 32; default: the processor's resize size (224x224 for OpenUS).
        stage_maps: feature extraction also outputs the four out-normed stage maps (``stage_maps.0..3``).
        fp16: convert weights and activations to float16 (inputs and outputs stay float32), for GPU runtimes.
        quantize: ``"dynamic"`` or ``"static"`` int8 quantisation (SegFormer students); static needs
            ``calibration_dir``, a folder of images (PNG/JPEG/DICOM) run through the processor.
        overwrite: replace an existing output (and the ``config.json`` / ``preprocessor_config.json`` beside it).
        check_input: the ``(B, 3, H, W)`` input the exported graph is checked on against PyTorch (default: seeded
            random values).

    Returns:
        :class:`ExportResult`. Raises :class:`ExportError` (one line) on bad input.
    """
    onnx = require("onnx")
    require("onnxruntime")
    out = Path(output)
    if out.suffix != ".onnx":
        raise ExportError(f"--output must end in .onnx, got {out.name}")
    if quantize not in (None, "dynamic", "static"):
        raise ExportError(f"quantize must be 'dynamic' or 'static', got {quantize!r}")
    if quantize == "static" and calibration_dir is None:
        raise ExportError("--quantize static needs --calibration-dir DIR (a folder of calibration images)")
    if quantize and fp16:
        raise ExportError("choose one of --fp16 and --quantize")
    if not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {DEFAULT_OPSET} and {MAX_OPSET} (LayerNormalization needs 17), "
                          f"got {opset}")
    if image_size is not None:
        height, width = (int(v) for v in image_size)
        if height < STRIDE or width < STRIDE or height % STRIDE or width % STRIDE:
            raise ExportError(f"--image-size must be multiples of {STRIDE} (at least {STRIDE}), got {height}x{width}; "
                              f"try {max(STRIDE, round(height / STRIDE) * STRIDE)}x"
                              f"{max(STRIDE, round(width / STRIDE) * STRIDE)}")
    siblings = [out, out.parent / "config.json", out.parent / "preprocessor_config.json"]
    existing = [p for p in siblings if p.exists()]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]} exists; pass --overwrite to replace it (and the config.json / "
                          "preprocessor_config.json beside it), or choose another --output")
    if not out.parent.is_dir():
        raise ExportError(f"output folder {out.parent} does not exist")

    def check(task: str, model_type: str) -> None:
        if quantize and model_type != "segformer":
            raise ExportError("--quantize is for SegFormer students; OpenUS models export in float32 (or --fp16)")
        if stage_maps and task != "feature-extraction":
            raise ExportError("stage maps are outputs of --task feature-extraction only")

    if quantize == "static":
        _calibration_files(calibration_dir)  # before any weights are read
    loaded, task, model_type, folder = _load(model, task, check)
    processor = _load_processor(loaded, model_type, folder)
    if image_size is None:
        image_size = _processor_size(processor) or (224, 224)
        if image_size[0] % STRIDE or image_size[1] % STRIDE:
            raise ExportError(f"the processor's size {image_size[0]}x{image_size[1]} is not a multiple of {STRIDE}; "
                              "pass --image-size H W")
    image_size = (int(image_size[0]), int(image_size[1]))
    processor = _with_size(processor, image_size)

    model_copy = copy.deepcopy(loaded).float().eval()
    if model_type == "openus":
        model_copy.config.scan_implementation = "chunked"  # standard operators only (openus_hub.ops.chunked_scan)
    names = output_names_for(task, stage_maps)
    wrapper = _ExportWrapper(model_copy, task, stage_maps).eval()
    trace_batch = 2 if dynamic_batch else 1  # a batch of 2 keeps the traced graph from specialising on batch 1
    example = torch.randn(trace_batch, 3, *image_size, generator=torch.Generator().manual_seed(0))
    if check_input is None:
        check_input = torch.randn(1 if not dynamic_batch else 3, 3, *image_size,
                                  generator=torch.Generator().manual_seed(1))
    check_input = check_input.float()
    if tuple(check_input.shape[1:]) != (3, *image_size) or (not dynamic_batch and check_input.shape[0] != 1):
        raise ExportError(f"check_input must be ({'batch' if dynamic_batch else 1}, 3, {image_size[0]}, "
                          f"{image_size[1]}), got {tuple(check_input.shape)}")

    tmp_graph = _tmp_path(out, ".export.onnx")
    tmp_out = _tmp_path(out, ".tmp")
    try:
        axes = {name: {0: "batch_size"} for name in ["pixel_values", *names]} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks, the exporter's deprecation notice
            with torch.no_grad():
                # torch.onnx's TorchScript-based exporter traces the unrolled scan in seconds; the torch.export-based
                # one takes minutes on its thousands of nodes
                torch.onnx.export(
                    wrapper, (example,), str(tmp_graph), dynamo=False, opset_version=opset,
                    input_names=["pixel_values"], output_names=names, dynamic_axes=axes, do_constant_folding=True,
                )
        proto = onnx.load(str(tmp_graph))
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(check_input)]
        quant_info: dict[str, Any] = {}
        if fp16:
            proto = _to_fp16(proto)
        atol = [FP16_RTOL * max(1.0, float(np.abs(e).max())) if fp16 else FP32_ATOL for e in expected]
        diffs = _check_graph(proto, names, check_input, expected, atol, check=not quantize)
        if quantize:
            proto, quant_info = _quantize(proto, tmp_graph, quantize, calibration_dir, processor, check_input,
                                          expected[0])
        operators = default_domain_only(proto)
        onnx.checker.check_model(proto, full_check=True)
        for key, value in {
            "openus_hub.task": task,
            "openus_hub.model_type": model_type,
            "openus_hub.image_size": json.dumps(list(image_size)),
            "openus_hub.dynamic_batch": json.dumps(dynamic_batch),
            "openus_hub.outputs": json.dumps(names),
            "openus_hub.precision": "int8-" + quantize if quantize else ("fp16" if fp16 else "fp32"),
        }.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "openus_hub"
        from openus_hub.version import __version__

        proto.producer_version = __version__
        onnx.save(proto, str(tmp_out))
        # config + processor beside the graph, each written to a temporary name first
        staged = []
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".openus_onnx.") as tmp_dir:
            config = copy.deepcopy(model_copy.config)
            if model_type == "openus":
                config.scan_implementation = getattr(loaded.config, "scan_implementation", "auto")
            config.save_pretrained(tmp_dir)
            processor.save_pretrained(tmp_dir)
            for name in ("config.json", "preprocessor_config.json"):
                staged.append((Path(tmp_dir) / name, out.parent / name))
            for src, dest in staged:
                os.replace(src, dest)
        os.replace(tmp_out, out)
    finally:
        for tmp in (tmp_graph, tmp_out):
            if tmp.exists():
                tmp.unlink()
    files = [out, out.parent / "config.json", out.parent / "preprocessor_config.json"]
    logger.info("exported %s (%s, %dx%d); max |ONNX Runtime - PyTorch|: %s", out, task, *image_size, diffs)
    return ExportResult(out, task, image_size, names, diffs, operators, quant_info, files)


def _check_graph(proto, names, check_input, expected, atol: list[float], check: bool) -> dict[str, float]:
    """Run the graph in ONNX Runtime on ``check_input``; max |ORT - PyTorch| per output (ExportError above atol)."""
    session = _session(proto.SerializeToString())
    got = session.run(names, {"pixel_values": check_input.numpy()})
    diffs, bad = {}, {}
    for name, g, e, tol in zip(names, got, expected, atol):
        if g.shape != e.shape:
            raise ExportError(f"exported output {name} has shape {g.shape}, PyTorch gives {e.shape}")
        diffs[name] = _max_abs(g, e)
        if not diffs[name] <= tol:
            bad[name] = f"{diffs[name]:.2e} > {tol:.1e}"
    if check and bad:
        raise ExportError(f"ONNX Runtime output differs from PyTorch: {bad}")
    return diffs


def _to_fp16(proto):
    """float16 weights and activations, float32 input and outputs (onnxruntime's converter, then a topological sort:
    the converter appends its input casts after the nodes that read them)."""
    require("onnxruntime")
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(proto, keep_io_types=True))
    converted.topological_sort()
    return converted.model


def _quantize(proto, fp32_path: Path, mode: str, calibration_dir, processor, check_input, fp32_logits):
    """int8 quantisation with onnxruntime's tools: dynamic (weights) or static (QDQ, calibrated on images)."""
    onnx = require("onnx")
    quant = require("onnxruntime.quantization")
    tmp_q = fp32_path.with_suffix(".int8.onnx")
    # Only convolutions and matrix products are quantised: Q/DQ pairs around element-wise ops and LayerNorms cost
    # more than they save (SegFormer-B0, 1 thread: 80 ms vs 104 ms for every op, fp32 96 ms).
    ops = ["Conv", "MatMul"]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger about every non-constant bias
    try:
        if mode == "dynamic":
            quant.quantize_dynamic(str(fp32_path), str(tmp_q), weight_type=quant.QuantType.QInt8,
                                   op_types_to_quantize=ops)
            info: dict[str, Any] = {"mode": "dynamic", "weight_type": "int8", "op_types": ops}
        else:
            batches = calibration_batches(calibration_dir, processor)
            reader = _CalibrationReader(batches)
            quant.quantize_static(
                str(fp32_path), str(tmp_q), reader, quant_format=quant.QuantFormat.QDQ, per_channel=True,
                activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                calibrate_method=quant.CalibrationMethod.MinMax, op_types_to_quantize=ops,
            )
            info = {"mode": "static", "format": "QDQ", "per_channel": True, "op_types": ops,
                    "calibration_images": len(batches)}
        qproto = onnx.load(str(tmp_q))
    finally:
        root.setLevel(level)
        if tmp_q.exists():
            tmp_q.unlink()
    got = _session(qproto.SerializeToString()).run(["logits"], {"pixel_values": check_input.numpy()})[0]
    info["check_max_abs_diff"] = _max_abs(got, fp32_logits)
    info["check_mask_agreement"] = float((got.argmax(1) == fp32_logits.argmax(1)).mean())
    return qproto, info


def _calibration_files(folder) -> list[Path]:
    from openus_hub.io import find_inputs

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--calibration-dir {folder} is not a folder")
    files = find_inputs([str(folder)])
    if not files:
        raise ExportError(f"--calibration-dir {folder} has no readable images (PNG, JPEG, TIFF or DICOM)")
    return files


def calibration_batches(folder, processor) -> list[np.ndarray]:
    """Every image of ``folder`` (searched recursively; DICOM frames included) as a processed ``(1, 3, H, W)``."""
    from openus_hub.features import expand_input

    batches = []
    for path in _calibration_files(folder):
        for item in expand_input(path, dicom_crop="auto"):
            pixel_values = processor([as_rgb(item.image, processor)], return_tensors="np")["pixel_values"]
            batches.append(np.asarray(pixel_values, dtype=np.float32))
    if not batches:
        raise ExportError(f"--calibration-dir {folder} has no readable images")
    return batches


def as_rgb(image, processor):
    """A single-frame DicomImage becomes an 8-bit RGB array for processors that do not read DICOM (SegFormer's);
    other inputs, and every input of the OpenUS processor, pass through."""
    from openus_hub.io import DicomImage
    from openus_hub.models.openus import OpenUSImageProcessor

    if not isinstance(image, DicomImage) or isinstance(processor, OpenUSImageProcessor):
        return image
    frame = image.frames[0]
    if frame.dtype != np.uint8:  # keep the top 8 significant bits
        frame = (frame >> max(0, image.bit_depth - 8)).clip(0, 255).astype(np.uint8)
    return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame


class _CalibrationReader:
    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"pixel_values": batch}
