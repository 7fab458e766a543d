"""Export a pretraining checkpoint as an openus_hub folder that ``AutoModel.from_pretrained`` loads.

    python -m training.export_pretrained OUTPUT_DIR/checkpoints/checkpoint_00001000.pth --output-dir DIR
        [--network teacher|student] [--image-size 224] [--overwrite]

Writes ``config.json`` + ``model.safetensors`` (the backbone; the teacher by default, as upstream evaluates it),
``preprocessor_config.json`` (``OpenUSImageProcessorPil.save_pretrained``) and a ``README.md`` model card rendered
from ``model_cards/`` (``conversion.model_card``, base metadata ``openus-converted``) with the training configuration,
the data-manifest summary and the measured export checks (the written folder reloaded against the checkpoint). The
mask token, pixel decoder, EMA map and iBOT head are pretraining-only and are left out. Local paths in the run's
configuration (model.init_from, data.manifest) appear in the card as base names with a sha256.

The folder is written under a temporary name and swapped in; a non-empty --output-dir is refused unless --overwrite
is given. The checkpoint is read only after its sha256 matches its checksum file (CHECKPOINT.sha256, written by
training.pretrain). Exit status 0, or 2 with a one-line error (a checkpoint that does not verify or is not a
pretraining checkpoint, a non-empty --output-dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from conversion._common import save_atomic, sha256_file
from conversion.model_card import write_card
from openus_hub import OpenUSConfig, OpenUSImageProcessorPil, OpenUSModel

from .common.checkpoint import load_checkpoint
from .common.progress import finish
from .common.run_info import portable_config

PATH_KEYS = ("model.init_from", "data.manifest")  # config values that are local paths: never published as they are

logger = logging.getLogger("training.export_pretrained")


def card_metadata(state: dict, checkpoint: str | Path, network: str, name: str, num_params: int) -> dict:
    """Card metadata: ``model_cards/openus-converted.json`` with this run's facts (training configuration, data
    manifest summary, parameters, code revision) in place of the upstream ones."""
    from conversion.model_card import load_metadata

    base = load_metadata("openus-converted")
    cfg = portable_config(state["config"], PATH_KEYS)  # local paths -> base name + sha256
    man = dict(state.get("data_manifest") or {})
    if man.get("manifest"):
        man["manifest"] = Path(man["manifest"]).name
    init_from = cfg["model"].get("init_from")
    config_yaml = yaml.safe_dump(cfg, sort_keys=False).rstrip()
    manifest_json = json.dumps(man or None, indent=2)
    start = (f"continued from `{init_from}` (upstream OpenUS weights or a saved openus_hub folder)" if init_from
             else "from random initialisation")
    meta = dict(base)
    meta.update(
        name=name,
        title=f"OpenUS backbone continued/pretrained with openus_hub ({name})",
        summary=(f"The **{network}** backbone of an OpenUS pretraining run (self-adaptive masked contrastive learning, "
                 f"iBOT + pixel reconstruction; arXiv 2511.11510), exported from `{Path(checkpoint).name}` at step "
                 f"{state['step']} (epoch {state['epoch']}, {state['world_size']} process(es)).\n\n"
                 "**Not for clinical diagnosis.** A research feature extractor; its quality depends entirely on the "
                 "run below. Check it on your own scanners, vendors and patient populations before use."),
        model_details=(
            f"- **Architecture:** VMamba (SS2D four-direction selective scan) backbone, {num_params:,} parameters; "
            "architecture in `config.json`.\n"
            f"- **Pretraining:** OpenUS self-supervised recipe run with openus_hub's `training.pretrain`, {start}; "
            f"this is the **{network}** network ({'the EMA teacher, as upstream evaluates it' if network == 'teacher' else 'the student'}). "
            "The mask token, pixel decoder, EMA map and iBOT head are pretraining-only and are left out.\n"
            f"- **Checkpoint:** `{Path(checkpoint).name}`, step {state['step']}, epoch {state['epoch']}, "
            f"{state['world_size']} process(es).\n"
            "- **Implementation:** native transformers model (`model_type` `openus`) from the `openus_hub` package; no "
            "`trust_remote_code`.\n"
            f"- **Code revision:** `{state.get('git_sha')}`.\n\n"
            f"Training configuration:\n\n```yaml\n{config_yaml}\n```\n\n"
            f"Training data (manifest summary):\n\n```json\n{manifest_json}\n```"),
        get_started=("import openus_hub  # registers the model with transformers\n"
                     "from transformers import AutoModel, AutoImageProcessor\n"
                     f"model = AutoModel.from_pretrained(\"{{org}}/{name}\")  # or the local folder\n"
                     f"processor = AutoImageProcessor.from_pretrained(\"{{org}}/{name}\")"),
        training_data=[{
            "name": (f"pretraining manifest `{man.get('manifest', 'unknown')}`: {man.get('samples', '?')} samples "
                     f"from {man.get('files', '?')} files ({man.get('dicom_frames', '?')} DICOM frames)"),
            "licence": "each source keeps its own licence; check them before any use beyond research",
            "note": f"manifest sha256 `{man.get('sha256', 'unknown')}`",
        }] + (list(base["training_data"]) if init_from else []),
        evaluation=("openus_hub has not evaluated this backbone on a downstream task; the export only checks that the "
                    "saved folder reproduces the checkpoint (below). Evaluate it with `training.linear_probe` or "
                    "`training.finetune_segmentation` before relying on it."),
        eval_results=[],
    )
    if not init_from:  # trained from scratch here: no upstream weights involved
        meta.update(license="apache-2.0",
                    out_of_scope=base["out_of_scope"].replace(
                        "the licence (CC BY-NC 4.0) and several pretraining datasets forbid it.",
                        "many ultrasound datasets forbid it; check the licence of every source in the training "
                        "manifest first."),
                    licence_text=("Weights: Apache-2.0, as the openus_hub code that trained them from random "
                                  "initialisation. The images in the training manifest keep their own licences "
                                  "(several public ultrasound sets are non-commercial or under data use agreements); "
                                  "they may restrict what you can do with these weights, so check them before "
                                  "redistributing."))
    meta.pop("source", None)
    return meta


def _verify(model: OpenUSModel, state: dict, network: str, folder: Path, checkpoint: str | Path, size: int) -> dict:
    """Reload the written folder and measure it against the checkpoint: every backbone tensor, and the features of one
    fixed random image (the config round trip). Raises if they differ."""
    reloaded = OpenUSModel.from_pretrained(folder).eval()
    source = state[network]
    weights_diff = max((v.double() - source["backbone." + k].double()).abs().max().item()
                       for k, v in reloaded.state_dict().items())
    side = 64  # a multiple of 32, small enough for the reference scan on any CPU
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x, output_hidden_states=True), reloaded(x, output_hidden_states=True)
    feat_diff = max((p - q).abs().max().item()
                    for p, q in zip((a.last_hidden_state, *a.hidden_states), (b.last_hidden_state, *b.hidden_states)))
    if weights_diff != 0.0 or feat_diff > 1e-4:
        raise RuntimeError(f"exported folder differs from the checkpoint: weights {weights_diff:.3e}, "
                           f"features {feat_diff:.3e}")
    return {
        "source_file": Path(checkpoint).name, "source_sha256": sha256_file(checkpoint),
        "converter": "training.export_pretrained", "weights_sha256": sha256_file(folder / "model.safetensors"),
        "checks": [
            {"check": f"saved model.safetensors vs the checkpoint's {network} backbone tensors",
             "input": f"{len(reloaded.state_dict())} tensors", "max_abs_diff": weights_diff, "tolerance": 0.0},
            {"check": "reloaded folder vs the exported model, last_hidden_state and hidden_states",
             "input": f"1 random image {side}x{side} (seed 0)", "max_abs_diff": feat_diff, "tolerance": 1e-4},
        ],
        "notes": [f"Not a conversion: pretrained with openus_hub (`training.pretrain`), {state['step']} steps; the "
                  f"training configuration and data manifest summary are under Model details. Processor size: "
                  f"{size}x{size}."],
    }


def export(checkpoint: str | Path, output_dir: str | Path, network: str = "teacher", image_size: int | None = None,
           overwrite: bool = False) -> Path:
    state = load_checkpoint(checkpoint)
    if state.get("format") != "openus_hub.pretrain/1":
        raise ValueError(f"{checkpoint} is not an openus_hub pretraining checkpoint; convert upstream checkpoints "
                         "with conversion/convert_openus_to_hf.py")
    model_cfg = dict(state["model_config"])
    for key in ("transformers_version", "architectures", "model_type", "auto_map"):
        model_cfg.pop(key, None)
    model_cfg["use_mask_token"] = False
    config = OpenUSConfig(**model_cfg)
    model = OpenUSModel(config)
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in state[network].items()
               if k.startswith(prefix) and k != prefix + "embeddings.mask_token"}
    model.load_state_dict(weights, strict=True)
    model.eval()

    output_dir = Path(output_dir).resolve()
    size = image_size or state["config"]["data"]["global_size"]

    def finalize(tmp: str) -> None:  # processor, reload check and card, before the folder is swapped in
        OpenUSImageProcessorPil(size={"height": size, "width": size}).save_pretrained(tmp)
        verification = _verify(model, state, network, Path(tmp), checkpoint, size)
        meta = card_metadata(state, checkpoint, network, output_dir.name, sum(p.numel() for p in model.parameters()))
        write_card(tmp, meta, verification)

    save_atomic(model, str(output_dir), overwrite=overwrite, finalize=finalize)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pretraining checkpoint (OUTPUT_DIR/checkpoints/checkpoint_*.pth)")
    p.add_argument("--output-dir", required=True, help="the folder to write (refused if not empty, see --overwrite)")
    p.add_argument("--network", choices=("teacher", "student"), default="teacher",
                   help="which backbone to export (default: the EMA teacher, as upstream evaluates)")
    p.add_argument("--image-size", type=int, default=None, help="processor size (default: the run's global crop)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.checkpoint, args.output_dir, args.network, args.image_size, args.overwrite)
    except ValueError as err:  # CheckpointError, not a pretraining checkpoint, non-empty --output-dir without --overwrite
        print(f"error: {err}", file=sys.stderr)
        return 2
    finish(logger, f"{out}: the {args.network} backbone of {args.checkpoint} (config.json, model.safetensors, "
                   "preprocessor_config.json, README.md)",
           [f"python -m training.linear_probe --config training/configs/downstream/busi_linear.yaml --output-dir "
            f"runs/busi data.root=/data/BUSI model.init_from={out}   # evaluate it",
            f"openus-hub push {out} --repo-id ORG/NAME --dry-run   # check, then drop --dry-run to upload"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
