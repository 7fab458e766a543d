"""training.benchmark on the debug mini-suite (tests/ultrabench_debug_tree.py: real echo frames in UltraBench's
format): the reader and its one-line errors, the metrics, the usaugment transforms, and the benchmark end to end on
a CPU for a tiny random OpenUS and a tiny stock transformers ConvNeXt: all four protocols with 2 seeds, a real kill
of the process and a resume that recomputes nothing finished, results, figures and a model card that
huggingface_hub parses. The debug tasks are learned, not just run: the linear probe beats chance and the frozen
segmentation beats the empty-mask and full-fan baselines by the margins stated below."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.output_checks import assert_figure
from tests.ultrabench_debug_tree import write_debug_tree
from training.data.ultrabench import (IGNORE_INDEX, UltraBenchDataset, UltraBenchError, find_tasks, get_task,
                                      load_task)
from training.metrics import SplitSegmentationMeter, binary_auroc, binary_average_precision, ranking_metrics

REPO = Path(__file__).resolve().parents[2]
CFG = "training/configs/benchmark/debug_cpu.yaml"
CHANCE = 1 / 3  # three balanced classes in every split of debug_lesion_classification
ACC_MARGIN = 0.15  # linear-probe test accuracy >= chance + 0.15 (measured 0.53-0.61 for the tiny random OpenUS)
AUROC_MARGIN = 0.20  # AUROC >= 0.5 + 0.20 (measured 0.79-0.80)
# figure sizes (px): two 3-class confusion matrices; 3 overlay rows of image | truth | 2 protocols
CM_SIZE, SEG_SIZE = (890, 475), (1320, 1020)  # checked below against the PNGs
DICE_MARGIN = 0.10  # frozen-backbone Dice >= full-fan Dice + 0.10 (measured mean 0.51: seeds 0.49, 0.53, against 0.32; empty
# mask: 0). The head is seeded before it is built, so a seed gives the same value in every run.


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ultrabench")
    write_debug_tree(root)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import openus_hub  # noqa: F401
    from transformers import ConvNextConfig, ConvNextModel

    from openus_hub import OpenUSConfig, OpenUSModel

    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    OpenUSModel(OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 1], decoder_depths=[1, 1, 1, 1], drop_path_rate=0.0,
                             decoder_drop_path_rate=0.0)).save_pretrained(out / "openus-tiny")
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])).save_pretrained(
        out / "convnext-tiny")
    return {"openus": out / "openus-tiny", "convnext": out / "convnext-tiny"}


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.benchmark", "--config", CFG, "progress_bar=false", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}


# ---------------------------------------------------------------------------------------------------------------------
# the reader


def test_debug_tree_reads_as_ultrabench(tree):
    tasks = find_tasks(tree, ["debug"])
    assert [t.name for t in tasks] == ["debug_lesion_classification", "debug_tissue_segmentation"]
    cls = load_task(tree, "debug_lesion_classification")
    seg = load_task(tree, tasks[1])
    assert cls.version == seg.version == "1.0.1" and cls.folder.name == "debug_lesion_v1.0.1"
    assert {s: len(r) for s, r in cls.splits.items()} == {"train": 88, "validation": 20, "test": 36}
    assert {s: len(r) for s, r in seg.splits.items()} == {"train": 36, "validation": 10, "test": 14}
    for split in cls.splits.values():  # balanced classes
        assert np.ptp(np.bincount([r.target for r in split], minlength=3)) <= 1
    # UltraBench's files: 8-bit single-channel PNGs, 0/1 masks
    r = seg.splits["train"][0]
    img, scan, mask = (np.asarray(Image.open(p)) for p in (r.image, r.scan_mask, r.target))
    assert img.dtype == np.uint8 and img.ndim == 2 and set(np.unique(scan)) == {0, 1} and set(np.unique(mask)) == {0, 1}
    assert 0.1 < mask.sum() / scan.sum() < 0.3 and not (mask & (1 - scan)).any()  # tissue inside the fan only
    with pytest.raises(UltraBenchError, match="no UltraBench dataset folder"):
        find_tasks(tree, ["all"])  # the debug tree holds no UltraBench task


def test_dataset_letterboxes_and_applies_the_scan_mask(tree):
    data = load_task(tree, "debug_tissue_segmentation")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = UltraBenchDataset(data.splits["test"], data.spec, 64, mean, std)
    masked = UltraBenchDataset(data.splits["test"], data.spec, 64, mean, std, apply_scan_mask=True)
    a, b = plain[0], masked[0]
    assert a["pixel_values"].shape == (3, 64, 64) and a["labels"].shape == (64, 64)
    # 96x128 -> 48x64, padded with 8 rows of zeros above and below (the paper's LongestMaxSize + PadIfNeeded)
    zero = (0 - 0.5) / 0.25
    assert torch.all(a["pixel_values"][:, :8] == zero) and torch.all(a["pixel_values"][:, -8:] == zero)
    assert not torch.all(a["pixel_values"][:, 8:56] == zero)
    outside = b["scan_mask"] == 0
    assert outside.any() and torch.all(b["pixel_values"][:, outside] == zero)
    assert torch.all(b["labels"][outside] == IGNORE_INDEX) and not torch.any(a["labels"] == IGNORE_INDEX)
    assert torch.equal(a["labels"][~outside], b["labels"][~outside])


def _copy_tree(tree: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    shutil.copytree(tree, root)
    return root


@pytest.mark.parametrize("case", ["missing split file", "missing image", "mask of the wrong size", "unknown task",
                                  "missing field", "label out of range"])
def test_malformed_tree_is_a_one_line_error_naming_file_and_field(tree, tmp_path, case):
    root = _copy_tree(tree, tmp_path)
    seg, cls = root / "debug_tissue_v1.0.1", root / "debug_lesion_v1.0.1"
    task, expect = "debug_tissue_segmentation", []
    if case == "missing split file":
        (seg / "validation.json").unlink()
        expect = [str(seg / "validation.json"), "missing split file"]
    elif case == "missing image":
        recs = json.loads((seg / "test.json").read_text())
        recs[3]["image"] = "images/nowhere.png"
        (seg / "test.json").write_text(json.dumps(recs))
        expect = [str(seg / "test.json"), "record 3", "field 'image'", "nowhere.png", "does not exist"]
    elif case == "mask of the wrong size":
        recs = json.loads((seg / "train.json").read_text())
        mask = seg / recs[5]["tissue_mask"]
        Image.open(mask).resize((100, 96)).save(mask)
        expect = [str(seg / "train.json"), "record 5", "field 'tissue_mask'", "100x96", "its image is 128x96"]
    elif case == "unknown task":
        task, expect = "debug_tisue_segmentation", ["unknown task 'debug_tisue_segmentation'",
                                                    "did you mean 'debug_tissue_segmentation'"]
    elif case == "missing field":
        recs = json.loads((cls / "train.json").read_text())
        del recs[2]["label"]
        (cls / "train.json").write_text(json.dumps(recs))
        task, expect = "debug_lesion_classification", [str(cls / "train.json"), "record 2", "no 'label' field"]
    else:
        recs = json.loads((cls / "test.json").read_text())
        recs[0]["label"] = 7
        (cls / "test.json").write_text(json.dumps(recs))
        task, expect = "debug_lesion_classification", ["record 0 field 'label'", "7 is not a class index"]
    with pytest.raises(UltraBenchError) as err:
        load_task(root, get_task(task))
    message = str(err.value)
    assert "\n" not in message and all(e in message for e in expect), message
    if case == "unknown task":  # the command line: exit status 2 and the same line, before any model is loaded
        proc = subprocess.run(_bench("--model", "unused", "--data-root", str(root), "--tasks", task, "--output-dir",
                                     str(tmp_path / "out")), capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {message}"


def test_data_errors_through_the_command_line(tree, tmp_path, models):
    root = _copy_tree(tree, tmp_path)
    (root / "debug_tissue_v1.0.1" / "test.json").unlink()
    proc = subprocess.run(_bench("--model", str(models["openus"]), "--data-root", str(root), "--tasks", "debug",
                                 "--protocol", "seg-frozen", "--output-dir", str(tmp_path / "out")),
                          capture_output=True, text=True, env=_env(), timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "test.json: missing split file" in lines[-1]


# ---------------------------------------------------------------------------------------------------------------------
# metrics


def test_ranking_and_split_dice_metrics():
    # sklearn's documented example: AP 0.8333, ROC AUC 0.75
    assert math.isclose(binary_average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 0.8333333, rel_tol=1e-6)
    assert binary_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert binary_auroc([0.5, 0.5], [0, 1]) == 0.5  # ties count one half
    perfect = np.eye(3)[[0, 1, 2, 0]]
    assert ranking_metrics([0, 1, 2, 0], perfect) == {"average_precision": 1.0, "auroc": 1.0}
    assert ranking_metrics([0, 1, 1], np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))["auroc"] == 1.0  # binary: class 1
    # split-pooled foreground Dice (UltraBench): TP/FP/FN summed over images and foreground classes
    meter = SplitSegmentationMeter(3)
    target = torch.tensor([[[1, 1, 0, 2]], [[0, 0, 0, 0]]])
    pred = torch.tensor([[[1, 0, 0, 2]], [[0, 0, 0, 2]]])
    meter.update(pred, target)
    m = meter.compute()
    assert m["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1)) and m["iou"] == pytest.approx(2 / 4)
    assert m["dice_per_class"] == pytest.approx([2 / 3, 2 / 3])
    assert m["dice_per_image"] == pytest.approx((4 / 5 + 0) / 2)
    ignored = SplitSegmentationMeter(2)
    ignored.update(torch.tensor([[[1, 1]]]), torch.tensor([[[1, IGNORE_INDEX]]]))
    assert ignored.compute()["dice"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# usaugment


@pytest.fixture(scope="module")
def echo(tree):
    data = load_task(tree, "debug_tissue_segmentation")
    ds = UltraBenchDataset(data.splits["train"], data.spec, 128, (0, 0, 0), (1, 1, 1))
    return ds.load(0)  # image (128, 128, 3) in [0, 1], scan mask, tissue mask


def _single(name: str):
    import albumentations as A
    import usaugment.albumentations as U

    from training.data.us_augment import USAugment

    aug = USAugment()
    t = next(t for t in aug.transforms if type(t).__name__ == name)
    t = type(t)(**{**{k: getattr(t, k) for k in t.get_transform_init_args_names()}, "p": 1.0})
    return A.Compose([t], additional_targets={"scan_mask": "mask"}), U


@pytest.mark.parametrize("name", ["DepthAttenuation", "GaussianShadow", "HazeArtifact", "SpeckleReduction"])
def test_each_usaugment_transform_changes_the_fan_as_documented_and_keeps_masks(echo, name):
    image, scan, mask = echo
    compose, _ = _single(name)
    inside, visible = scan > 0, 0
    for seed in range(12):  # each draw: the documented direction of change, inside the fan only, masks kept
        np.random.seed(seed)
        out = compose(image=image.copy(), mask=mask.copy(), scan_mask=scan.copy())
        new = out["image"]
        assert np.array_equal(out["mask"], mask) and np.array_equal(out["scan_mask"], scan)  # masks stay aligned
        assert np.array_equal(new[~inside], image[~inside])  # outside the scan region: untouched
        diff = new[inside] - image[inside]
        visible += np.abs(diff).max() > 0.02
        if name == "DepthAttenuation":  # darker, more so with depth
            assert (diff <= 1e-6).all()
            rows = np.nonzero(inside.any(1))[0]
            top, bottom = rows[: len(rows) // 4], rows[-len(rows) // 4:]

            def ratio(r):
                sel = inside[r] & (image[r].mean(-1) > 0.05)
                return (new[r].mean(-1)[sel] / image[r].mean(-1)[sel]).mean()
            assert ratio(bottom) <= ratio(top)
        elif name == "GaussianShadow":  # darker in one place, never brighter
            assert (diff <= 1e-6).all()
        elif name == "HazeArtifact":  # added brightness, clipped to [0, 1]
            assert (diff >= -1e-6).all() and new.max() <= 1.0
        else:  # speckle reduction: the fan is smoother (less difference between neighbouring pixels)
            def roughness(x):
                return np.abs(np.diff(x[..., 0], axis=1))[inside[:, 1:] & inside[:, :-1]].mean()
            assert roughness(new) <= roughness(image)
    assert visible >= 6, visible  # and visibly so for most draws (a shadow can fall on black, a haze band be thin)


def test_usaugment_uses_the_papers_probability_with_independent_seeded_draws(echo):
    from training.data.us_augment import PAPER_P, USAugment

    image, scan, _ = echo
    aug = USAugment()
    assert [t.p for t in aug.transforms] == [PAPER_P] * 4 == [0.5] * 4
    seen = []
    for seed in range(48):
        aug(image, scan, seed)
        seen.append(tuple(aug.last_applied))
    counts = {name: sum(name in s for s in seen) for name in
              ("DepthAttenuation", "GaussianShadow", "HazeArtifact", "SpeckleReduction")}
    assert all(12 <= c <= 36 for c in counts.values()), counts  # each about half the time
    assert len(set(seen)) >= 8  # the four draws are independent, not all-or-nothing
    state = np.random.get_state()[1].copy()
    a, b = aug(image, scan, 7), aug(image, scan, 7)
    assert np.array_equal(a, b) and np.array_equal(np.random.get_state()[1], state)  # seeded, no global trace


def test_finetuning_recipes_take_augment_usaugment(tree, tmp_path):
    """data.augment: usaugment in the downstream recipes: the training images change, the masks do not, and the
    setting is checked strictly."""
    from training.common.config import ConfigError
    from training.data.downstream import DownstreamDataset, Sample
    from training.data.us_augment import build_augment
    from training.downstream_config import load_downstream_config

    cfg = load_downstream_config("segmentation", "training/configs/downstream/debug_cpu_seg.yaml",
                                 ["data.augment=usaugment"])
    assert cfg["data"]["augment"] == "usaugment"
    with pytest.raises(ConfigError, match="data.augment must be none or usaugment"):
        load_downstream_config("segmentation", None, ["data.augment=trivial"])
    data = load_task(tree, "debug_tissue_segmentation")
    samples = [Sample(str(r.image), str(r.target)) for r in data.splits["train"][:6]]
    plain = DownstreamDataset(samples, "segmentation", 64, train=True, label_rule="gt0", seed=1)
    aug = DownstreamDataset(samples, "segmentation", 64, train=True, label_rule="gt0", seed=1,
                            augment=build_augment(cfg["data"]["augment"]))
    changed = 0
    for i in range(len(samples)):
        a, b = plain[i], aug[i]
        assert torch.equal(a["labels"], b["labels"])  # same geometry, same mask
        changed += not torch.allclose(a["pixel_values"], b["pixel_values"])
    assert changed >= 3


# ---------------------------------------------------------------------------------------------------------------------
# end to end


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"benchmark exited ({proc.returncode}) before {path} appeared:\n{out[-3000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


@pytest.mark.slow
def test_openus_all_protocols_two_seeds_killed_and_resumed_learns_and_writes_the_card(tree, models, tmp_path):
    out = tmp_path / "bench"
    card_dir = tmp_path / "card_model"
    shutil.copytree(models["openus"], card_dir)
    (card_dir / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- ultrasound\n---\n# My model\n\n"
                                        "Notes the user wrote.\n", encoding="utf-8")
    args = _bench("--model", str(card_dir), "--data-root", str(tree), "--tasks", "debug", "--protocol", "all",
                  "--seeds", "2", "--output-dir", str(out))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=REPO)
    first_seg = out / "runs" / "debug_tissue_segmentation" / "seg-frozen" / "seed_0.json"
    _wait_for(first_seg, proc, 600)
    proc.send_signal(signal.SIGKILL)  # a real kill, in the middle of the next segmentation run
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    finished = sorted(p for p in (out / "runs").rglob("seed_*.json"))
    assert len(finished) == 5  # linear x2, knn x2, seg-frozen seed 0
    before = {p: p.stat().st_mtime_ns for p in finished}
    features = out / "features" / "debug_lesion_classification.safetensors"
    feat_mtime = features.stat().st_mtime_ns

    resumed = subprocess.run(args + ["--card", str(card_dir)], capture_output=True, text=True, env=_env(),
                             cwd=REPO, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr
    assert log.count("done before (skipped)") == 5 and "features: cached" in log
    assert all(p.stat().st_mtime_ns == m for p, m in before.items()) and features.stat().st_mtime_ns == feat_mtime
    assert "| debug_lesion_classification | linear probe |" in log and "wrote " in log  # the summary table

    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"debug_lesion_classification", "debug_tissue_segmentation"}
    cls = results["tasks"]["debug_lesion_classification"]
    seg = results["tasks"]["debug_tissue_segmentation"]
    assert set(cls["protocols"]) == {"linear", "knn"} and set(seg["protocols"]) == {"seg-frozen", "seg-finetune"}
    for summary in (*cls["protocols"].values(), *seg["protocols"].values()):
        assert summary["seeds"] == [0, 1] and all(len(m["values"]) == 2 for m in summary["metrics"].values())
    # learned, not just run: the margins in the module header
    lin = cls["protocols"]["linear"]["metrics"]
    assert lin["accuracy"]["mean"] >= CHANCE + ACC_MARGIN, lin
    assert lin["auroc"]["mean"] >= 0.5 + AUROC_MARGIN, lin
    assert cls["baselines"]["majority_accuracy"] == pytest.approx(CHANCE)
    frozen = seg["protocols"]["seg-frozen"]["metrics"]["dice"]
    assert seg["baselines"]["empty_dice"] == 0.0 and 0.2 < seg["baselines"]["full_scan_dice"] < 0.45
    assert frozen["mean"] >= seg["baselines"]["full_scan_dice"] + DICE_MARGIN, (frozen, seg["baselines"])
    assert min(frozen["values"]) > seg["baselines"]["full_scan_dice"]

    # outputs: the table, the figures, the card section that huggingface_hub parses, the user's card kept
    assert "| debug_tissue_segmentation | frozen backbone + head |" in (out / "results.md").read_text()
    assert_figure(out / "figures" / "debug_lesion_classification.png", CM_SIZE, min_colours=20)
    assert_figure(out / "figures" / "debug_tissue_segmentation.png", SEG_SIZE)
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_dir / "README.md")
    assert "Notes the user wrote." in card.text and "## Benchmark" in card.text
    assert card.data.license == "apache-2.0" and card.data.tags == ["ultrasound"]
    evals = card.data.eval_results
    assert {e.dataset_config for e in evals} == {"debug_lesion_classification", "debug_tissue_segmentation"}
    dice = next(e for e in evals if e.metric_type == "dice" and "frozen" in e.metric_name)
    assert dice.metric_value == round(100 * frozen["mean"], 2)
    assert str(tmp_path) not in (card_dir / "README.md").read_text()
    # a second write replaces the section instead of appending another
    from training.benchmark.report import update_card

    update_card(card_dir, results, "x")
    assert ModelCard.load(card_dir / "README.md").text.count("## Benchmark") == 1


@pytest.mark.slow
def test_convnext_baseline_all_protocols_two_seeds(tree, models, tmp_path, caplog):
    from training.benchmark import main

    out = tmp_path / "convnext"
    rc = main(["--config", CFG, "progress_bar=false", "--model", str(models["convnext"]), "--data-root", str(tree),
               "--tasks", "debug", "--protocol", "all", "--seeds", "2", "--output-dir", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["kind"] == "transformers" and results["model"]["name"] == "convnext-tiny"
    seg = results["tasks"]["debug_tissue_segmentation"]
    for protocol in ("seg-frozen", "seg-finetune"):
        m = seg["protocols"][protocol]["metrics"]["dice"]
        assert len(m["values"]) == 2 and m["mean"] > seg["baselines"]["full_scan_dice"]
    assert len(results["tasks"]["debug_lesion_classification"]["protocols"]["knn"]["seeds"]) == 2
    assert_figure(out / "figures" / "debug_tissue_segmentation.png", SEG_SIZE)
    # another model into the same folder: refused, one line
    rc = main(["--config", CFG, "--model", str(models["openus"]), "--data-root", str(tree), "--tasks", "debug",
               "--output-dir", str(out)])
    assert rc == 2
