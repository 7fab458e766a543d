"""Export a pretraining checkpoint as an openus_hub folder that ``AutoModel.from_pretrained`` loads.

    python -m training.export_pretrained OUTPUT_DIR/checkpoints/checkpoint_00001000.pth --output-dir DIR
        [--network teacher|student] [--image-size 224] [--overwrite]

Writes ``config.json`` + ``model.safetensors`` (the backbone; the teacher by default, as upstream evaluates it),
``preprocessor_config.json`` (``OpenUSImageProcessorPil.save_pretrained``) and a ``README.md`` model card with the
training configuration and the data-manifest summary. The mask token, pixel decoder, EMA map and iBOT head are
pretraining-only and are left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from openus_hub import OpenUSConfig, OpenUSImageProcessorPil, OpenUSModel

from .utils.checkpoint import load

logger = logging.getLogger("training.export_pretrained")

CARD = """---
library_name: transformers
license: apache-2.0
tags: [openus_hub, ultrasound, vmamba, self-supervised, image-feature-extraction]
pipeline_tag: image-feature-extraction
---

# OpenUS backbone continued/pretrained with openus_hub

The **{network}** backbone of an OpenUS pretraining run (self-adaptive masked contrastive learning, iBOT + pixel
reconstruction; arXiv 2511.11510), exported from `{checkpoint}` at step {step} (epoch {epoch}, {world} process(es)).

**Not for clinical diagnosis.** A research feature extractor; its quality depends entirely on the run below. Check it
on your own scanners, vendors and patient populations before use.

## How to get started

```python
import openus_hub  # registers the model with transformers
from transformers import AutoModel, AutoImageProcessor
model = AutoModel.from_pretrained("{folder}")
processor = AutoImageProcessor.from_pretrained("{folder}")
```

## Training data (manifest summary)

```json
{manifest}
```

## Training configuration

Parameters: {params:,}. Code revision: `{git_sha}`.

```yaml
{config}
```
"""


def export(checkpoint: str | Path, output_dir: str | Path, network: str = "teacher", image_size: int | None = None,
           overwrite: bool = False) -> Path:
    state = load(checkpoint)
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
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass --overwrite")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".openus-export-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        size = image_size or state["config"]["data"]["global_size"]
        OpenUSImageProcessorPil(size={"height": size, "width": size}).save_pretrained(tmp)
        (tmp / "README.md").write_text(CARD.format(
            network=network, checkpoint=Path(checkpoint).name, step=state["step"], epoch=state["epoch"],
            world=state["world_size"], folder=output_dir.name,
            manifest=json.dumps(state.get("data_manifest"), indent=2),
            params=sum(p.numel() for p in model.parameters()), git_sha=state.get("git_sha"),
            config=yaml.safe_dump(state["config"], sort_keys=False).rstrip(),
        ), encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--network", choices=("teacher", "student"), default="teacher")
    p.add_argument("--image-size", type=int, default=None, help="processor size (default: the run's global crop)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export(args.checkpoint, args.output_dir, args.network, args.image_size, args.overwrite)
    logger.info("exported the %s backbone of %s -> %s", args.network, args.checkpoint, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
