"""Export the student of a distillation checkpoint as a stock transformers SegFormer folder.

    python -m training.export_student OUTPUT_DIR/checkpoints/best.pt --output-dir exported/

Writes `config.json` + `model.safetensors` (loadable with plain `transformers.SegformerForSemanticSegmentation`, no
openus_hub needed), `preprocessor_config.json` (SegFormer image processor with the training resolution and
normalisation) and a `README.md` model card (teacher, data, recipe, params/FLOPs of teacher and student, eval).
Upload with `openus-hub push` (Hub issue).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from training.utils.checkpoint import load as load_checkpoint
from training.kd.flops import count_flops, count_parameters

logger = logging.getLogger("training.export_student")

FLOP_SHAPE = (1, 3, 512, 1024)  # TransKD README convention


def _image_processor_class():
    try:
        from transformers import SegformerImageProcessorPil as cls  # PIL backend: works without torchvision
    except ImportError:  # older transformers
        from transformers import SegformerImageProcessor as cls
    return cls


def build_image_processor(cfg: dict):
    d = cfg["data"]
    height = d["height"]
    width = d["width"] or 2 * d["height"]  # shorter-side resizing: Cityscapes' 2:1 frames
    mean, std = d.get("mean"), d.get("std")
    return _image_processor_class()(
        do_resize=True, size={"height": height, "width": width}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=mean is not None, image_mean=list(mean) if mean else [0.0, 0.0, 0.0],
        image_std=list(std) if std else [1.0, 1.0, 1.0], do_reduce_labels=False,
    )


def teacher_model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    if ckpt["teacher_type"] == "openus":
        from openus_hub import OpenUSConfig, OpenUSForSemanticSegmentation

        config = OpenUSConfig.from_dict(ckpt["teacher_config"])
        return OpenUSForSemanticSegmentation(config)
    return SegformerForSemanticSegmentation(SegformerConfig.from_dict(ckpt["teacher_config"]))


def flops_512x1024(build, meta: bool = True) -> int:
    """Convention FLOPs at 512x1024: on the meta device (SegFormer), or counted on CPU at 64x128 and scaled by 64
    (module MACs scale with the pixel count when every stage size divides evenly; OpenUS's Python reference scan is
    slow on meta tensors)."""
    if meta:
        with torch.device("meta"):
            model = build()
        return count_flops(model, FLOP_SHAPE, device="meta")
    return 64 * count_flops(build(), (1, 3, 64, 128))


def student_from_checkpoint(ckpt: dict) -> SegformerForSemanticSegmentation:
    config = SegformerConfig.from_dict(ckpt["student_config"])
    id2label = ckpt["config"]["student"].get("id2label")
    if id2label:
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.label2id = {v: int(k) for k, v in id2label.items()}
    student = SegformerForSemanticSegmentation(config)
    weights = {k[len("student."):]: v for k, v in ckpt["model"].items() if k.startswith("student.")}
    student.load_state_dict(weights, strict=True)
    return student.eval()


def render_card(ckpt: dict, numbers: dict) -> str:
    cfg = ckpt["config"]
    state = ckpt["state"]
    t, d, k, o, sc, tr = (cfg[x] for x in ("teacher", "data", "kd", "optim", "schedule", "train"))
    teacher_name = t.get("pretrained") or f"random-init {t['type']} (smoke test only)"
    dataset = d.get("root") or (f"pydicom example `{d['dicom_name']}`" if d["dataset"] == "dicom_examples" else d["dataset"])
    evals = state.get("evals") or []
    best = max(evals, key=lambda e: e["miou"]) if evals else None
    variant_name = {"base": "TransKD-Base (CSF + PEA)", "gl": "TransKD-GL (CSF + PEA + GL-Mixer)",
                    "ea": "TransKD-EA (CSF + PEA + embedding assistant)"}[k["variant"]]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-segmentation",
        "tags: [segformer, knowledge-distillation, transkd, ultrasound, openus_hub]",
        "---",
        "",
        f"# {cfg.get('name', 'distilled')}: SegFormer student distilled with {variant_name}",
        "",
        "A stock `transformers` SegFormer (`SegformerForSemanticSegmentation`); no custom code is needed to run it.",
        "**Not for clinical diagnosis.**",
        "",
        "## Distillation",
        f"- Teacher: {teacher_name} ({t['type']})",
        f"- Data: {dataset} (train split `{d['train_split']}`, val split `{d['val_split']}`); "
        f"input {d['height']}x{d['width'] or 'auto'}, labels at {d['label_scale']}x resolution",
        f"- Recipe: {variant_name}; loss = weighted CE + {k['hcl_weight']} x HCL + "
        f"sum w_s x patch-embedding MSE, w = {k['embed_weights']}",
        f"- Optimiser: AdamW lr {o['lr']}, weight decay {o['weight_decay']}; linear poly decay per epoch over "
        f"{sc['max_decay_epochs']} epochs; {tr['epochs']} epochs at batch {tr['batch_size']}"
        + (f" (stopped at step {tr['max_steps']})" if tr.get("max_steps") else ""),
        f"- Trained: {state['step']} steps, {state['epoch']} epochs; git {ckpt.get('git_sha') or 'unknown'}",
        "",
        "## Size and cost (FLOPs = module MACs at 1x3x512x1024, no attention matmuls or upsampling, as TransKD)",
        "",
        "| model | params | GFLOPs |",
        "|---|---|---|",
        f"| teacher | {numbers['teacher_params']:,} | {numbers['teacher_gflops']:.2f} |",
        f"| student | {numbers['student_params']:,} | {numbers['student_gflops']:.2f} |",
        f"| student / teacher | {numbers['student_params'] / numbers['teacher_params']:.3f} | "
        f"{numbers['student_gflops'] / numbers['teacher_gflops']:.3f} |",
        "",
        "## Evaluation (validation split, mIoU at the label resolution, upstream `iouEval` rule)",
        "",
    ]
    if best:
        lines.append(f"- best val mIoU: {best['miou']:.4f} (epoch {best['epoch']}, step {best['step']}); "
                     f"per class: {best['iou']}")
        lines.append("- note: the best epoch is selected on the same val split it is reported on (as upstream).")
    else:
        lines.append("- no evaluation was run")
    lines += [
        "",
        "## Usage",
        "```python",
        "from transformers import AutoImageProcessor, SegformerForSemanticSegmentation",
        "processor = AutoImageProcessor.from_pretrained(PATH)",
        "model = SegformerForSemanticSegmentation.from_pretrained(PATH)",
        "logits = model(**processor(images=image, return_tensors='pt')).logits  # 1/4 resolution",
        "```",
        "",
        "## Export check",
        f"- max |logit difference| between the trained student and this exported folder: "
        f"{numbers['export_max_abs_diff']:.2e} (transformers builds every LayerNorm with eps 1e-5; the run used "
        f"eps 1e-6 on block/stage norms: {cfg['student']['upstream_layer_norm_eps']})",
        "",
    ]
    return "\n".join(lines)


def export(checkpoint: str, output_dir: str) -> dict:
    ckpt = load_checkpoint(checkpoint)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    student = student_from_checkpoint(ckpt)
    student.save_pretrained(out)
    build_image_processor(ckpt["config"]).save_pretrained(out)

    # the student as trained (eps 1e-6 if configured) vs the stock reload
    from training.kd.student import apply_upstream_numerics

    trained = student_from_checkpoint(ckpt)
    apply_upstream_numerics(trained, ckpt["config"]["student"]["upstream_layer_norm_eps"], dropout2d=False)
    reloaded = SegformerForSemanticSegmentation.from_pretrained(out).eval()
    d = ckpt["config"]["data"]
    x = torch.rand(1, 3, d["height"], d["width"] or 2 * d["height"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (trained.eval()(x).logits - reloaded(x).logits).abs().max().item()

    numbers = {
        "student_params": count_parameters(student),
        "student_gflops": flops_512x1024(lambda: SegformerForSemanticSegmentation(student.config)) / 1e9,
        "teacher_params": count_parameters(teacher_model_from_checkpoint(ckpt)),
        "teacher_gflops": flops_512x1024(lambda: teacher_model_from_checkpoint(ckpt), ckpt["teacher_type"] != "openus") / 1e9,
        "export_max_abs_diff": diff,
    }
    (out / "README.md").write_text(render_card(ckpt, numbers))
    (out / "distillation.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "numbers": numbers, "evals": ckpt["state"].get("evals", []),
        "recipe": ckpt["config"],
    }, indent=2, default=str))
    logger.info("exported student to %s (max |diff| after reload %.2e)", out, diff)
    return numbers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return export(args.checkpoint, args.output_dir)


if __name__ == "__main__":
    main()
