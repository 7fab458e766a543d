"""Quickstart: the whole pretraining pipeline on a CPU in a few minutes, on real echo frames shipped with pydicom.

    python -m training.quickstart --output-dir quickstart_out [--steps 6] [--frames 8] [--overwrite]

Writes the first frames of pydicom's echo cine (PNG) + a manifest, runs a few pretraining steps of a TINY randomly
initialised OpenUS model (training/configs/debug_cpu.yaml) with a figure every 2 steps, exports the teacher backbone,
reloads it with ``AutoModel.from_pretrained``, embeds the frames and plots their similarity. This is a pipeline
demonstration, NOT a useful pretrained model. Refuses a non-empty --output-dir unless given --overwrite, which replaces
only what a quickstart writes there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

BANNER = ("NOTE: pipeline demonstration only: a tiny, randomly initialised model trained for a few steps on a few "
          "frames. It is NOT a useful pretrained model and NOT for clinical use.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="quickstart_out")
    p.add_argument("--steps", type=int, default=6, help="pretraining steps (default 6)")
    p.add_argument("--frames", type=int, default=8, help="echo frames to train on and embed (default 8, at most 30)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous quickstart's files in --output-dir (nothing else there is touched)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    from .common.config import ConfigError
    from .common.figures import require_matplotlib
    from .common.output_dir import QUICKSTART_FILES, prepare_output_dir

    try:
        require_matplotlib()
        # nothing but a previous quickstart's own files (recognised by name, in run/, exported/ and frames/ too) is
        # ever deleted; anything else in the folder is named and the run refused
        prepare_output_dir(out, QUICKSTART_FILES, resume=False, overwrite=args.overwrite)
    except (ImportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("training.quickstart")
    log.warning(BANNER)
    import pydicom
    import torch
    from PIL import Image
    from pydicom.pixels import pixel_array
    from transformers import AutoModel

    import openus_hub

    from . import pretrain
    from .common.checkpoint import latest_checkpoint
    from .common.figures import frame_similarity_figure
    from .common.progress import finish
    from .data.datasets import build_manifest
    from .export_pretrained import export

    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(pydicom.examples.get_path("ybr_color"))  # SonoSite echo cine, 30 frames
    n = min(args.frames, int(ds.NumberOfFrames))
    log.info("1/4 writing %d echo frames and a manifest to %s", n, out)
    for i in range(n):
        Image.fromarray(pixel_array(ds, index=i)).save(frames_dir / f"frame_{i:02d}.png")
    manifest = out / "manifest.txt"
    build_manifest([frames_dir], manifest)
    log.info("2/4 pretraining a tiny OpenUS model for %d steps (training/configs/debug_cpu.yaml)", args.steps)
    config = Path(__file__).resolve().parent / "configs" / "debug_cpu.yaml"
    pretrain_log = logging.getLogger("training.pretrain")
    level = pretrain_log.level
    pretrain_log.setLevel(logging.WARNING)  # its closing "next: export" line: the quickstart exports itself
    try:
        rc = pretrain.main(["--config", str(config), "--output-dir", str(out / "run"), f"data.manifest={manifest}",
                            f"train.max_steps={args.steps}", "train.epochs=100", "log.figure_every_steps=2",
                            f"checkpoint.every_steps={args.steps}", "log.progress_bar=true"])
    finally:
        pretrain_log.setLevel(level)
    if rc:
        return rc
    log.info("3/4 exporting the teacher backbone and reloading it with AutoModel.from_pretrained")
    folder = export(latest_checkpoint(out / "run" / "checkpoints"), out / "exported", overwrite=True)
    model = AutoModel.from_pretrained(folder).eval()
    log.info("4/4 embedding the frames and plotting their similarity")
    feats = openus_hub.extract_features(model, sorted(str(f) for f in frames_dir.glob("*.png")),
                                        return_stage_maps=False)
    emb = torch.nn.functional.normalize(feats.pooled, dim=-1)  # [N, C]
    sim = (emb @ emb.T).double().numpy()
    figure = frame_similarity_figure(
        sim, out / "frame_similarity.png",
        title=f"Quickstart: pooled embeddings of the echo cine's frames 0-{n - 1} (pydicom example ybr_color)\n"
              f"tiny random model after {args.steps} pretraining steps: a pipeline check, not a trained model")
    finish(log, f"{out}: frames/ + manifest.txt (the data), run/ (config.yaml, log.jsonl, checkpoints/, "
                f"figures/step_*.png: crop | teacher attention | mask | masked reconstruction), exported/ (the "
                f"backbone, loadable with AutoModel.from_pretrained), {figure.path.name} (similarity of the "
                f"{n} frame embeddings {tuple(emb.shape)})",
           [f"openus-hub embed {frames_dir} --model {folder} --output {out / 'embeddings.npz'}   # the CLI",
            "pretrain for real: training/README.md (torchrun -m training.pretrain --config "
            "training/configs/openus_small_paper.yaml ...)"])
    log.warning(BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
