"""Render model cards (README.md) from ``model_cards/template.md`` and a per-checkpoint metadata file.

The YAML front matter comes from ``huggingface_hub.ModelCardData`` (license, library_name, pipeline_tag, tags,
datasets, base_model, model-index eval results); the body from the template with ``string.Template`` (every
placeholder must be filled). :func:`validate_card` parses the result back with ``huggingface_hub.ModelCard`` and
checks the licence, every template section and, for converted weights, the measured verification numbers.

Converters call :func:`write_card` with what they measured::

    verification = {"source_file": "checkpoint.pth", "source_sha256": "...", "upstream": "XZheng0427/OpenUS",
                    "upstream_commit": "6b9f6d2e...", "checks": [{"check": "...", "input": "...",
                    "max_abs_diff": 3.1e-07, "tolerance": 1e-4}], "notes": ["..."]}

``python conversion/model_card.py NAME [--out README.md]`` renders a card without measurements (for review).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"
TEMPLATE = CARDS_DIR / "template.md"
SECTIONS = ("Model details", "Uses", "Out-of-scope use", "Bias, risks and limitations", "How to get started",
            "Training data", "Evaluation", "Conversion and verification", "Citation", "Licence")
REQUIRED_FIELDS = ("name", "title", "summary", "license", "pipeline_tag", "model_details", "uses", "out_of_scope",
                   "limitations", "get_started", "training_data", "evaluation", "citation", "licence_text")
NOT_MEASURED = "Not measured: this card was rendered without a conversion run."


class CardError(ValueError):
    """A card or metadata file that is incomplete or does not parse."""


def card_names() -> list[str]:
    """The names ``--card-name`` takes: the registry's names that have a card (:mod:`openus_hub.pretrained`), plus
    the other metadata files in ``model_cards/`` (e.g. ``openus-converted``)."""
    from openus_hub.pretrained import list_pretrained

    registry = {e.name for e in list_pretrained() if e.card and (CARDS_DIR / e.card).is_file()}
    return sorted(registry | {p.stem for p in CARDS_DIR.glob("*.json")})


def check_card_name(name: str) -> None:
    """Refuse a ``--card-name`` that names no card (one line, with the close matches), before any conversion runs.
    A path to a metadata ``.json`` file is accepted as it is."""
    if Path(name).suffix == ".json" and Path(name).is_file():
        return
    known = card_names()
    if name in known:
        return
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise CardError(f"unknown model card name {name!r}.{hint} Known: {', '.join(known)} (model_cards/<NAME>.json), "
                    "or a metadata .json path")


def load_metadata(name_or_path: str | Path) -> dict:
    """Metadata of a named checkpoint (``model_cards/<name>.json``) or from a path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CARDS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CARDS_DIR.glob("*.json"))
        raise CardError(f"no card metadata {path}; known: {known}")
    meta = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in REQUIRED_FIELDS if not meta.get(k)]
    if missing:
        raise CardError(f"{path}: missing or empty field(s) {missing}")
    return meta


def _fmt(x: float) -> str:
    return f"{x:.2e}"


def _verification_md(meta: dict, verification: dict | None) -> str:
    if not verification:
        src = meta.get("source") or {}
        tail = f" Upstream code: {src['repo']} at `{src['commit']}`." if src else ""
        return NOT_MEASURED + tail
    lines = []
    if verification.get("source_file"):
        lines.append(f"- **Source file:** `{verification['source_file']}`")
    if verification.get("source_sha256"):
        lines.append(f"- **Source sha256:** `{verification['source_sha256']}`")
    if verification.get("upstream"):
        lines.append(f"- **Upstream code:** {verification['upstream']} at commit "
                     f"`{verification.get('upstream_commit', 'unknown')}`")
    if verification.get("converter"):
        lines.append(f"- **Converter:** `{verification['converter']}`")
    if verification.get("weights_sha256"):
        lines.append(f"- **model.safetensors sha256:** `{verification['weights_sha256']}`")
    checks = verification.get("checks") or []
    if checks:
        worst = max(c["max_abs_diff"] for c in checks)
        lines += ["", f"Maximum absolute difference measured: **{_fmt(worst)}**.", "",
                  "| check | input | max abs difference | tolerance |", "|---|---|---|---|"]
        for c in checks:
            tol = _fmt(c["tolerance"]) if c.get("tolerance") is not None else "-"
            lines.append(f"| {c['check']} | {c.get('input', '')} | {_fmt(c['max_abs_diff'])} | {tol} |")
    for note in verification.get("notes") or []:
        lines += ["", note]
    return "\n".join(lines)


def _training_data_md(rows: list[dict]) -> str:
    out = ["| dataset | licence / access | notes |", "|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r.get('licence', 'unknown')} | {r.get('note', '')} |")
    return "\n".join(out)


def _card_data(meta: dict):
    from huggingface_hub import EvalResult, ModelCardData

    evals = [EvalResult(**r) for r in meta.get("eval_results") or []]
    kwargs = dict(
        license=meta["license"], library_name="transformers", pipeline_tag=meta["pipeline_tag"],
        tags=list(meta.get("tags") or []), datasets=list(meta.get("datasets") or []) or None,
        base_model=meta.get("base_model") or None, model_name=meta.get("repo_id") or meta["name"],
        eval_results=evals or None,
    )
    if meta["license"] == "other":
        kwargs["license_name"] = meta.get("license_name") or "other"
        kwargs["license_link"] = meta.get("license_link")
    return ModelCardData(**{k: v for k, v in kwargs.items() if v is not None})


def render_card(meta: dict | str, verification: dict | None = None, *, repo_id: str | None = None,
                org: str | None = None) -> str:
    """The README.md text: ModelCardData front matter + the filled template."""
    if not isinstance(meta, dict):
        meta = load_metadata(meta)
    meta = dict(meta)
    if repo_id:
        meta["repo_id"] = repo_id
    if org is None:
        from openus_hub.pretrained import hub_org

        org = hub_org()
    body = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=meta["title"], summary=meta["summary"], model_details=meta["model_details"], uses=meta["uses"],
        out_of_scope=meta["out_of_scope"], limitations=meta["limitations"],
        get_started=meta["get_started"].replace("{org}", org), training_data=_training_data_md(meta["training_data"]),
        evaluation=meta["evaluation"], verification=_verification_md(meta, verification),
        citation=meta["citation"], licence_text=meta["licence_text"],
    )
    return f"---\n{_card_data(meta).to_yaml()}\n---\n\n{body}"


def validate_card(text_or_path: str | Path, require_verification: bool = False):
    """Parse with ``huggingface_hub.ModelCard`` and check licence, sections and (optionally) measured numbers.
    Returns the ModelCard; raises :class:`CardError` naming what is wrong."""
    from huggingface_hub import ModelCard

    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path):
        path = Path(text_or_path)
        if not path.is_file():
            raise CardError(f"no model card at {path}")
        text_or_path = path.read_text(encoding="utf-8")
    try:
        card = ModelCard(text_or_path)
    except Exception as err:
        raise CardError(f"the card does not parse: {err}") from None
    problems = []
    if not card.data.get("license"):
        problems.append("no licence in the front matter")
    if card.data.get("license") == "other" and not card.data.get("license_name"):
        problems.append("license 'other' without license_name")
    headings = {line[3:].strip() for line in card.text.splitlines() if line.startswith("## ")}
    missing = [s for s in SECTIONS if s not in headings]
    if missing:
        problems.append(f"missing section(s) {missing}")
    if require_verification and (NOT_MEASURED in card.text or "Maximum absolute difference measured" not in card.text):
        problems.append("no measured verification numbers")
    if problems:
        raise CardError("; ".join(problems))
    return card


def write_card(folder: str | Path, meta: dict | str, verification: dict | None = None, **kwargs) -> Path:
    """Render, validate and write ``folder/README.md``."""
    text = render_card(meta, verification, **kwargs)
    validate_card(text, require_verification=verification is not None)
    path = Path(folder) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render a model card from model_cards/<NAME>.json (no measurements)")
    p.add_argument("name", help="checkpoint name (a file in model_cards/) or a metadata .json path")
    p.add_argument("--out", default=None, help="write here instead of stdout")
    args = p.parse_args(argv)
    text = render_card(args.name)
    validate_card(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
