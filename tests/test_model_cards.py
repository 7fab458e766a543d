"""Model cards: rendered from model_cards/ with ModelCardData front matter, parsed back with huggingface_hub.ModelCard;
the OpenUS converter writes README.md with the numbers it measured."""

import hashlib
import re

import pytest
from huggingface_hub import ModelCard

from conversion import convert_openus_to_hf as conv
from conversion.model_card import (CARDS_DIR, NOT_MEASURED, SECTIONS, CardError, load_metadata, render_card,
                                   validate_card)
from openus_hub import list_pretrained
from tests.conftest import parity_path

NAMES = sorted(p.stem for p in CARDS_DIR.glob("*.json"))


def _sections(card):
    return [line[3:].strip() for line in card.text.splitlines() if line.startswith("## ")]


def test_every_registry_entry_has_a_card():
    assert {e.card[:-5] for e in list_pretrained()} <= set(NAMES)
    assert len(NAMES) == 8


@pytest.mark.parametrize("name", NAMES)
def test_card_renders_and_parses_with_every_section(name, monkeypatch):
    monkeypatch.setenv("OPENUS_HUB_ORG", "my-org")
    meta = load_metadata(name)
    text = render_card(meta)
    card = ModelCard(text)  # parses back
    assert _sections(card) == list(SECTIONS)  # every template section, in order, nothing else
    assert card.data.license == meta["license"] and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == meta["pipeline_tag"] and "openus_hub" in card.data.tags
    body = card.text
    assert "**This model is not a medical device.**" in body and "must not be used for diagnosis" in body
    assert "| dataset | licence / access | notes |" in body and "$" not in body.replace("$$", "")
    assert "{org}" not in body and ("my-org/" in body or name.startswith("openus"))
    assert NOT_MEASURED in body  # rendered without a conversion run: says so instead of inventing numbers
    if name.startswith("openus"):
        assert card.data.license == "cc-by-nc-4.0"
        assert "BUSI alone has 235\n  duplicate images" in body and "Scanners and protocols" in body
        assert "arXiv:2511.11510" in body
    else:
        assert card.data.license_name == "no-upstream-licence" and card.data.license_link
        (result,) = card.data.eval_results
        assert result.metric_type == "mean_iou" and result.dataset_split == "validation" and result.verified is False
        assert result.source_name.startswith("TransKD README")
    validate_card(text)


def test_validate_card_rejects_incomplete_cards():
    text = render_card("openus-small")
    with pytest.raises(CardError, match="no licence"):
        validate_card(text.replace("license: cc-by-nc-4.0\n", ""))
    with pytest.raises(CardError, match=r"missing section\(s\) \['Out-of-scope use'\]"):
        validate_card(text.replace("## Out-of-scope use", "## Something else"))
    with pytest.raises(CardError, match="no measured verification numbers"):
        validate_card(text, require_verification=True)
    meta = load_metadata("openus-small")
    meta.pop("limitations")
    with pytest.raises(KeyError):
        render_card(meta)
    with pytest.raises(CardError, match="no card metadata"):
        load_metadata("openus-huge")


def test_openus_converter_writes_card_with_measured_numbers(tmp_path, capsys):
    ckpt = parity_path("openus", "cfg_a") / "checkpoint.pth"
    out = tmp_path / "out"
    assert conv.main(["--checkpoint", str(ckpt), "--output-dir", str(out)]) == 0
    card = validate_card(out / "README.md", require_verification=True)
    assert card.data.license == "cc-by-nc-4.0" and card.data.pipeline_tag == "image-feature-extraction"
    text = card.text
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() in text
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() in text
    assert "XZheng0427/OpenUS at commit `6b9f6d2e71e7150b138001e1a24c36cab8e960ed`" in text
    worst = float(re.search(r"Maximum absolute difference measured: \*\*([0-9.e+-]+)\*\*", text).group(1))
    assert 0 <= worst <= 1e-4
    rows = re.findall(r"\| saved folder .*?`(\w+(?:\[\d\])?)` \| .*? \| ([0-9.e+-]+) \| 1.00e-04 \|", text)
    assert {r[0] for r in rows} >= {"last_hidden_state", "hidden_states[0]", "hidden_states[3]"}
    assert max(float(r[1]) for r in rows) == pytest.approx(worst, rel=0.01)
    assert card.data.model_name == "openus-converted"  # cfg_a is no named preset


def test_openus_converter_card_options(tmp_path, capsys):
    ckpt = str(parity_path("openus", "cfg_a") / "checkpoint.pth")
    assert conv.main(["--checkpoint", ckpt, "--output-dir", str(tmp_path / "a"), "--no-card"]) == 0
    assert not (tmp_path / "a" / "README.md").exists()
    assert conv.main(["--checkpoint", ckpt, "--output-dir", str(tmp_path / "b"), "--card-name", "nope"]) == 2
    assert "unknown model card name 'nope'" in capsys.readouterr().err  # refused before converting
    assert not (tmp_path / "b").exists()  # nothing half-written
    assert conv.main(["--checkpoint", ckpt, "--output-dir", str(tmp_path / "c"), "--card-name", "openus-small"]) == 0
    assert ModelCard.load(tmp_path / "c" / "README.md").data.model_name == "openus-small"
