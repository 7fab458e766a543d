"""Export the student of a distillation checkpoint as a stock transformers SegFormer folder.

    python -m training.export_student OUTPUT_DIR/checkpoints/best.pt --output-dir exported/

Writes `config.json` + `model.safetensors` (loadable with plain `transformers.SegformerForSemanticSegmentation`, no
openus_hub needed), `preprocessor_config.json` (SegFormer image processor with the training resolution and
normalisation) and a `README.md` model card rendered from `model_cards/` (`conversion.model_card`, base metadata: the
TransKD student card of the run's variant) with teacher, data, recipe, params/FLOPs of teacher and student, val mIoU
and the measured reload difference, and `distillation.json` (the numbers, the validation history and the recipe).
Publish the folder with `openus-hub push FOLDER --repo-id ORG/NAME` (it checks the folder, then uploads it in one
commit). Local paths of the run (teacher folder, data root, checkpoint) appear in the card and `distillation.json`
as base names with a sha256, never as absolute paths. The checkpoint is read only after its sha256 matches its
checksum file (CHECKPOINT.sha256, written by training.distill); exit status 2 with a one-line error otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from conversion._common import sha256_file
from training.common.checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from training.common.progress import finish
from training.common.run_info import portable_config, portable_path
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


VARIANT_NAMES = {"base": "TransKD-Base (CSF + PEA)", "gl": "TransKD-GL (CSF + PEA + GL-Mixer)",
                 "ea": "TransKD-EA (CSF + PEA + embedding assistant)"}
STREET_SCENES = ("cityscapes", "acdc")
DATA_LICENCES = {"cityscapes": "Cityscapes terms of use: non-commercial research, registration required",
                 "acdc": "ACDC terms of use: non-commercial research, registration required: verify"}
FLOPS_RULE = "FLOPs = module MACs at 1x3x512x1024, no attention matmuls or upsampling, as TransKD"


PATH_KEYS = ("teacher.pretrained", "data.root")  # config values that are local paths: never published as they are


def _dataset_label(d: dict) -> str:
    if d.get("root"):
        return f"`{portable_path(d['root'])}` ({d['dataset']})"
    return f"pydicom example `{d['dicom_name']}`" if d["dataset"] == "dicom_examples" else d["dataset"]


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def card_metadata(ckpt: dict, numbers: dict, name: str | None = None, checkpoint_name: str = "the checkpoint") -> dict:
    """Card metadata: the TransKD student card of the run's variant (``model_cards/transkd-<variant>-b0-cityscapes``)
    with this run's teacher, data, recipe, params/FLOPs and validation mIoU in place of the upstream ones. Local paths
    (teacher folder, data root) appear as base names with a sha256 where there is a file to hash."""
    from conversion.model_card import load_metadata

    cfg = ckpt["config"]
    state = ckpt["state"]
    t, d, k, o, sc, tr, s = (cfg[x] for x in ("teacher", "data", "kd", "optim", "schedule", "train", "student"))
    base = load_metadata(f"transkd-{k['variant']}-b0-cityscapes")
    openus = load_metadata("openus-converted")
    name = name or cfg.get("name", "distilled")
    variant_name = VARIANT_NAMES[k["variant"]]
    teacher_name = (f"`{portable_path(t['pretrained'])}`" if t.get("pretrained")
                    else f"random-init {t['type']} (smoke test only)")
    dataset = _dataset_label(d)
    street = d["dataset"] in STREET_SCENES
    evals = state.get("evals") or []
    best = max(evals, key=lambda e: e["miou"]) if evals else None
    sc_ = ckpt.get("student_config") or {}
    id2label = sc_.get("id2label") or {}
    if s.get("id2label"):
        id2label = s["id2label"]

    recipe = (f"{variant_name}; loss = weighted CE + {k['hcl_weight']} x HCL + sum w_s x patch-embedding MSE, "
              f"w = {k['embed_weights']}")
    optimiser = (f"AdamW lr {o['lr']}, weight decay {o['weight_decay']}; linear poly decay per epoch over "
                 f"{_count(sc['max_decay_epochs'], 'epoch')}; batch {tr['batch_size']}")
    run_plan = (f"{_count(tr['epochs'], 'epoch')} configured"
                + (f", limited to {_count(tr['max_steps'], 'optimiser step')} (`train.max_steps`)"
                   if tr.get("max_steps") else ""))
    into = state.get("batch_in_epoch") or 0
    saved_at = (f"`{checkpoint_name}`, saved at optimiser step {state['step']} after "
                f"{_count(state['epoch'], 'complete epoch')}"
                + (f" and {_count(into, 'step')} of the next" if into else ""))
    data_line = (f"{dataset} (train split `{d['train_split']}`, val split `{d['val_split']}`); input "
                 f"{d['height']}x{d['width'] or 'auto'}, labels at {d['label_scale']}x resolution")
    model_details = "\n".join([
        f"- **Architecture:** SegFormer (MiT encoder, hidden sizes {sc_.get('hidden_sizes')}, depths "
        f"{sc_.get('depths')}, all-MLP decoder {sc_.get('decoder_hidden_size')}), {numbers['student_params']:,} "
        f"parameters; {len(id2label) or sc_.get('num_labels', '?')} classes "
        f"({', '.join(f'{i}: {v}' for i, v in id2label.items()) if id2label else 'see config.json'}).",
        "- **Format:** a stock `transformers` SegFormer (`SegformerForSemanticSegmentation`, `model_type` "
        "`segformer`); no custom code is needed to run it. Logits come out at 1/4 of the input resolution.",
        f"- **Teacher:** {teacher_name} ({t['type']})",
        f"- **Data:** {data_line}",
        f"- **Recipe:** {recipe}",
        f"- **Optimiser:** {optimiser}",
        f"- **Training run:** {run_plan}.",
        f"- **This checkpoint:** {saved_at}; code revision `{ckpt.get('git_sha') or 'unknown'}`.",
        f"- **LayerNorm eps:** the run used eps 1e-6 on block/stage norms: {s['upstream_layer_norm_eps']}; "
        "transformers builds every LayerNorm with eps 1e-5, so the reload difference is measured below.",
        "- **Recipe source:** TransKD ([RuipingL/TransKD](https://github.com/RuipingL/TransKD) at "
        f"`{base['source']['commit']}`), reimplemented in openus_hub's `training.distill`.",
    ])
    ratio_p = numbers["student_params"] / numbers["teacher_params"]
    ratio_f = numbers["student_gflops"] / numbers["teacher_gflops"]
    size_table = "\n".join([
        f"**Size and cost** ({FLOPS_RULE}):", "",
        "| model | params | GFLOPs |", "|---|---|---|",
        f"| teacher | {numbers['teacher_params']:,} | {numbers['teacher_gflops']:.2f} |",
        f"| student | {numbers['student_params']:,} | {numbers['student_gflops']:.2f} |",
        f"| student / teacher | {ratio_p:.3f} | {ratio_f:.3f} |",
    ])
    if best:
        result = (f"- best val mIoU: {best['miou']:.4f} (epoch {best['epoch']}, step {best['step']}); per class: "
                  f"{best['iou']}\n- note: the best epoch is selected on the same val split it is reported on "
                  "(as upstream).")
    else:
        result = "- no evaluation was run"
    evaluation = ("**Validation split, mIoU at the label resolution, upstream `iouEval` rule** (this run, "
                  f"`training.distill`):\n\n{result}\n\n{size_table}")
    dataset_type = d["dataset"] if d["dataset"] != "folder" else Path(d.get("root") or "folder").name
    eval_results = []
    if best and best["miou"] == best["miou"]:  # not NaN
        eval_results.append({
            "task_type": "image-segmentation", "dataset_type": dataset_type,
            "dataset_name": f"{dataset} ({d['val_split']}, labels at {d['label_scale']}x)",
            "dataset_split": d["val_split"], "metric_type": "mean_iou", "metric_name": "mIoU",
            "metric_value": round(100 * best["miou"], 2),  # %, as the TransKD cards
        })
    training_data = [{"name": f"{dataset} (train split `{d['train_split']}`, val split `{d['val_split']}`)",
                      "licence": DATA_LICENCES.get(d["dataset"], "see the dataset's own terms"),
                      "note": "distillation data (student and teacher see the same images)"},
                     {"name": f"teacher's training data ({teacher_name})",
                      "licence": "see the teacher's card",
                      "note": "the student inherits what the teacher learned from it"}]
    if street:
        if d["dataset"] == "cityscapes":
            training_data = list(base["training_data"]) + training_data[1:]
        uses, out_of_scope = base["uses"], base["out_of_scope"]
        limitations = (base["limitations"].splitlines()[0] if d["dataset"] == "cityscapes" else
                       "- Trained on ACDC adverse-condition street scenes (fog, night, rain, snow); expect degradation "
                       "elsewhere.") + (
            "\n- The best epoch is selected on the validation split it is reported on (as upstream), so the "
            "reported mIoU is optimistic.\n- mIoU is measured at the label resolution "
            f"({d['label_scale']}x, TransKD protocol); it is not comparable with full-resolution results.")
    else:
        uses = (f"- **Direct use:** research on fast semantic segmentation of 2-D ultrasound frames like those of "
                f"{dataset}.\n- **Downstream use:** a small, stock-transformers starting point for fine-tuning on "
                "similar data.")
        out_of_scope = ("- Any clinical use, including as a second reader.\n- Processing identifiable patient data "
                        "without the approvals and de-identification your institution requires.\n- Commercial use: "
                        "the teacher's licence and many ultrasound datasets forbid it.")
        limitations = "\n".join(openus["limitations"].split("\n- **Self-supervised features only.**")[:1]) + (
            "\n- **Selection on validation.** The best epoch is selected on the validation split it is reported on "
            "(as upstream), so the reported mIoU is optimistic.")
    if t["type"] == "openus":
        license_fields = {"license": "cc-by-nc-4.0", "license_name": None, "license_link": None}
        licence_text = ("Weights: CC BY-NC 4.0, as the OpenUS teacher they were distilled from (upstream OpenUS weights "
                        "are CC BY-NC 4.0). The distillation data keeps its own licence "
                        f"({DATA_LICENCES.get(d['dataset'], 'see the dataset own terms')}). openus_hub code: "
                        "Apache-2.0.")
        citation = base["citation"] + "\n\n" + openus["citation"]
    else:
        license_fields = {k_: base.get(k_) for k_ in ("license", "license_name", "license_link")}
        licence_text = ("Distilled from a SegFormer teacher: " + base["licence_text"]
                        + ("" if street else " The ultrasound training data keeps its own licence; check it too."))
        citation = base["citation"]
    tags = [x for x in base["tags"] if x != "cityscapes"]
    tags += [d["dataset"]] if street else ["ultrasound", "medical-imaging"]
    meta = dict(base)
    meta.update(
        name=name, title=f"{name}: SegFormer student distilled with {variant_name}",
        summary=(f"A SegFormer student distilled from {teacher_name} ({t['type']}) with {variant_name} on "
                 f"{dataset}. A stock `transformers` SegFormer (`SegformerForSemanticSegmentation`); no custom code "
                 "is needed to run it.\n\n**Not for clinical diagnosis.**"),
        tags=tags, datasets=[d["dataset"]] if street else [], base_model=None,
        model_details=model_details, uses=uses, out_of_scope=out_of_scope, limitations=limitations,
        get_started=("from transformers import AutoImageProcessor, SegformerForSemanticSegmentation\n"
                     f"processor = AutoImageProcessor.from_pretrained(\"{{org}}/{name}\")  # or the local folder\n"
                     f"logits = SegformerForSemanticSegmentation.from_pretrained(\"{{org}}/{name}\")"
                     "(**processor(images=image, return_tensors=\"pt\")).logits  # 1/4 resolution"),
        training_data=training_data, evaluation=evaluation, eval_results=eval_results, citation=citation,
        licence_text=licence_text, **license_fields,
    )
    meta.pop("source", None)
    return meta


def verification(ckpt: dict, checkpoint: str | Path, folder: Path, numbers: dict, input_desc: str) -> dict:
    eps = ckpt["config"]["student"]["upstream_layer_norm_eps"]
    return {
        "source_file": Path(checkpoint).name, "source_sha256": sha256_file(checkpoint),
        "converter": "training.export_student", "weights_sha256": sha256_file(folder / "model.safetensors"),
        "checks": [{"check": "exported folder reloaded with stock transformers vs the student as trained, logits",
                    "input": input_desc, "max_abs_diff": numbers["export_max_abs_diff"], "tolerance": None}],
        "notes": [f"max |logit difference| between the trained student and this exported folder: "
                  f"{numbers['export_max_abs_diff']:.2e} (transformers builds every LayerNorm with eps 1e-5; the run "
                  f"used eps 1e-6 on block/stage norms: {eps}).",
                  f"Parameters (teacher / student): {numbers['teacher_params']:,} / {numbers['student_params']:,}; "
                  f"GFLOPs: {numbers['teacher_gflops']:.2f} / {numbers['student_gflops']:.2f} ({FLOPS_RULE}).",
                  "Not a conversion: distilled with openus_hub (`training.distill`); see Model details for the "
                  "recipe."],
    }


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
    from conversion.model_card import write_card

    meta = card_metadata(ckpt, numbers, checkpoint_name=Path(checkpoint).name)
    write_card(out, meta, verification(ckpt, checkpoint, out, numbers,
                                       f"1 random image {x.shape[2]}x{x.shape[3]} (seed 0)"))
    atomic_write_text(out / "distillation.json", json.dumps({
        "checkpoint": portable_path(checkpoint), "numbers": numbers, "evals": ckpt["state"].get("evals", []),
        "recipe": portable_config(ckpt["config"], PATH_KEYS),
    }, indent=2, default=str))
    finish(logger, f"{out} (stock SegFormer: config.json, model.safetensors, preprocessor_config.json, README.md, "
                   f"distillation.json; max |logit difference| after reload {diff:.2e})",
           [f"openus-hub push {out} --repo-id ORG/NAME --dry-run   # check, then drop --dry-run to upload",
            f"python -m benchmarks.bench_students --student {out} --teacher TEACHER_FOLDER   # params, FLOPs, "
            "latency"])
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a distillation checkpoint (OUTPUT_DIR/checkpoints/best.pt or last.pt)")
    parser.add_argument("--output-dir", required=True,
                        help="folder to write (created if needed; files of the same names in it are replaced)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        export(args.checkpoint, args.output_dir)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
