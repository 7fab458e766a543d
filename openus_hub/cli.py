"""Command line: ``openus-hub embed INPUTS... --model DIR --output FILE`` (also ``push``, ``export-onnx``).

``embed`` exit codes: 0 every input embedded; 1 some inputs were skipped (the others are written, the summary says
why); 2 nothing was done (bad arguments, a ``--model`` that does not resolve: an unpublished or unknown registry
name, a missing folder, a Hub id that is not cached while offline; an output that would be clobbered without
``--overwrite``, an unwritable output, or ``--overwrite`` where every input failed: the old file is kept); 130 / 143
interrupted by SIGINT / SIGTERM (everything embedded so far is saved; run the same command again to continue).

Interruption: results are flushed every ``--flush-every`` inputs or ``--flush-seconds`` seconds, by an atomic
rewrite (temporary file, then ``os.replace``). Without ``--overwrite`` they go straight into ``--output``, which is
how a re-run resumes. With ``--overwrite`` the new table is built in a hidden file beside the output
(``.<name>.openus-partial<ext>``) and replaces the old file only when the run ends; an interrupted ``--overwrite``
run is continued from that file by the next ``--overwrite`` run with the same model and settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io.files import pid_alive

logger = logging.getLogger(__name__)

# 2: the model fingerprint is the sha256 of the weight files and config.json (1: a digest of a few weights)
FORMAT_VERSION = 2
_MANIFEST_KEYS = ("source", "frame_index", "height", "width", "channels", "crop_box", "sha256")
_SETTINGS = ("format_version", "model_fingerprint", "crop", "frame_stride", "num_frames", "processor")
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _model_fingerprint(model: Any, folder: Path | None = None) -> str:
    """sha256 of what the embeddings depend on: ``config.json`` and every ``*.safetensors`` file of a local model
    folder; otherwise the config and every weight tensor's bytes."""
    h = hashlib.sha256()
    weights = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    if weights and (folder / "config.json").is_file():
        from .auto import sha256_file

        for path in [folder / "config.json", *weights]:
            h.update(f"{path.name}:{sha256_file(path)};".encode())
        return h.hexdigest()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    """Read an embeddings file written by ``openus-hub embed``; ValueError (one line, naming the file) when it is
    something else, or truncated or corrupt."""
    path = Path(path)
    if path.suffix == ".parquet":
        pq = _pyarrow()
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated files
            raise ValueError(f"{path} is not a readable parquet file (truncated or corrupt?)") from e
        meta = json.loads((table.schema.metadata or {}).get(b"openus_hub", b"{}"))
        if "format_version" not in meta:
            raise ValueError(f"{path} is not an openus-hub embeddings file")
        cols = table.to_pydict()
        data = {k: np.asarray(cols[k]) for k in _MANIFEST_KEYS}
        data["crop_box"] = np.asarray(cols["crop_box"], dtype=np.int64).reshape(-1, 4)
        data["embeddings"] = np.asarray(cols["embedding"], dtype=np.float32).reshape(len(data["source"]), -1)
        meta["_skipped"] = {"skipped_source": np.asarray(meta.pop("skipped_source", []), dtype=str),
                            "skipped_reason": np.asarray(meta.pop("skipped_reason", []), dtype=str)}
        return data, meta
    try:
        with np.load(path, allow_pickle=False) as z:
            if "openus_hub_meta" not in z.files:
                raise ValueError(f"{path} is not an openus-hub embeddings file (no 'openus_hub_meta' entry)")
            meta = json.loads(str(z["openus_hub_meta"]))
            data = {k: z[k] for k in ("embeddings", *_MANIFEST_KEYS)}
            skipped = {"skipped_source": z["skipped_source"], "skipped_reason": z["skipped_reason"]}
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path} is not a readable openus-hub embeddings file ({type(e).__name__})") from e
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable openus-hub embeddings file (truncated or corrupt? "
                         f"{type(e).__name__})") from e
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


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of runs that were killed (their pid no longer exists)."""
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)



def write_output(path: Path, data: dict[str, np.ndarray], meta: dict[str, Any], skipped: list[tuple[str, str]]) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".parquet":
                import pyarrow as pa

                pq = _pyarrow()
                cols = {k: data[k].tolist() for k in _MANIFEST_KEYS if k != "crop_box"}
                cols["crop_box"] = data["crop_box"].tolist()
                cols["embedding"] = data["embeddings"].tolist()
                full = {**meta, "skipped_source": [s for s, _ in skipped], "skipped_reason": [r for _, r in skipped]}
                table = pa.table(cols).replace_schema_metadata({"openus_hub": json.dumps(full)})
                pq.write_table(table, f)
            else:
                np.savez(
                    f,
                    **data,
                    openus_hub_meta=np.asarray(json.dumps(meta)),
                    skipped_source=np.asarray([s for s, _ in skipped], dtype=str),
                    skipped_reason=np.asarray([r for _, r in skipped], dtype=str),
                )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Table:
    """The embeddings written so far (``base``, e.g. a file being resumed) plus the rows of this run."""

    def __init__(self, base: dict[str, np.ndarray]):
        self.base = base
        self.rows: list[dict[str, Any]] = []
        self.embeddings: list[np.ndarray] = []
        self.stale: set[str] = set()  # sources whose file changed: their old rows are dropped

    def add(self, embeddings: np.ndarray, rows: list[dict[str, Any]]) -> None:
        self.embeddings.append(embeddings)
        self.rows.extend(rows)

    def arrays(self) -> dict[str, np.ndarray]:
        data = self.base
        if self.stale:
            keep = ~np.isin(data["source"], list(self.stale))
            data = {k: v[keep] for k, v in data.items()}
        if not self.rows:
            return data
        merged = {"embeddings": np.concatenate([data["embeddings"], *self.embeddings]).astype(np.float32)}
        for k in _MANIFEST_KEYS:
            dtype = str if k in ("source", "sha256") else data[k].dtype
            merged[k] = np.concatenate([data[k], np.asarray([r[k] for r in self.rows], dtype=dtype)])
        return merged


class _StopRequested:
    """SIGINT/SIGTERM set a flag (the run stops after the current batch and saves); a second signal stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self):
        for sig in EXIT_INTERRUPTED:
            try:
                self._saved[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, KeyboardInterrupt still works
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        return False


# ------------------------------------------------------------------------------------------------ embed
class _EmbedError(Exception):
    """A usage problem found while setting up ``embed``: printed as one line, exit status 2."""


def _load_model(args: argparse.Namespace):
    """(model, processor, fingerprint, embedding width) for ``--model``: an ``.onnx`` export, or any name
    :func:`openus_hub.pretrained.resolve` takes (a folder, a registry name, a Hub id)."""
    import torch

    from .features import load_processor
    from .pretrained import OpenUSHubError, resolve

    if str(args.model).endswith(".onnx"):  # an exported graph, run in ONNX Runtime with the processor beside it
        from .onnx import ORTModel

        try:
            model = ORTModel.from_pretrained(args.model)
        except (ImportError, OSError, ValueError) as e:
            raise _EmbedError(str(e)) from None
        if model.task != "feature-extraction":
            raise _EmbedError(f"{args.model} is a {model.task} export; embed needs one exported with --task "
                              "feature-extraction")
        return model, model.processor, model.fingerprint(), int(model.config.hidden_sizes[-1])
    try:
        folder, _ = resolve(args.model)
    except OpenUSHubError as e:
        raise _EmbedError(str(e)) from None
    from .auto import AutoModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _EmbedError(f"cannot load --model {args.model} ({folder}): {first}") from None
    model = getattr(model, "base_model", model).to(device).eval()
    if not hasattr(model.config, "hidden_sizes"):
        raise _EmbedError(f"--model {args.model} is a {model.config.model_type} model; embed needs an OpenUS model")
    folder = Path(folder)
    return model, load_processor(model, folder), _model_fingerprint(model, folder), int(model.config.hidden_sizes[-1])


def _check_writable(path: Path) -> str | None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot write {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {path}: {parent} is not writable"
    return None


def _embed(args: argparse.Namespace) -> int:
    try:
        return _embed_run(args)
    except _EmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during the final save, or before the handlers were installed
        print("openus-hub embed: interrupted; results up to the last flush are saved, run the same command again "
              "to continue", file=sys.stderr)
        return EXIT_INTERRUPTED[signal.SIGINT]


def _embed_run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .auto import sha256_file
    from .features import embed_items, expand_input
    from .io import find_inputs

    out_path = Path(args.output)
    if out_path.suffix not in (".npz", ".parquet"):
        print(f"error: --output must end in .npz or .parquet, got {out_path.name}", file=sys.stderr)
        return 2
    if out_path.suffix == ".parquet":
        _pyarrow()
    problem = _check_writable(out_path)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        files = find_inputs(args.inputs, recursive=not args.no_recursive)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    partial = out_path.with_name(f".{out_path.stem}.openus-partial{out_path.suffix}")
    for own in (out_path, partial):
        if own.resolve() in files:
            files.remove(own.resolve())
    _remove_stale_temporaries(out_path)
    _remove_stale_temporaries(partial)

    existing = None
    if out_path.exists() and not args.overwrite:  # before loading the model: an unreadable output fails fast
        try:
            existing = read_output(out_path)
        except ValueError as e:
            print(f"error: {e}; refusing to overwrite it (pass --overwrite to replace it)", file=sys.stderr)
            return 2

    model, processor, fingerprint, dim = _load_model(args)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": str(args.model),
        "model_fingerprint": fingerprint,
        "crop": args.crop,
        "frame_stride": args.frame_stride,
        "num_frames": args.num_frames,
        "processor": processor.to_dict(),
    }
    old_rows = None
    if args.overwrite:
        # build the new table beside the old file; it replaces the old one only when the run ends
        target, base = partial, _empty_table(dim)
        if out_path.exists():
            try:
                old_rows = len(read_output(out_path)[0]["source"])
            except ValueError:
                old_rows = None  # unreadable: replaced
        if partial.exists():
            try:
                data, old_meta = read_output(partial)
                if all(_same(old_meta.get(k), meta[k]) for k in _SETTINGS):
                    base = data
                    logger.info("continuing the interrupted --overwrite run in %s (%d rows)", partial,
                                len(data["source"]))
            except ValueError:
                pass
    else:
        target, base = out_path, _empty_table(dim)
        if existing is not None:
            base, old_meta = existing
            changed = [k for k in _SETTINGS if not _same(old_meta.get(k), meta[k])]
            if changed:
                print(
                    f"error: {out_path} was written with different {', '.join(changed)}; refusing to mix embeddings "
                    "(pass --overwrite to replace it, or choose another --output)",
                    file=sys.stderr,
                )
                return 2
    done = dict(zip(base["source"].tolist(), base["sha256"].tolist()))

    table = _Table(base)
    skipped: list[tuple[str, str]] = []
    pending: list = []
    n_resumed, n_since_flush, last_flush = 0, 0, time.monotonic()

    def run_batch() -> None:
        if not pending:
            return
        items = [it for it, _ in pending]
        pooled, _ = embed_items(model, processor, items, batch_size=args.batch_size, return_stage_maps=False)
        rows = []
        for it, sha in pending:
            box = it.crop_box if it.crop_box is not None else (-1, -1, -1, -1)
            h, w, c = (list(it.shape) + [1])[:3]
            rows.append(dict(source=it.source, frame_index=it.frame_index, height=h, width=w, channels=c,
                             crop_box=box, sha256=sha))
        table.add(pooled.numpy(), rows)
        pending.clear()

    def save() -> None:
        nonlocal n_since_flush, last_flush
        write_output(target, table.arrays(), meta, skipped)
        n_since_flush, last_flush = 0, time.monotonic()

    stopped = None
    try:
        with _StopRequested() as stop:
            for path in tqdm(files, desc="embedding", unit="file", disable=args.no_progress):
                if stop.signal is not None:
                    break
                key = str(path)
                try:
                    sha = sha256_file(path)
                    if done.get(key) == sha:
                        n_resumed += 1
                        continue
                    if key in done:
                        table.stale.add(key)  # the file changed since it was embedded: recompute it
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
                n_since_flush += 1
                if len(pending) >= args.batch_size:
                    run_batch()
                if n_since_flush >= args.flush_every or time.monotonic() - last_flush >= args.flush_seconds:
                    run_batch()
                    save()
            run_batch()
            stopped = stop.signal
    except OSError as e:
        print(f"error: could not write {target}: {e}", file=sys.stderr)
        return 2

    data = table.arrays()
    n_new = len({r["source"] for r in table.rows})
    try:
        if stopped is not None:
            save()
            name = signal.Signals(stopped).name
            print(f"openus-hub embed: interrupted by {name}: {len(data['source'])} rows saved in {target} "
                  f"({n_new} file(s) embedded this run); run the same command again to continue", file=sys.stderr)
            return EXIT_INTERRUPTED[stopped]
        if args.overwrite:
            if not table.rows and len(data["source"]) == 0 and old_rows:
                partial.unlink(missing_ok=True)
                print(f"error: no input could be embedded ({len(skipped)} skipped); kept the existing {out_path} "
                      f"({old_rows} rows) unchanged", file=sys.stderr)
                for source, reason in skipped:
                    print(f"  skipped {source}: {reason}", file=sys.stderr)
                return 2
            save()
            os.replace(partial, out_path)
        elif table.rows or table.stale or not out_path.exists():
            save()
    except OSError as e:
        print(f"error: could not write {target}: {e}", file=sys.stderr)
        return 2

    print(
        f"openus-hub embed: {n_new} file(s) embedded ({len(table.rows)} rows), {n_resumed} already in "
        f"{out_path.name}, {len(skipped)} skipped; {len(data['source'])} rows in {out_path}",
        file=sys.stderr,
    )
    for source, reason in skipped:
        print(f"  skipped {source}: {reason}", file=sys.stderr)
    return 1 if skipped else 0


def _same(a: Any, b: Any) -> bool:
    """Equal once both went through JSON (the stored metadata did)."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="openus-hub", description="OpenUS ultrasound foundation model tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    embed = sub.add_parser(
        "embed",
        help="embed images, DICOM files and cine loops into an .npz/.parquet file",
        description="Embed PNG/JPEG/TIFF/DICOM files (folders are searched recursively) with an OpenUS model. "
        "Writes pooled embeddings plus a manifest (source, frame index, shape, crop box, sha256 of the source). "
        "Re-running on the same output skips inputs already embedded (same sha256). Results are saved every "
        "--flush-every files or --flush-seconds seconds; Ctrl-C (SIGINT) or SIGTERM saves and stops, and a re-run "
        "continues. Exit codes: 0 all embedded, 1 some inputs skipped, 2 nothing done (including a --model that "
        "does not resolve: one line says why), 130/143 interrupted by "
        "SIGINT/SIGTERM (saved; run again to continue).",
    )
    embed.add_argument("inputs", nargs="+", help="files and/or folders")
    embed.add_argument("--model", required=True,
                       help="OpenUS model folder, registry name (openus_hub.list_models()) or Hub id 'org/name' "
                            "(the local HF cache first; offline, only what is cached), or a feature-extraction .onnx "
                            "export")
    embed.add_argument("--output", required=True, help="output file, .npz (or .parquet with openus_hub[parquet])")
    embed.add_argument("--batch-size", type=int, default=8)
    embed.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    embed.add_argument("--crop", default="auto", choices=["auto", "regions", "heuristic", "none"],
                       help="DICOM ultrasound-region cropping (default: auto)")
    embed.add_argument("--frame-stride", type=int, default=1, help="embed every n-th cine frame")
    embed.add_argument("--num-frames", type=int, default=None, help="embed n evenly spaced cine frames")
    embed.add_argument("--overwrite", action="store_true",
                       help="replace an existing output instead of resuming (the new file is built first; a run where "
                            "every input fails keeps the old one)")
    embed.add_argument("--flush-every", type=int, default=50, metavar="N",
                       help="save the results every N input files (default 50)")
    embed.add_argument("--flush-seconds", type=float, default=60.0, metavar="S",
                       help="and at least every S seconds (default 60)")
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
    if getattr(args, "flush_every", 1) < 1 or getattr(args, "flush_seconds", 1) <= 0:
        parser.error("--flush-every must be >= 1 and --flush-seconds > 0")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
