"""training/common: strict configuration everywhere, checkpoint I/O, and the package layout rules (one of each helper,
no import cycle, no sys.path edits, comments that do not point outside the repository)."""

import ast
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.common.checkpoint import (CheckpointError, atomic_torch_save, atomic_write_text, load_checkpoint,
                                        save_checkpoint)
from training.common.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"


# ---------------------------------------------------------------------------------------------------------------------
# configuration


def _loaders():
    from training.distill import load_distill_config
    from training.downstream_config import load_downstream_config
    from training.pretrain import load_pretrain_config

    def benchmark(path, overrides=()):
        from training.benchmark.cli import DEFAULTS, _check_types

        cfg = load_config(path, overrides, defaults=DEFAULTS)
        _check_types(cfg, DEFAULTS)
        return cfg

    return {
        "benchmark": benchmark,
        "pretrain": load_pretrain_config,
        "distill": load_distill_config,
        "classification": lambda path, overrides=(): load_downstream_config("classification", path, overrides),
        "segmentation": lambda path, overrides=(): load_downstream_config("segmentation", path, overrides),
    }


def _job_of(path: Path) -> str:
    if path.parent.name == "benchmark":
        return "benchmark"
    if path.parent.name == "distill":
        return "distill"
    if path.parent.name == "downstream":
        return "segmentation" if "seg" in path.stem else "classification"
    return "pretrain"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads_strictly(path):
    cfg = _loaders()[_job_of(path)](path)
    assert isinstance(cfg, dict) and cfg


@pytest.mark.parametrize("job,config,section", [
    ("pretrain", "debug_cpu.yaml", "train"),
    ("distill", "distill/debug_cpu.yaml", "train"),
    ("segmentation", "downstream/debug_cpu_seg.yaml", "train"),
    ("classification", "downstream/debug_cpu_linear.yaml", "train"),
])
def test_unknown_key_in_a_file_is_one_line_naming_key_and_file(tmp_path, job, config, section):
    text = (CONFIGS / config).read_text()
    bad = tmp_path / "typo.yaml"
    bad.write_text(text + f"\n{section}_extra_section: 1\n")
    with pytest.raises(ConfigError) as err:
        _loaders()[job](bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and f"'{section}_extra_section'" in msg, msg
    # a typo inside a section: the closest known key is suggested
    with pytest.raises(ConfigError) as err:
        _loaders()[job](CONFIGS / config, ["train.max_step=3"])
    msg = str(err.value)
    assert "\n" not in msg and "'train.max_step'" in msg and "did you mean 'train.max_steps'" in msg, msg
    assert "command-line override 'train.max_step=3'" in msg


def test_sections_values_and_free_mappings(tmp_path):
    defaults = {"model": {"overrides": {}, "init_from": None}, "train": {"lr": 0.1, "betas": [0.9, 0.99]}}
    cfg = load_config(None, ["model.overrides.embed_dim=8", "model.overrides.depths=[1,1,1,2]",
                             "model.init_from={a: 1}", "train.betas=[0.5,0.5]"],
                      defaults=defaults, free=("model.overrides",))
    assert cfg["model"]["overrides"] == {"embed_dim": 8, "depths": [1, 1, 1, 2]}
    assert cfg["model"]["init_from"] == {"a": 1} and cfg["train"]["betas"] == [0.5, 0.5]
    assert defaults["model"]["overrides"] == {}  # the defaults are never modified
    for bad, needle in (["train=3"], "is a section"), (["train.lr={x: 1}"], "not a mapping"), \
            (["model.overrides=3"], "must be a mapping"), (["train.lr"], "not key=value"), \
            (["train.lr=[1,"], "not valid YAML"):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(None, bad, defaults=defaults, free=("model.overrides",))
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing, defaults=defaults)


@pytest.mark.parametrize("module,config", [
    ("training.pretrain", "debug_cpu.yaml"),
    ("training.distill", "distill/debug_cpu.yaml"),
    ("training.finetune_segmentation", "downstream/debug_cpu_seg.yaml"),
    ("training.linear_probe", "downstream/debug_cpu_linear.yaml"),
])
def test_entry_points_exit_2_with_one_line_on_a_typo(tmp_path, module, config):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", module, "--config", str(CONFIGS / config), "--output-dir",
                           str(tmp_path / "out"), "trian.max_steps=1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'trian'" in lines[0], proc.stderr
    assert "did you mean 'train'" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the configuration is valid


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint I/O


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "config.yaml", "old\n")
    assert path.read_text() == "old\n"

    class Bad:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Bad()}, path)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temporary file left behind


class Payload:  # any class outside the weights_only allowlist: never unpickled by load_checkpoint
    pass


def test_load_checkpoint_is_weights_only_and_errors_name_the_file(tmp_path):
    good = save_checkpoint({"step": 3, "w": torch.ones(2), "cfg": {"a": [1, "b", None]}}, tmp_path / "good.pth")
    state = load_checkpoint(good)
    assert state["step"] == 3 and torch.equal(state["w"], torch.ones(2))

    torch.save({"obj": Payload()}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError) as err:  # no checksum file: nothing is read from it
        load_checkpoint(tmp_path / "foreign.pth")
    msg = str(err.value)
    assert "\n" not in msg and "foreign.pth" in msg and "no checksum file" in msg and "sha256sum" in msg, msg
    # vouched for with sha256sum's own format (what the message suggests): weights_only still refuses the class
    digest = hashlib.sha256((tmp_path / "foreign.pth").read_bytes()).hexdigest()
    (tmp_path / "foreign.pth.sha256").write_text(f"{digest}  {tmp_path / 'foreign.pth'}\n")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "foreign.pth")
    msg = str(err.value)
    assert "\n" not in msg and "foreign.pth" in msg and "Unsupported global" in msg, msg

    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:100])
    (tmp_path / "cut.pth.sha256").write_text((tmp_path / "good.pth.sha256").read_text().replace("good.pth", "cut.pth"))
    with pytest.raises(CheckpointError, match="cut.pth is 100 bytes"):
        load_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------------------
# layout rules


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """Modules of the ``training`` package that ``path`` imports at module level (function bodies excluded)."""
    rel = path.relative_to(package_root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:  # top-level statements only
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "training"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "training":
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


def test_no_import_cycle_in_training():
    root = REPO / "training"
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {name: {m for m in _module_imports(path, root) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["training.downstream_train"] and "training.downstream_train" not in graph["training.evaluate"]
    for order in ("training.evaluate, training.downstream_train", "training.downstream_train, training.evaluate"):
        proc = subprocess.run([sys.executable, "-c", f"import {order}"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / p for p in out if (REPO / p).is_file()]


def test_no_sys_path_edits_in_the_checkout():
    this = Path(__file__).resolve()
    offenders = [str(p.relative_to(REPO)) for p in _tracked("*.py", "*.ipynb", "*.sh")
                 if p.resolve() != this and re.search(r"sys\.path\.(insert|append)", p.read_text(errors="ignore"))]
    assert offenders == []


def test_comments_cite_facts_not_a_spec_outside_the_repository():
    this = Path(__file__).resolve()
    files = [p for p in _tracked("training", "tests/training", "benchmarks") if p.resolve() != this]
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in files for i, line in
                 enumerate(p.read_text(errors="ignore").splitlines(), 1) if "§" in line or "shared/specs" in line]
    assert offenders == []


def test_one_of_each_helper():
    """Each shared helper is defined once in training/ (and the file-level atomic save is not called save_atomic,
    which is conversion._common's folder swap)."""
    defs: dict[str, list[str]] = {}
    for path in (REPO / "training").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defs.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    assert "save_atomic" not in defs
    for name in ("load_config", "dump_config", "git_sha", "rng_state", "set_rng_state", "step_seed",
                 "init_distributed", "all_reduce_sum", "load_checkpoint", "save_checkpoint", "atomic_torch_save",
                 "IoUAccumulator", "PooledSegmentationMeter", "NonFiniteLossError", "cosine_scheduler"):
        assert len(defs.get(name, [])) == 1, (name, defs.get(name))
    assert not (REPO / "training" / "kd" / "metrics.py").exists() and not (REPO / "training" / "utils").exists()


def test_portable_paths(tmp_path):
    from training.common.run_info import portable_config, portable_path
    from conversion._common import sha256_file

    f = tmp_path / "data" / "manifest.txt"
    f.parent.mkdir()
    f.write_text("a.png\n")
    model = tmp_path / "teacher"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    assert portable_path(f) == f"manifest.txt (sha256 {sha256_file(f)})"
    assert portable_path(model) == f"teacher (sha256 {sha256_file(model / 'model.safetensors')})"
    assert portable_path(f, root=tmp_path) == "data/manifest.txt"  # inside the export: relative
    assert portable_path(tmp_path / "gone" / "x.pth") == "x.pth"  # not on this machine: the base name
    assert portable_path("org/name") == "org/name" and portable_path(None) is None  # a Hub id stays
    cfg = {"model": {"init_from": str(model)}, "data": {"manifest": str(f), "batch": 2}}
    out = portable_config(cfg, ("model.init_from", "data.manifest", "data.absent"))
    assert out["data"]["batch"] == 2 and str(tmp_path) not in repr(out) and str(tmp_path) in repr(cfg)


ENTRY_POINTS = ("training.pretrain", "training.distill", "training.export_student", "training.export_pretrained",
                "training.linear_probe", "training.finetune_segmentation", "training.evaluate", "training.quickstart",
                "training.data.datasets", "training.benchmark")


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_texts_run_and_speak_to_users(name, capsys):
    import importlib

    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and len(text) > 300
    # nothing that points at the project's own process or at documents outside the repository
    for word in ("issue", "spec §", "shared/specs", "TODO"):
        assert word not in text, (name, word)
    if name not in ("training.data.datasets", "training.evaluate"):
        assert "--output-dir" in text
