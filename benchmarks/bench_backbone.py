"""Forward-pass benchmark of the OpenUS backbone on this machine's CPU (or a GPU with --device cuda).

Compares, interleaved in one run so that machine noise hits all of them alike:

* ``openus-small``: our model with the automatic scan path (fused C++ kernel on CPU, mamba-ssm on CUDA);
* ``convnext-small``: transformers' ConvNeXt-Small (depths 3,3,27,3; ~50 M parameters, 8.7 GFLOPs: the same budget);
* ``openus-small-naive``: our model with the sequential pure-PyTorch reference scan (a Python loop over L).

All models are randomly initialised (weights do not change the speed). Prints medians, ratios to ConvNeXt-Small and
the peak resident memory of one forward (measured in a fresh subprocess per model and batch size).

    python benchmarks/bench_backbone.py                      # batch 1 and 8 at 224x224
    python benchmarks/bench_backbone.py --device cuda --dtype bfloat16 --batch-sizes 64 --skip-naive
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import ConvNextConfig, ConvNextModel

from openus_hub import OpenUSConfig, OpenUSModel

TARGETS = {1: 1.5, 8: 2.0}  # openus-small / convnext-small forward time (issue #2)


def build(name: str) -> torch.nn.Module:
    if name == "convnext-small":
        return ConvNextModel(ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768]))
    if name == "openus-small":
        return OpenUSModel(OpenUSConfig.from_preset("openus-small"))
    if name == "openus-small-naive":
        return OpenUSModel(OpenUSConfig.from_preset("openus-small", scan_implementation="reference"))
    raise ValueError(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_models(names, batch, size, rounds, warmup, device, dtype) -> dict[str, list[float]]:
    models = {n: build(n).to(device=device, dtype=dtype).eval() for n in names}
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        _sync(device)
        for _ in tqdm(range(rounds), desc=f"batch {batch}", leave=False):
            for name, model in models.items():  # interleaved: one forward of each model per round
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def peak_memory_mb(name: str, batch: int, size: int, device: str, dtype: str) -> float:
    """Peak extra memory of one forward, in a fresh process.

    CUDA: max allocated minus the model. CPU: the peak resident set during the forward minus the resident set before
    it (Linux: the high-water mark is reset through /proc/self/clear_refs first); -1 where that is unavailable.
    """
    code = (
        "import torch;"  # run with cwd = the repository root: `python -c` puts it first on the path
        "from benchmarks.bench_backbone import build, _rss_kb;"
        "d = torch.device(%r); dt = getattr(torch, %r);"
        "m = build(%r).to(device=d, dtype=dt).eval(); x = torch.randn(%d, 3, %d, %d, device=d, dtype=dt);"
        "cuda = d.type == 'cuda';"
        "torch.cuda.reset_peak_memory_stats() if cuda else None;"
        "base = torch.cuda.memory_allocated() if cuda else _rss_kb(reset=True)[0] * 1024;"
        "torch.inference_mode()(m)(x);"
        "peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb()[1] * 1024;"
        "print((peak - base) / 2**20 if base >= 0 else -1)"
    ) % (device, dtype, name, batch, size, size)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_kb(reset: bool = False) -> tuple[int, int]:
    """(current, peak) resident set size in KiB from /proc/self/status; reset=True first resets the peak."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return -1, -1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, nargs="+", default=None, help="timed rounds per batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-naive", action="store_true", help="leave out the sequential reference scan (slow)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = ["openus-small", "convnext-small"] + ([] if args.skip_naive else ["openus-small-naive"])
    rounds = args.rounds or [7 if b == 1 else 3 for b in args.batch_sizes]
    results = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
               "image_size": args.image_size, "torch": torch.__version__, "batches": {}}
    print(f"# device {device}, {args.dtype}, {torch.get_num_threads()} threads, {args.image_size}x{args.image_size}")
    for batch, n_rounds in zip(args.batch_sizes, rounds):
        times = time_models(names, batch, args.image_size, n_rounds, args.warmup, device, dtype)
        med = {n: statistics.median(t) for n, t in times.items()}
        base = med["convnext-small"]
        entry = {}
        for name in names:
            entry[name] = {"median_s": med[name], "images_per_s": batch / med[name], "ratio_to_convnext": med[name] / base,
                           "all_s": times[name]}
            if not args.skip_memory:
                entry[name]["peak_memory_mb"] = peak_memory_mb(name, batch, args.image_size, args.device, args.dtype)
        results["batches"][batch] = entry
        print(f"\n## batch {batch} ({n_rounds} interleaved rounds, medians)")
        print(f"{'model':22s} {'median ms':>10s} {'img/s':>8s} {'x convnext':>10s} {'peak MB':>8s}")
        for name in names:
            e = entry[name]
            mem = f"{e['peak_memory_mb']:8.0f}" if "peak_memory_mb" in e else f"{'-':>8s}"
            print(f"{name:22s} {e['median_s'] * 1e3:10.1f} {e['images_per_s']:8.2f} {e['ratio_to_convnext']:10.2f} {mem}")
        if "openus-small-naive" in med:
            print(f"fused scan speed-up over the naive sequential scan: {med['openus-small-naive'] / med['openus-small']:.2f}x")
        if device.type == "cpu" and batch in TARGETS:
            ratio = entry["openus-small"]["ratio_to_convnext"]
            verdict = "meets" if ratio <= TARGETS[batch] else "misses"
            print(f"target openus-small <= {TARGETS[batch]}x convnext-small at batch {batch}: {ratio:.2f}x ({verdict})")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.output + ".tmp", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
