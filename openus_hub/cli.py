"""Command line: ``openus-hub embed INPUTS... --model DIR --output FILE`` (also ``push``, ``export-onnx``).

Exit codes: 0 every input embedded; 1 some inputs were skipped (the others are written, the summary says why);
2 nothing was done (bad arguments, or an existing output that would be clobbered without ``--overwrite``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MANIFEST_KEYS = ("source", "frame_index", "height", "width", "channels", "crop_box", "sha256")


def _model_fingerprint(model: Any) -> str:
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    n = sum(p.numel() for p in model.parameters())
    head = next(model.parameters()).detach().float().flatten()[:64].cpu().numpy().round(6).tolist()
    return hashlib.sha256(json.dumps([cfg, n, head], sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ storage
def _empty_table(dim: int) -> dict[str, np.ndarray]:
    return {
        "embeddings": np.zeros((0, dim), np.float32),
        "source": np.zeros((0,), dtype=str),
        "frame_index": np.zeros((0,), np.int64),
        "height": np.zeros((0,), np.int64),
        "width": np.zeros((0,), np.int64),
        "channels": np.zeros((0,), np.int64),
        "crop_box": np.zeros((0, 4), np.int64),
        "sha256": np.zeros((0,), dtype=str),
    }


def read_output(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an embeddings file written by ``openus-hub embed``; ValueError when it is something else."""
    if path.suffix == ".parquet":
        pq = _pyarrow()
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"openus_hub", b"{}"))
        if "format_version" not in meta:
            raise ValueError(f"{path} is not an openus-hub embeddings file")
        cols = table.to_pydict()
        data = {k: np.asarray(cols[k]) for k in _MANIFEST_KEYS}
        data["crop_box"] = np.asarray(cols["crop_box"], dtype=np.int64).reshape(-1, 4)
        data["embeddings"] = np.asarray(cols["embedding"], dtype=np.float32).reshape(len(data["source"]), -1)
        return data, meta
    try:
        with np.load(path, allow_pickle=False) as z:
            if "openus_hub_meta" not in z.files:
                raise ValueError(f"{path} is not an openus-hub embeddings file (no 'openus_hub_meta' entry)")
            meta = json.loads(str(z["openus_hub_meta"]))
            data = {k: z[k] for k in ("embeddings", *_MANIFEST_KEYS)}
            skipped = {"skipped_source": z["skipped_source"], "skipped_reason": z["skipped_reason"]}
    except (OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path} is not a readable openus-hub embeddings file ({type(e).__name__})") from e
    meta["_skipped"] = skipped
    return data, meta


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SystemExit(
            'writing .parquet needs pyarrow: pip install "openus_hub[parquet]" (or use a .npz output)'
        ) from e
    return pq


def write_output(path: Path, data: dict[str, np.ndarray], meta: dict[str, Any], skipped: list[tuple[str, str]]) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".parquet":
                import pyarrow as pa

                pq = _pyarrow()
                cols = {k: data[k].tolist() for k in _MANIFEST_KEYS if k != "crop_box"}
                cols["crop_box"] = data["crop_box"].tolist()
                cols["embedding"] = data["embeddings"].tolist()
                table = pa.table(cols).replace_schema_metadata({"openus_hub": json.dumps(meta)})
                pq.write_table(table, f)
            else:
                np.savez(
                    f,
                    **data,
                    openus_hub_meta=np.asarray(json.dumps(meta)),
                    skipped_source=np.asarray([s for s, _ in skipped], dtype=str),
                    skipped_reason=np.asarray([r for _, r in skipped], dtype=str),
                )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------ embed
def _embed(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor, AutoModel

    from .auto import sha256_file
    from .features import embed_items, expand_input
    from .io import find_inputs

    out_path = Path(args.output)
    if out_path.suffix not in (".npz", ".parquet"):
        print(f"error: --output must end in .npz or .parquet, got {out_path.name}", file=sys.stderr)
        return 2
    if out_path.suffix == ".parquet":
        _pyarrow()
    try:
        files = find_inputs(args.inputs, recursive=not args.no_recursive)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out_path.resolve() in files:
        files.remove(out_path.resolve())

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(args.model).endswith(".onnx"):  # an exported graph, run in ONNX Runtime with the processor beside it
        from .onnx import ORTModel

        try:
            model = ORTModel.from_pretrained(args.model)
        except (ImportError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if model.task != "feature-extraction":
            print(f"error: {args.model} is a {model.task} export; embed needs one exported with --task "
                  "feature-extraction", file=sys.stderr)
            return 2
        processor, fingerprint = model.processor, model.fingerprint()
    else:
        model = AutoModel.from_pretrained(args.model)
        model = getattr(model, "base_model", model).to(device).eval()
        folder = Path(args.model)
        if (folder / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(str(folder))
        else:
            from .models.openus import OpenUSImageProcessor

            processor = OpenUSImageProcessor()
            logger.info("no preprocessor_config.json in %s: using OpenUSImageProcessor defaults", folder)
        fingerprint = _model_fingerprint(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": str(args.model),
        "model_fingerprint": fingerprint,
        "crop": args.crop,
        "frame_stride": args.frame_stride,
        "num_frames": args.num_frames,
        "processor": processor.to_dict(),
    }

    dim = int(model.config.hidden_sizes[-1])
    data, done = _empty_table(dim), {}
    if out_path.exists() and not args.overwrite:
        try:
            data, old_meta = read_output(out_path)
        except ValueError as e:
            print(f"error: {e}; refusing to overwrite it (pass --overwrite to replace it)", file=sys.stderr)
            return 2
        settings = ("model_fingerprint", "crop", "frame_stride", "num_frames")
        changed = [k for k in settings if old_meta.get(k) != meta[k]]
        if changed:
            print(
                f"error: {out_path} was written with different {', '.join(changed)}; refusing to mix embeddings "
                "(pass --overwrite to replace it, or choose another --output)",
                file=sys.stderr,
            )
            return 2
        done = dict(zip(data["source"].tolist(), data["sha256"].tolist()))

    skipped: list[tuple[str, str]] = []
    new_rows: list[dict[str, Any]] = []
    new_embeddings: list[np.ndarray] = []
    n_resumed = 0
    pending: list = []
    stale: set[str] = set()

    def flush() -> None:
        if not pending:
            return
        items = [it for it, _ in pending]
        pooled, _ = embed_items(model, processor, items, batch_size=args.batch_size, return_stage_maps=False)
        new_embeddings.append(pooled.numpy())
        for it, sha in pending:
            box = it.crop_box if it.crop_box is not None else (-1, -1, -1, -1)
            h, w, c = (list(it.shape) + [1])[:3]
            new_rows.append(dict(source=it.source, frame_index=it.frame_index, height=h, width=w, channels=c,
                                 crop_box=box, sha256=sha))
        pending.clear()

    for path in tqdm(files, desc="embedding", unit="file", disable=args.no_progress):
        key = str(path)
        try:
            sha = sha256_file(path)
            if done.get(key) == sha:
                n_resumed += 1
                continue
            if key in done:
                stale.add(key)  # the file changed since it was embedded: recompute it
            items = expand_input(
                path, frame_stride=args.frame_stride, num_frames=args.num_frames, dicom_crop=args.crop
            )
            # check the inputs now so that one bad file is reported instead of failing a whole batch later
            processor([it.image for it in items[:1]], dicom_crop="none", do_range_check=False)
        except Exception as e:  # one unreadable file never aborts the run
            skipped.append((key, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
            logger.debug("skipped %s", key, exc_info=True)
            continue
        pending.extend((it, sha) for it in items)
        if len(pending) >= args.batch_size:
            flush()
    flush()

    if stale:
        keep = ~np.isin(data["source"], list(stale))
        data = {k: v[keep] for k, v in data.items()}
    if new_rows:
        merged = {"embeddings": np.concatenate([data["embeddings"], *new_embeddings]).astype(np.float32)}
        for k in _MANIFEST_KEYS:
            dtype = str if k in ("source", "sha256") else data[k].dtype
            merged[k] = np.concatenate([data[k], np.asarray([r[k] for r in new_rows], dtype=dtype)])
        data = merged
    if new_rows or stale or not out_path.exists() or args.overwrite:
        write_output(out_path, data, meta, skipped)

    n_new = len({r["source"] for r in new_rows})
    print(
        f"openus-hub embed: {n_new} file(s) embedded ({len(new_rows)} rows), {n_resumed} already in {out_path.name}, "
        f"{len(skipped)} skipped; {len(data['source'])} rows in {out_path}",
        file=sys.stderr,
    )
    for source, reason in skipped:
        print(f"  skipped {source}: {reason}", file=sys.stderr)
    return 1 if skipped else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openus-hub", description="OpenUS ultrasound foundation model tools")
    sub = parser.add_subparsers(dest="command", required=True)
    embed = sub.add_parser(
        "embed",
        help="embed images, DICOM files and cine loops into an .npz/.parquet file",
        description="Embed PNG/JPEG/TIFF/DICOM files (folders are searched recursively) with an OpenUS model. "
        "Writes pooled embeddings plus a manifest (source, frame index, shape, crop box, sha256 of the source). "
        "Re-running on the same output skips inputs already embedded (same sha256). Exit codes: 0 all "
        "embedded, 1 some inputs skipped, 2 nothing done.",
    )
    embed.add_argument("inputs", nargs="+", help="files and/or folders")
    embed.add_argument("--model", required=True,
                       help="OpenUS model folder (or hub id, when online), or a feature-extraction .onnx export")
    embed.add_argument("--output", required=True, help="output file, .npz (or .parquet with openus_hub[parquet])")
    embed.add_argument("--batch-size", type=int, default=8)
    embed.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    embed.add_argument("--crop", default="auto", choices=["auto", "regions", "heuristic", "none"],
                       help="DICOM ultrasound-region cropping (default: auto)")
    embed.add_argument("--frame-stride", type=int, default=1, help="embed every n-th cine frame")
    embed.add_argument("--num-frames", type=int, default=None, help="embed n evenly spaced cine frames")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming")
    embed.add_argument("--no-recursive", action="store_true", help="do not descend into subfolders")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(func=_embed)
    from .hub import add_push_subcommand
    from .onnx.cli import add_export_onnx_subcommand

    add_push_subcommand(sub)
    add_export_onnx_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
