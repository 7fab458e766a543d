"""PyTorch vs ONNX Runtime (fp32, and int8 for SegFormer students): CPU latency at batch 1 and 8, as ratios.

    python -m benchmarks.bench_onnx                               # openus-small + SegFormer-B0 student, 224x224
    python -m benchmarks.bench_onnx --openus openus-tiny --student none --batch-sizes 1 --repeats 3   # quick
    python -m benchmarks.bench_onnx --openus path/to/folder --student path/to/student --json results.json

Every model is exported to a temporary folder with `openus_hub.onnx.export_onnx` (dynamic batch), then the PyTorch
model (OpenUS through its default scan dispatch, i.e. the fused CPU kernel when it compiles) and the ONNX Runtime
sessions get the same inputs, interleaved run by run in this one process, so that machine load hits all of them
alike; the figures are medians. The int8 student is statically quantised (QDQ, per-channel) on frames of pydicom's
echo cine. Random weights unless folders are given (latency does not depend on them). Threads: `--threads` for
both PyTorch and ONNX Runtime (default: PyTorch's default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from openus_hub.onnx import ORTModel, export_onnx


def _openus(name: str):
    from openus_hub import OPENUS_PRESETS, OpenUSConfig, OpenUSModel

    if name in OPENUS_PRESETS:
        return OpenUSModel(OpenUSConfig.from_preset(name)).eval(), name
    return name, Path(name).name  # a folder: the exporter loads it


def _student(name: str):
    if name in ("b0", "b1", "b2"):
        from transformers import SegformerForSemanticSegmentation

        from training.kd.student import segformer_config

        return SegformerForSemanticSegmentation(segformer_config(name, num_labels=2)).eval(), f"segformer-{name}"
    return name, Path(name).name


def write_echo_frames(folder: Path, count: int = 8) -> Path:
    """``count`` frames of pydicom's echo cine (``ybr_color``) as PNG files, for calibration."""
    from PIL import Image
    from pydicom import examples

    frames = examples.ybr_color.pixel_array  # (T, H, W, 3) RGB
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(frames[i * len(frames) // count]).save(folder / f"frame{i:02d}.png")
    return folder


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def bench(entries: dict, batch_sizes: list[int], size: tuple[int, int], repeats: int, warmup: int) -> dict:
    """entries: name -> callable(batch) ; returns {batch: {name: median ms}} with interleaved runs."""
    results = {}
    for batch in batch_sizes:
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        times: dict[str, list[float]] = {name: [] for name in entries}
        for i in range(warmup + repeats):
            for name, fn in entries.items():
                t = _time(lambda: fn(x))
                if i >= warmup:
                    times[name].append(t)
        results[batch] = {name: statistics.median(v) for name, v in times.items()}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--openus", default="openus-small", help="OpenUS preset or folder; 'none' to skip")
    p.add_argument("--student", default="b0", help="SegFormer preset (b0/b1/b2) or student folder; 'none' to skip")
    p.add_argument("--image-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="threads for PyTorch and ONNX Runtime")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    size = tuple(args.image_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    report: dict = {"threads": threads, "image_size": list(size), "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_onnx.") as tmp:
        tmp = Path(tmp)
        jobs = []
        if args.openus != "none":
            model, label = _openus(args.openus)
            jobs.append((label, model, None))
        if args.student != "none":
            model, label = _student(args.student)
            jobs.append((label, model, write_echo_frames(tmp / "calibration")))
        for label, model, calibration in jobs:
            folder = tmp / label
            folder.mkdir()
            t0 = time.perf_counter()
            fp32 = export_onnx(model, folder / "model.onnx", image_size=size, dynamic_batch=True)
            export_s = time.perf_counter() - t0
            torch_model = model if isinstance(model, torch.nn.Module) else _load_torch(model, fp32.task)
            torch_model.eval()
            entries = {"pytorch": _torch_fn(torch_model),
                       "ort_fp32": _ort_fn(ORTModel(fp32.path, session_options=options))}
            info = {"task": fp32.task, "export_s": round(export_s, 1), "export_max_abs_diff": fp32.max_abs_diff}
            if calibration is not None:
                qfolder = tmp / f"{label}-int8"
                qfolder.mkdir()
                int8 = export_onnx(model, qfolder / "model.onnx", image_size=size, dynamic_batch=True,
                                   quantize="static", calibration_dir=calibration)
                entries["ort_int8"] = _ort_fn(ORTModel(int8.path, session_options=options))
                info["int8_check"] = int8.quantization
            print(f"{label}: exported in {export_s:.1f} s; timing {', '.join(entries)} at batch "
                  f"{args.batch_sizes} ({threads} threads)...", file=sys.stderr)
            with torch.inference_mode():
                ms = bench(entries, args.batch_sizes, size, args.repeats, args.warmup)
            info["latency_ms"] = ms
            info["ratios"] = {
                b: {f"{k}/pytorch": v / row["pytorch"] for k, v in row.items() if k != "pytorch"}
                | ({"ort_int8/ort_fp32": row["ort_int8"] / row["ort_fp32"]} if "ort_int8" in row else {})
                for b, row in ms.items()
            }
            report["models"][label] = info
    print(f"\nmedian latency (ms), {threads} threads, {size[0]}x{size[1]}, {args.repeats} interleaved repeats")
    print("| model | batch | PyTorch | ORT fp32 | ORT int8 | ORT fp32 / PyTorch | ORT int8 / ORT fp32 |")
    print("|---|---|---|---|---|---|---|")
    for label, info in report["models"].items():
        for b, row in info["latency_ms"].items():
            r = info["ratios"][b]
            int8 = f"{row['ort_int8']:.1f}" if "ort_int8" in row else "-"
            q = f"{r['ort_int8/ort_fp32']:.2f}x" if "ort_int8/ort_fp32" in r else "-"
            print(f"| {label} | {b} | {row['pytorch']:.1f} | {row['ort_fp32']:.1f} | {int8} | "
                  f"{r['ort_fp32/pytorch']:.2f}x | {q} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _load_torch(folder: str, task: str):
    import openus_hub.auto as auto

    loader = {"feature-extraction": auto.AutoModel, "image-classification": auto.AutoModelForImageClassification,
              "semantic-segmentation": auto.AutoModelForSemanticSegmentation}[task]
    return loader.from_pretrained(folder)


def _torch_fn(model):
    return lambda x: model(pixel_values=x)


def _ort_fn(model: ORTModel):
    return lambda x: model.run(x.numpy())


if __name__ == "__main__":
    sys.exit(main())
