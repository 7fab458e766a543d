"""Teacher vs distilled student: parameters, FLOPs (TransKD README convention) and CPU/GPU latency, as ratios.

    python -m benchmarks.bench_students                       # SegFormer-B2 -> B0 at 512x1024 (TransKD)
    python -m benchmarks.bench_students --teacher openus-tiny --latency-size 256 256
    python -m benchmarks.bench_students --student EXPORTED --teacher TEACHER

FLOPs: module multiply-accumulates (Conv/Linear/norms) at 1x3x512x1024, without attention matmuls or bilinear
upsampling, counted by `training.kd.flops` (TransKD reports B2 113.84 G, B0 13.67 G). KD-module rows give the
training-time totals (student + CSF/PEA/GL/EA) as the TransKD README does. Latency: median of `--repeats` forward
passes after warm-up, batch 1, eval, no_grad, on `--device`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import SegformerForSemanticSegmentation

from training.kd.distiller import TransKDModules
from training.kd.flops import count_flops, count_parameters
from training.kd.student import segformer_config

TRANSKD_README_GFLOPS = {"b2": 113.84, "b0": 13.67}


def build(name: str, num_labels: int = 20):
    if name in ("b0", "b1", "b2"):
        return SegformerForSemanticSegmentation(segformer_config(name, num_labels=num_labels))
    if name.startswith("openus-"):
        from openus_hub import OPENUS_PRESETS, OpenUSConfig, OpenUSForSemanticSegmentation

        return OpenUSForSemanticSegmentation(OpenUSConfig(**OPENUS_PRESETS[name], num_labels=num_labels))
    from transformers import AutoModelForSemanticSegmentation

    try:
        import openus_hub  # noqa: F401  (registers OpenUS with the Auto classes)
    except ImportError:
        pass
    return AutoModelForSemanticSegmentation.from_pretrained(name)


def gflops(name: str, model_builder, shape=(1, 3, 512, 1024)) -> float:
    if name in ("b0", "b1", "b2"):
        with torch.device("meta"):
            return count_flops(model_builder(), shape, device="meta") / 1e9
    # exact scaling: every module's MACs are proportional to the pixel count when all stage sizes divide evenly
    small = (shape[0], shape[1], shape[2] // 8, shape[3] // 8)
    return 64 * count_flops(model_builder(), small) / 1e9


@torch.no_grad()
def latency_ms(model, size, device, repeats: int, warmup: int = 2) -> float:
    model = model.to(device).eval()
    x = torch.rand(1, 3, *size, device=device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="b2", help="b0/b1/b2, openus-tiny/small/base, or a folder")
    p.add_argument("--student", default="b0", help="b0/b1/b2 or an exported folder")
    p.add_argument("--num-labels", type=int, default=20)
    p.add_argument("--latency-size", type=int, nargs=2, default=[512, 1024])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-latency", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    result: dict = {"flop_input": [1, 3, 512, 1024], "latency_input": [1, 3, *args.latency_size], "device": str(device)}
    teacher, student = build(args.teacher, args.num_labels), build(args.student, args.num_labels)
    for role, name, model in (("teacher", args.teacher, teacher), ("student", args.student, student)):
        result[role] = {"name": name, "params": count_parameters(model),
                        "gflops": gflops(name, lambda m=model, n=name: build(n, args.num_labels) if n in ("b0", "b1", "b2") else m)}
        if name in TRANSKD_README_GFLOPS:
            ref = TRANSKD_README_GFLOPS[name]
            result[role]["transkd_readme_gflops"] = ref
            result[role]["rel_diff_vs_readme"] = (result[role]["gflops"] - ref) / ref
    s_ch, t_ch = list(student.config.hidden_sizes), list(teacher.config.hidden_sizes)
    result["kd_training_params"] = {
        v: result["student"]["params"] + count_parameters(TransKDModules(s_ch, t_ch, v)) for v in ("base", "gl", "ea")
    }
    result["ratios"] = {
        "params": result["student"]["params"] / result["teacher"]["params"],
        "gflops": result["student"]["gflops"] / result["teacher"]["gflops"],
    }
    if not args.no_latency:
        for role, model in (("teacher", teacher), ("student", student)):
            result[role]["latency_ms"] = latency_ms(model, args.latency_size, device, args.repeats)
        result["ratios"]["latency"] = result["student"]["latency_ms"] / result["teacher"]["latency_ms"]
        result["ratios"]["speedup"] = 1.0 / result["ratios"]["latency"]

    print(f"{'':10s} {'params':>12s} {'GFLOPs@512x1024':>16s} {'latency ms':>11s}")
    for role in ("teacher", "student"):
        r = result[role]
        print(f"{role + ' ' + r['name']:10s} {r['params']:12,d} {r['gflops']:16.2f} {r.get('latency_ms', float('nan')):11.1f}")
    rat = result["ratios"]
    print(f"student/teacher: params {rat['params']:.3f}, FLOPs {rat['gflops']:.3f}"
          + (f", latency {rat['latency']:.3f} ({rat['speedup']:.2f}x faster) on {device}" if "latency" in rat else ""))
    print("training-time totals (student + KD modules): " + json.dumps(result["kd_training_params"]))
    return result


if __name__ == "__main__":
    main()
