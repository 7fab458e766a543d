"""Hostile folders through the push checks: every hostile file, under a name that looks harmless, in the top folder
or a subfolder, is refused (never uploaded); the clean folder passes."""

import json
import os
import pickle

import pytest
import torch
from pydicom.data import get_testdata_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from conversion.model_card import write_card
from openus_hub.hub import PushError, check_folder
from tests.robustness.conftest import record

TOKEN_LIKE = "hf_" + "Zq8" * 12


def _bmp():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (10, 20, 30)).save(buf, format="BMP")
    return buf.getvalue()


def _png_scan():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (6, 6), 90).save(buf, format="PNG")  # written by PIL, not a Matplotlib figure
    return buf.getvalue()


def _payloads(outside):
    """kind -> bytes to write, or a callable(path) making the file (symlinks)."""
    return {
        "pickle": pickle.dumps({"w": 1}, protocol=4),
        "pickle protocol 2": pickle.dumps([1, 2], protocol=2),
        "torch zip checkpoint": lambda p: torch.save({"w": torch.zeros(2)}, p),
        "numpy array": lambda p: __import__("numpy").save(open(p, "wb"), __import__("numpy").zeros(3)),
        "dicom with preamble": open(get_testdata_file("CT_small.dcm"), "rb").read(),
        "dicom without preamble": open(get_testdata_file("ExplVR_LitEndNoMeta.dcm"), "rb").read(),
        "dicom big endian without preamble": open(get_testdata_file("ExplVR_BigEndNoMeta.dcm"), "rb").read(),
        "bmp image": _bmp(),
        "png scan": _png_scan(),
        "gzip archive": __import__("gzip").compress(b"secret"),
        "hf token": f"token = {TOKEN_LIKE}\n".encode(),
        "aws key": b'{"key": "AKIAABCDEFGHIJKLMNOP"}',
        "private key": b"-----BEGIN RSA PRIVATE KEY-----\nMIIB\n",
        "home path": b"data: /home/alice/scans/manifest.json\n",
        "windows path": b"data: C:\\\\Users\\\\alice\\\\scans\n",
        "symlink outside": lambda p: os.symlink(outside, p),
    }


NAMES = ["notes.md", "extra.json", "weights.safetensors", "readme.txt", "LICENSE", "figures/plot.png",
         "sub/dir/model.onnx", "data.bin.txt", "run.sh"]


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory):
    config = SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], decoder_hidden_size=16,
                             num_attention_heads=[1, 1, 1, 1], num_labels=3)
    folder = tmp_path_factory.mktemp("clean") / "model"
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    write_card(folder, "transkd-base-b0-cityscapes")
    check_folder(folder)  # the clean folder passes (loads with the Auto classes)
    return folder


def test_hostile_push_folders(clean_folder, tmp_path):
    import shutil

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"private": True}))
    problems = []
    for kind, payload in _payloads(outside).items():
        for name in NAMES:
            folder = tmp_path / "f"
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(clean_folder, folder, symlinks=True)
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(payload):
                payload(str(path))
            else:
                path.write_bytes(payload)
            try:
                files = check_folder(folder, load=False)
            except PushError as err:
                named = f"- {name}:" in str(err) or f"- {name.split('/')[0]}" in str(err)
                if record("hostile push folders", "clear error" if named else "crash") == "crash":
                    problems.append(f"{kind} as {name}: refused without naming it: {err}")
                continue
            except Exception as err:  # noqa: BLE001
                record("hostile push folders", "crash")
                problems.append(f"{kind} as {name}: {type(err).__name__}: {err}")
                continue
            record("hostile push folders", "silent wrong result")
            problems.append(f"{kind} as {name}: accepted ({[str(f) for f in files]})")
    assert not problems, "\n".join(problems)
