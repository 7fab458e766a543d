"""Corrupt, truncated and edited checkpoints through both converters: a one-line error naming the file, or (for a
change that does not alter any weight, e.g. a zip field readers ignore) exactly the clean conversion."""

import importlib.util
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from conversion import convert_openus_to_hf as openus_conv
from conversion import convert_transkd_to_hf as transkd_conv
from conversion._common import sha256_file
from tests.conftest import parity_path
from tests.robustness.conftest import record

FRACTIONS = (0.001, 0.02, 0.2, 0.4, 0.6, 0.8, 0.98, 0.9999)


def _truncate(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def _flip(data: bytes, fraction: float) -> bytes:
    out = bytearray(data)
    at = min(len(out) - 1, int(len(out) * fraction))
    out[at] ^= 0x10
    return bytes(out)


def _random_bytes(data: bytes, fraction: float) -> bytes:
    out = bytearray(data)
    at = min(len(out) - 64, int(len(out) * fraction))
    out[at: at + 64] = random.Random(at).randbytes(64)
    return bytes(out)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Clean inputs and their clean conversions (model.safetensors tensors) for both converters."""
    root = tmp_path_factory.mktemp("clean")
    spec = importlib.util.spec_from_file_location("transkd_materialize", parity_path("transkd", "materialize.py"))
    mat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mat)
    b0 = root / "b0.pth"
    torch.save(mat.build(parity_path("transkd", "b0", "state_dict.pth.recipe.json")), b0)
    inputs = {
        "openus checkpoint": (str(parity_path("openus", "cfg_a", "checkpoint.pth")), openus_conv, []),
        "openus safetensors": (str(parity_path("openus", "cfg_a", "teacher_backbone.safetensors")), openus_conv, []),
        "transkd b0": (str(b0), transkd_conv, ["--variant", "b0"]),
    }
    clean = {}
    for name, (path, conv, extra) in inputs.items():
        out = root / name.replace(" ", "_")
        assert conv.main(["--checkpoint", path, "--output-dir", str(out), "--no-card", *extra]) == 0
        clean[name] = load_file(out / "model.safetensors")
    return inputs, clean


def _edited_state(path, conv, edit):
    if path.endswith(".safetensors"):
        state = dict(load_file(path))
    else:
        state = openus_conv.load_checkpoint(path) if conv is openus_conv else torch.load(path, weights_only=True)
    return edit(state)


def _first(state, suffix, prefer=""):
    """The first key of a state (or of its teacher) ending with ``suffix``; returns (container, key)."""
    container = state["teacher"] if "teacher" in state else state
    key = next(k for k in sorted(container) if k.endswith(suffix) and prefer in k)
    return container, key


def _set(suffix, fn, prefer=""):
    def edit(state):
        container, key = _first(state, suffix, prefer)
        container[key] = fn(container[key])
        return state
    return edit


def _drop(prefix_in_key):
    def edit(state):
        container = state["teacher"] if "teacher" in state else state
        for key in [k for k in container if prefix_in_key in k]:
            del container[key]
        return state
    return edit


EDITS = {  # name -> (edit, expected: "error" or "same" = the clean conversion)
    "int64 weight": (_set("weight", lambda t: t.long(), "norm"), "error"),
    "bool weight": (_set("weight", lambda t: t > 0, "norm"), "error"),
    "int8 weight": (_set("weight", lambda t: t.to(torch.int8), "norm"), "error"),
    "float64 weight": (_set("weight", lambda t: t.double(), "norm"), "same"),
    "nan weight": (_set("bias", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), "error"),
    "inf weight": (_set("bias", lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))), "error"),
    "1-D conv weight": (_set("weight", lambda t: t.flatten(), "patch_embed"), "error"),
    "0-D weight": (_set("bias", lambda t: t[0]), "error"),
    "transposed weight": (_set("fc1.weight", lambda t: t.t().contiguous()), "error"),
    "missing first block": (_drop("layers.1.blocks.0."), "error"),
    "missing tensor": (_drop("layers.0.blocks.0.norm2.weight"), "error"),
    "unknown extra key": (lambda s: (s.get("teacher", s).__setitem__("backbone.extra.weight" if "teacher" in s
                                                                     else "extra.weight", torch.zeros(3)), s)[1],
                          "error"),
}


def _case_ids():
    cases = []
    for source in ("openus checkpoint", "openus safetensors", "transkd b0"):
        for fraction in FRACTIONS:
            cases.append((source, f"truncated at {fraction:.2%}", "truncate", fraction))
            cases.append((source, f"bit flip at {fraction:.2%}", "flip", fraction))
        for fraction in (0.3, 0.7):
            cases.append((source, f"64 random bytes at {fraction:.0%}", "random", fraction))
        for name in EDITS:
            cases.append((source, name, "edit", name))
    return cases


CASES = _case_ids()


@pytest.mark.parametrize("source,name,kind,arg", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_corrupt_checkpoint(sources, tmp_path, capsys, source, name, kind, arg):
    inputs, clean = sources
    path, conv, extra = inputs[source]
    expected = "error"
    suffix = ".safetensors" if path.endswith(".safetensors") else ".pth"
    bad = tmp_path / f"damaged{suffix}"
    data = open(path, "rb").read()
    if kind == "edit":
        edit, expected = EDITS[arg]
        if source.startswith("transkd"):
            edit = {"1-D conv weight": _set("weight", lambda t: t.flatten(), "patch_embed1.proj"),
                    "missing first block": _drop("block2.0."), "missing tensor": _drop("block1.0.norm2.weight"),
                    "unknown extra key": lambda s: (s.__setitem__("extra.weight", torch.zeros(3)), s)[1]
                    }.get(arg, edit)
        state = _edited_state(path, conv, edit)
        if suffix == ".safetensors":
            save_file(state, str(bad))
        else:
            torch.save(state, bad)
    else:
        bad.write_bytes({"truncate": _truncate, "flip": _flip, "random": _random_bytes}[kind](data, arg))
    sha = []
    if suffix == ".safetensors" and kind in ("flip", "random"):
        sha = ["--expect-sha256", sha256_file(path)]  # safetensors has no checksum of its own: the published sha256
    out = tmp_path / "out"
    group = f"corrupt checkpoints: {source}"
    try:
        code = conv.main(["--checkpoint", str(bad), "--output-dir", str(out), "--no-card", *extra, *sha])
    except Exception as err:  # noqa: BLE001 - any exception escaping main is a crash
        record(group, "crash")
        raise AssertionError(f"{type(err).__name__}: {err}") from err
    err = capsys.readouterr().err.strip().splitlines()
    if code == 2:
        lines = [ln for ln in err if ln.startswith("error: ")]
        clear = len(lines) == 1 and str(bad) in lines[0]
        record(group, "clear error" if clear else "crash")
        assert clear, err
        assert not os.path.exists(out)
        return
    if code != 0:
        record(group, "crash")
        raise AssertionError(f"exit {code}: {err}")
    got = load_file(out / "model.safetensors")
    same = got.keys() == clean[source].keys() and all(torch.equal(got[k], clean[source][k]) for k in got)
    outcome = record(group, "result" if same else "silent wrong result")
    assert outcome == "result", f"{name} converted with exit 0 to different weights"
