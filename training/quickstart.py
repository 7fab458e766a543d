"""Quickstart: the whole pretraining pipeline on a CPU in about a minute, on real echo frames shipped with pydicom.

    python -m training.quickstart --output-dir quickstart_out [--steps 6] [--overwrite]

Writes frames (PNG) + a manifest, runs a few pretraining steps of a TINY randomly initialised OpenUS model
(training/configs/debug_cpu.yaml), exports the teacher backbone, reloads it with ``AutoModel.from_pretrained``, embeds
the frames and writes ``frame_similarity.png`` (cosine similarity of the frame embeddings) next to the training
figures (``run/figures/``). This is a pipeline demonstration, NOT a useful pretrained model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


BANNER = ("NOTE: pipeline demonstration only: a tiny, randomly initialised model trained for a few steps on a few "
          "frames. It is NOT a useful pretrained model and NOT for clinical use.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="quickstart_out")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output-dir")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: --output-dir {out} is not empty; pass --overwrite to replace it or choose another folder",
              file=sys.stderr)
        return 2
    if out.exists() and args.overwrite:
        import shutil

        shutil.rmtree(out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("training.quickstart")
    log.warning(BANNER)
    import pydicom
    import torch
    from PIL import Image
    from pydicom.pixels import pixel_array

    import openus_hub
    from transformers import AutoModel

    from . import pretrain
    from .data.datasets import build_manifest
    from .export_pretrained import export
    from .common.checkpoint import latest_checkpoint
    from .common.figures import frame_similarity_figure

    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(pydicom.examples.get_path("ybr_color"))  # SonoSite echo cine, 30 frames
    n = min(args.frames, int(ds.NumberOfFrames))
    for i in range(n):
        Image.fromarray(pixel_array(ds, index=i)).save(frames_dir / f"frame_{i:02d}.png")
    manifest = out / "manifest.txt"
    build_manifest([frames_dir], manifest)
    config = Path(__file__).resolve().parent / "configs" / "debug_cpu.yaml"
    rc = pretrain.main(["--config", str(config), "--output-dir", str(out / "run"), f"data.manifest={manifest}",
                        f"train.max_steps={args.steps}", "train.epochs=100", "log.figure_every_steps=2",
                        f"checkpoint.every_steps={args.steps}"])
    if rc:
        return rc
    folder = export(latest_checkpoint(out / "run" / "checkpoints"), out / "exported", overwrite=True)
    model = AutoModel.from_pretrained(folder).eval()
    feats = openus_hub.extract_features(model, sorted(str(f) for f in frames_dir.glob("*.png")),
                                        return_stage_maps=False)
    emb = torch.nn.functional.normalize(feats.pooled, dim=-1)  # [N, C]
    sim = (emb @ emb.T).double().numpy()
    frame_similarity_figure(sim, out / "frame_similarity.png",
                            title=f"Quickstart: pooled embeddings of the echo cine's frames 0-{n - 1} (pydicom example "
                                  f"ybr_color)\ntiny random model after {args.steps} pretraining steps: a pipeline "
                                  "check, not a trained model")
    log.info("exported %s; embeddings %s; figures in %s; similarity %s", folder, tuple(emb.shape),
             out / "run" / "figures", out / "frame_similarity.png")
    log.warning(BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
