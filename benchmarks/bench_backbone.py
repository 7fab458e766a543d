"""Backbone benchmark: OpenUS against ConvNeXt-Small on this machine's CPU (or a GPU with --device cuda).

Models (randomly initialised; weights do not change the speed), timed interleaved in one run so that machine noise hits
all of them alike:

* ``openus-small``: our model with the automatic scan path (fused C++ kernel on CPU, mamba-ssm or Triton on CUDA);
* ``convnext-small``: transformers' ConvNeXt-Small (depths 3,3,27,3; ~50 M parameters, 8.7 GFLOPs: the same budget);
* ``openus-small-naive``: our model with the sequential pure-PyTorch reference scan (a Python loop over L);
* ``openus-small-triton`` / ``openus-small-mamba``: the Triton / mamba-ssm scan explicitly (CUDA).

Modes:

* default: forward (inference) at batch 1 and 8; medians, ratios to ConvNeXt-Small and peak memory of one forward
  (measured in a fresh subprocess per model and batch size);
* ``--train``: the training step, forward + backward (loss = mean square of the pooled output), at batch 8 by
  default; stochastic depth off in both models (it changes which samples a block sees, hardly the cost);
* ``--first-use``: fresh interpreters with an empty kernel cache (a temporary ``OPENUS_HUB_KERNEL_CACHE``): time to
  build, then to load, the CPU kernel, and the time from the first import to the first output at 224x224, batch 1,
  for openus-small (empty cache, then built cache) and for ConvNeXt-Small (import transformers, build, first output).

    python benchmarks/bench_backbone.py                      # forward, batch 1 and 8 at 224x224
    python benchmarks/bench_backbone.py --train              # training step, batch 8
    python benchmarks/bench_backbone.py --first-use          # first use from an empty kernel cache
    python benchmarks/bench_backbone.py --device cuda --dtype bfloat16 --batch-sizes 64 \\
        --models openus-small-triton openus-small-mamba convnext-small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm.auto import tqdm
from transformers import ConvNextConfig, ConvNextModel

from openus_hub import OpenUSConfig, OpenUSModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# openus-small / convnext-small time on a CPU (issue #10): forward at batch 1 and 8, training step at batch 8
TARGETS = {"forward": {1: 1.15, 8: 1.15}, "train": {8: 1.15}}
# first use (issue #10): seconds openus-small may exceed ConvNeXt-Small from the first import to the first output
FIRST_USE_TARGETS = {"empty kernel cache": 5.0, "built kernel cache": 1.5}
SCANS = {"openus-small": "auto", "openus-small-naive": "reference", "openus-small-triton": "triton",
         "openus-small-mamba": "mamba_ssm"}


def build(name: str, train: bool = False) -> torch.nn.Module:
    drop = {"drop_path_rate": 0.0} if train else {}
    if name == "convnext-small":
        return ConvNextModel(ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768], **drop))
    if name in SCANS:
        return OpenUSModel(OpenUSConfig.from_preset("openus-small", scan_implementation=SCANS[name], **drop))
    raise ValueError(f"unknown model {name!r}; choose from {['convnext-small', *SCANS]}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool) -> None:
    if not train:
        model(x)
        return
    model(x).pooler_output.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def time_models(names, batch, size, rounds, warmup, device, dtype, train=False) -> dict[str, list[float]]:
    models = {n: build(n, train).to(device=device, dtype=dtype).train(train) for n in names}
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    times = {n: [] for n in names}
    with torch.inference_mode(not train):
        for model in models.values():
            for _ in range(warmup):
                _step(model, x, train)
        _sync(device)
        for _ in tqdm(range(rounds), desc=f"batch {batch}", leave=False):
            for name, model in models.items():  # interleaved: one step of each model per round
                _sync(device)
                start = time.perf_counter()
                _step(model, x, train)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def peak_memory_mb(name: str, batch: int, size: int, device: str, dtype: str, train: bool = False) -> float:
    """Peak extra memory of one forward (or training step), in a fresh process.

    CUDA: max allocated minus the model. CPU: the peak resident set during the step minus the resident set before
    it (Linux: the high-water mark is reset through /proc/self/clear_refs first); -1 where that is unavailable.
    """
    code = (
        "import torch;"  # run with cwd = the repository root: `python -c` puts it first on the path
        "from benchmarks.bench_backbone import build, _rss_kb, _step;"
        "d = torch.device(%r); dt = getattr(torch, %r); train = %r;"
        "m = build(%r, train).to(device=d, dtype=dt).train(train); x = torch.randn(%d, 3, %d, %d, device=d, dtype=dt);"
        "cuda = d.type == 'cuda';"
        "torch.cuda.reset_peak_memory_stats() if cuda else None;"
        "base = torch.cuda.memory_allocated() if cuda else _rss_kb(reset=True)[0] * 1024;"
        "torch.inference_mode(not train)(_step)(m, x, train);"
        "peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb()[1] * 1024;"
        "print((peak - base) / 2**20 if base >= 0 else -1)"
    ) % (device, dtype, train, name, batch, size, size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
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


# --- first use -------------------------------------------------------------------------------------------------

# Each snippet runs in a fresh interpreter; t0 is taken before the first import.
_FIRST_OUTPUT = {
    "openus-small": (
        "from openus_hub import OpenUSConfig, OpenUSModel\n"
        "model = OpenUSModel(OpenUSConfig.from_preset('openus-small')).eval()\n"
    ),
    "convnext-small": (
        "from transformers import ConvNextConfig, ConvNextModel\n"
        "model = ConvNextModel(ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768])).eval()\n"
    ),
}
_TEMPLATE = (
    "import time\nt0 = time.perf_counter()\nimport json, torch\n{body}"
    "with torch.inference_mode():\n    model(torch.randn(1, 3, {size}, {size}))\n"
    "print('RESULT', json.dumps({{'seconds': time.perf_counter() - t0}}))\n"
)
_KERNEL = (
    "import json, time\nfrom openus_hub.ops.build import load_library\nt0 = time.perf_counter()\nlib = load_library()\n"
    "print('RESULT', json.dumps({'seconds': time.perf_counter() - t0, 'built': lib.built, 'path': str(lib.path)}))\n"
)


def _fresh(code: str, cache: str) -> dict:
    env = dict(os.environ, OPENUS_HUB_KERNEL_CACHE=cache)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"first-use run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def first_use(size: int) -> dict:
    """Fresh interpreters, temporary kernel caches (the user's cache is not touched)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="openus-kernel-cache-") as tmp:
        _fresh(_TEMPLATE.format(body=_FIRST_OUTPUT["convnext-small"], size=size), os.path.join(tmp, "warm-up"))
        results["kernel build (empty cache)"] = _fresh(_KERNEL, os.path.join(tmp, "a"))
        results["kernel load (built cache)"] = _fresh(_KERNEL, os.path.join(tmp, "a"))
        cache = os.path.join(tmp, "b")
        results["openus-small, empty kernel cache"] = _fresh(_TEMPLATE.format(body=_FIRST_OUTPUT["openus-small"],
                                                                              size=size), cache)
        results["openus-small, built kernel cache"] = _fresh(_TEMPLATE.format(body=_FIRST_OUTPUT["openus-small"],
                                                                              size=size), cache)
        results["convnext-small"] = _fresh(_TEMPLATE.format(body=_FIRST_OUTPUT["convnext-small"], size=size), cache)
    for value in results.values():
        value.pop("path", None)  # a temporary folder: nothing to report
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 (forward), 8 (--train)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, nargs="+", default=None, help="timed rounds per batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"models to time (default: openus-small convnext-small openus-small-naive); any of "
                        f"{['convnext-small', *SCANS]}")
    p.add_argument("--skip-naive", action="store_true", help="leave out the sequential reference scan (slow)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--train", action="store_true", help="time the training step (forward + backward)")
    p.add_argument("--first-use", action="store_true",
                   help="fresh interpreters with an empty kernel cache: kernel build/load and import-to-first-output")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "image_size": args.image_size, "torch": torch.__version__,
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.first_use:
        results["first_use"] = first_use(args.image_size)
        print(f"# first use: fresh interpreters, {args.image_size}x{args.image_size}, batch 1 "
              f"(torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')})")
        for name, r in results["first_use"].items():
            extra = f" (built: {r['built']})" if "built" in r else ""
            print(f"{name:36s} {r['seconds']:7.2f} s   (whole process {r['process_seconds']:6.2f} s){extra}")
        base = results["first_use"]["convnext-small"]["seconds"]
        for cache, limit in FIRST_USE_TARGETS.items():
            extra = results["first_use"][f"openus-small, {cache}"]["seconds"] - base
            verdict = "meets" if extra <= limit else "misses"
            print(f"target openus-small <= convnext-small + {limit:.1f} s ({cache}): +{extra:.2f} s ({verdict})")
    else:
        run_benchmark(args, results)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.output + ".tmp", args.output)
        print(f"wrote {args.output}")
    return 0


def run_benchmark(args, results: dict) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    mode = "train" if args.train else "forward"
    names = args.models or (["openus-small", "convnext-small"] + ([] if args.skip_naive else ["openus-small-naive"]))
    batch_sizes = args.batch_sizes or ([8] if args.train else [1, 8])
    rounds = args.rounds or [7 if b == 1 else 3 for b in batch_sizes]
    results.update(mode=mode, batches={})
    what = "training step (forward + backward)" if args.train else "forward"
    print(f"# {what}: device {device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.image_size}x{args.image_size}, torch {torch.__version__}, {results['measured_at']}")
    for batch, n_rounds in zip(batch_sizes, rounds):
        times = time_models(names, batch, args.image_size, n_rounds, args.warmup, device, dtype, args.train)
        med = {n: statistics.median(t) for n, t in times.items()}
        base = med.get("convnext-small")
        entry = {}
        for name in names:
            entry[name] = {"median_s": med[name], "images_per_s": batch / med[name], "all_s": times[name]}
            if base:
                entry[name]["ratio_to_convnext"] = med[name] / base
            if not args.skip_memory:
                entry[name]["peak_memory_mb"] = peak_memory_mb(name, batch, args.image_size, args.device, args.dtype,
                                                               args.train)
        results["batches"][batch] = entry
        print(f"\n## batch {batch} ({n_rounds} interleaved rounds, medians)")
        print(f"{'model':22s} {'median ms':>10s} {'img/s':>8s} {'x convnext':>10s} {'peak MB':>8s}")
        for name in names:
            e = entry[name]
            mem = f"{e['peak_memory_mb']:8.0f}" if "peak_memory_mb" in e else f"{'-':>8s}"
            ratio = f"{e['ratio_to_convnext']:10.2f}" if "ratio_to_convnext" in e else f"{'-':>10s}"
            print(f"{name:22s} {e['median_s'] * 1e3:10.1f} {e['images_per_s']:8.2f} {ratio} {mem}")
        if "openus-small-naive" in med and "openus-small" in med:
            speed_up = med["openus-small-naive"] / med["openus-small"]
            print(f"fused scan speed-up over the naive sequential scan: {speed_up:.2f}x")
        target = TARGETS[mode].get(batch)
        if device.type == "cpu" and target and base and "openus-small" in entry:
            ratio = entry["openus-small"]["ratio_to_convnext"]
            verdict = "meets" if ratio <= target else "misses"
            print(f"target openus-small <= {target}x convnext-small ({mode}, batch {batch}): {ratio:.2f}x ({verdict})")


if __name__ == "__main__":
    sys.exit(main())
