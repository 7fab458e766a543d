"""``openus-hub export-onnx MODEL --output FILE.onnx``: the command-line face of :func:`openus_hub.onnx.export_onnx`.

Exit codes: 0 written (and checked against PyTorch in ONNX Runtime); 2 nothing written (bad input, a model name that
does not resolve, missing extra).
"""

from __future__ import annotations

import argparse
import sys

from ._deps import MissingExtraError
from .export import DEFAULT_OPSET, MAX_OPSET, TASKS, ExportError


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    try:
        result = export_onnx(
            args.model, args.output, task=args.task, opset=args.opset, dynamic_batch=args.dynamic_batch,
            image_size=tuple(args.image_size) if args.image_size else None, stage_maps=args.stage_maps,
            fp16=args.fp16, quantize=args.quantize, calibration_dir=args.calibration_dir, overwrite=args.overwrite,
        )
    except (ExportError, MissingExtraError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a model name or folder that could not be read
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    diff = ", ".join(f"{k} {v:.1e}" for k, v in result.max_abs_diff.items())
    print(f"checked in ONNX Runtime against PyTorch (max abs diff): {diff}", file=sys.stderr)
    if result.quantization:
        q = result.quantization
        print(f"int8 ({q['mode']}): mask agreement with fp32 on the check input "
              f"{100 * q['check_mask_agreement']:.2f}%", file=sys.stderr)
    h, w = result.image_size
    print(f"wrote {result.path} ({result.task}, {h}x{w}, batch {'dynamic' if args.dynamic_batch else 1}, "
          f"{len(result.operators)} operator types, all default-domain) + config.json + preprocessor_config.json; "
          f"next: openus_hub.onnx.ORTModel.from_pretrained({str(result.path)!r})", file=sys.stderr)
    return 0


def add_export_onnx_subcommand(sub) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export an OpenUS model or SegFormer student to ONNX (standard operators only)",
        description="Export an OpenUS model (backbone, classification or segmentation head) or a SegFormer student "
        "folder to an .onnx graph of default-domain operators, check it in ONNX Runtime against PyTorch, and write "
        "config.json + preprocessor_config.json beside it. The image size is fixed at export; the batch size too "
        "unless --dynamic-batch. Exit codes: 0 written, 2 nothing written.",
    )
    p.add_argument("model", help="model folder (config.json + model.safetensors), registry name or Hub id "
                   "(resolved as in from_pretrained: the local HF cache first)")
    p.add_argument("--output", required=True, help="output file, .onnx")
    p.add_argument("--task", choices=TASKS, default=None, help="default: from the saved architecture")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {DEFAULT_OPSET}-{MAX_OPSET}")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension (default: batch 1)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input height and width, multiples of 32 (default: the processor's size)")
    p.add_argument("--stage-maps", action="store_true",
                   help="feature extraction: also output the four stage maps (stage_maps.0..3)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and activations (for GPU runtimes)")
    p.add_argument("--quantize", choices=["dynamic", "static"], default=None,
                   help="int8 quantisation of a SegFormer student (static needs --calibration-dir)")
    p.add_argument("--calibration-dir", default=None, help="folder of images for --quantize static")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output and the config.json / preprocessor_config.json beside it")
    p.set_defaults(func=_export)
