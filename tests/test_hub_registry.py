"""Registry names -> pinned Hub revisions, resolved from an HF cache laid out exactly as huggingface_hub lays it out.

The cache is built here from the upstream parity checkpoint ../shared/parity/openus/cfg_a, converted with
conversion/convert_openus_to_hf.py; nothing touches the network (HF_HUB_OFFLINE=1, set by conftest)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import openus_hub
from conversion import convert_openus_to_hf as conv
from openus_hub import pretrained
from openus_hub.auto import ChecksumMismatchError, NotCachedError, resolve, sha256_file
from openus_hub.pretrained import UnknownModelError, UnpublishedModelError
from tests.conftest import parity_path

ORG, COMMIT = "test-org", "0123456789abcdef0123456789abcdef01234567"
TOL = 1e-4


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def build_hf_cache(folder: Path, cache: Path, repo_id: str, commit: str, branch: str = "main") -> Path:
    """Lay ``folder`` out as huggingface_hub's cache does: blobs named by etag (sha256 for LFS files such as
    safetensors, the git blob sha1 otherwise), ``refs/<branch>`` holding the commit, and ``snapshots/<commit>/<file>``
    as relative symlinks into ``blobs``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else _git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", etag), snap / path.name)
    return repo


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = parity_path("openus", "cfg_a")
    out = tmp_path_factory.mktemp("converted") / "openus-small"
    model, _ = conv.convert(str(folder / "checkpoint.pth"))
    conv.save_atomic(model, str(out))
    openus_hub.OpenUSImageProcessor().save_pretrained(out)
    return out, load_file(folder / "io.safetensors")


@pytest.fixture()
def hf_cache(converted, tmp_path, monkeypatch):
    """An HF cache holding test-org/openus-small@COMMIT, HF_HUB_CACHE pointed at it, and a registry entry for it."""
    folder, _ = converted
    cache = tmp_path / "hub"
    build_hf_cache(folder, cache, f"{ORG}/openus-small", COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("OPENUS_HUB_ORG", ORG)
    pretrained.reset_registry()
    pretrained.register_pretrained(
        {"name": "openus-small", "status": "published", "revision": COMMIT,
         "sha256": sha256_file(folder / "model.safetensors")}, overwrite=True)
    yield cache
    pretrained.reset_registry()


def _assert_parity(name, io):
    """Upstream's tokens through AutoModel and its four out-normed stage maps through AutoBackbone, by ``name``."""
    model = openus_hub.AutoModel.from_pretrained(name).eval()
    backbone = openus_hub.AutoBackbone.from_pretrained(name).eval()
    assert type(model).__name__ == "OpenUSModel" and backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    with torch.no_grad():
        for suffix in ("224", "real"):
            maps = backbone(io[f"pixel_values_{suffix}"]).feature_maps
            for i in range(4):
                err = (maps[i] - io[f"out{i}_{suffix}"]).abs().max().item()
                assert err <= TOL, f"out{i}_{suffix}: {err:.2e}"
            err = (model(io[f"pixel_values_{suffix}"]).last_hidden_state - io[f"tokens_{suffix}"]).abs().max().item()
            assert err <= TOL, f"tokens_{suffix}: {err:.2e}"


def test_cache_layout_is_what_huggingface_hub_reads(hf_cache):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == f"{ORG}/openus-small" and set(repo.refs) == {"main"}
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {f.file_name for f in rev.files}


def test_offline_registry_name_loads_from_cache_and_matches_parity(hf_cache, converted):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    path, entry = resolve("openus-small")
    assert entry.resolved_repo_id == f"{ORG}/openus-small"
    assert Path(path) == hf_cache / f"models--{ORG}--openus-small" / "snapshots" / COMMIT
    _assert_parity("openus-small", converted[1])
    proc = openus_hub.AutoImageProcessor.from_pretrained("openus-small")
    assert type(proc).__name__.startswith("OpenUSImageProcessor")


def test_pipeline_takes_registry_name_and_its_task(hf_cache):
    import numpy as np
    from PIL import Image

    pipe = openus_hub.pipeline(model="openus-small")  # task comes from the registry entry
    assert pipe.task == "image-feature-extraction"
    image = Image.fromarray((np.random.default_rng(0).random((64, 80)) * 255).astype("uint8"))
    features = np.asarray(pipe(image))
    assert features.shape[-1] == 64 and np.isfinite(features).all()


def test_unknown_and_unpublished_names_give_documented_errors(hf_cache):
    with pytest.raises(UnknownModelError, match=r"unknown openus_hub model 'openus-smal'.*'openus-small'"):
        openus_hub.AutoModel.from_pretrained("openus-smal")
    with pytest.raises(UnpublishedModelError) as err:
        openus_hub.AutoModel.from_pretrained("openus-base")
    msg = str(err.value)
    assert "no published weights (status: convert from upstream)" in msg
    assert "conversion/convert_openus_to_hf.py" in msg and "never substitutes" in msg
    with pytest.raises(UnpublishedModelError, match="status: train yourself"):
        openus_hub.AutoModelForSemanticSegmentation.from_pretrained("openus-tiny")
    with pytest.raises(UnpublishedModelError, match="convert_transkd_to_hf.py --checkpoint .* --variant transkd-base"):
        openus_hub.pipeline(model="transkd-base-b0-cityscapes")


def test_tampered_blob_fails_sha256_check(hf_cache):
    repo = hf_cache / f"models--{ORG}--openus-small"
    blob = (repo / "snapshots" / COMMIT / "model.safetensors").resolve()
    assert blob.parent == (repo / "blobs").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor's data: still a loadable safetensors file
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="has sha256 .* the registry records"):
        openus_hub.AutoModel.from_pretrained("openus-small")
    model = openus_hub.AutoModel.from_pretrained("openus-small", verify_sha256=False)  # the check is what caught it
    assert type(model).__name__ == "OpenUSModel"


def test_offline_and_not_cached_says_so(hf_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(NotCachedError, match=f"{ORG}/openus-small@{COMMIT} is not in the local HF cache"):
        openus_hub.AutoModel.from_pretrained("openus-small")


def test_local_folder_wins_and_uncached_hub_ids_fail_offline(hf_cache, converted, tmp_path, monkeypatch):
    folder, io = converted
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder, tmp_path / "openus-small")
    path, entry = resolve("openus-small")
    assert entry is None and path == "openus-small"
    with pytest.raises(NotCachedError, match="not in the local HF cache .* HF_HUB_OFFLINE is set"):
        resolve("some-org/some-model")  # a Hub id resolves through the HF cache too; offline, a miss fails at once
    assert resolve(str(folder)) == (str(folder), None)
    _assert_parity("openus-small", io)


def test_registry_file_env_and_org(tmp_path, monkeypatch):
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps([{"name": "openus-small", "repo_id": "{org}/my-small", "status": "published",
                                "revision": COMMIT, "sha256": "ab" * 32},
                               {"name": "openus-custom-x", "repo_id": "lab/x", "status": "published",
                                "revision": COMMIT, "task": "image-segmentation", "architecture": "X",
                                "license": "mit", "source": "ours"}]))
    monkeypatch.setenv("OPENUS_HUB_REGISTRY", str(reg))
    monkeypatch.setenv("OPENUS_HUB_ORG", "elsewhere")
    pretrained.reset_registry()
    try:
        small = pretrained.get_pretrained("openus-small")
        assert small.resolved_repo_id == "elsewhere/my-small" and small.published and small.sha256 == "ab" * 32
        assert small.license == "cc-by-nc-4.0"  # fields not in the file come from the built-in entry
        assert openus_hub.list_models("openus-*") == ["openus-base", "openus-custom-x", "openus-small", "openus-tiny"]
        assert openus_hub.list_models("openus-*", published_only=True) == ["openus-custom-x", "openus-small"]
    finally:
        monkeypatch.delenv("OPENUS_HUB_REGISTRY")
        pretrained.reset_registry()
    assert not pretrained.get_pretrained("openus-small").published


def test_list_models_wildcards_and_table_fields():
    assert openus_hub.list_models("openus-*") == ["openus-base", "openus-small", "openus-tiny"]
    assert openus_hub.list_models("*b0*") == ["transkd-base-b0-cityscapes", "transkd-ea-b0-cityscapes",
                                              "transkd-gl-b0-cityscapes"]
    assert openus_hub.list_models("OPENUS-S?ALL") == ["openus-small"]
    assert openus_hub.list_models(status="train yourself") == ["openus-tiny"]
    for entry in openus_hub.list_pretrained():
        assert entry.status in pretrained.STATUSES and entry.license and entry.source and entry.task
        assert len(entry.input_size) == 3 and entry.how_to_get
        assert (Path(__file__).parents[1] / "model_cards" / entry.card).is_file(), entry.card
    with pytest.raises(ValueError, match="pinned revision"):
        pretrained.PretrainedEntry(name="x", repo_id="a/b", status="published", task="t", architecture="A",
                                   license="mit", source="s")
    with pytest.raises(ValueError, match="already registered"):
        pretrained.register_pretrained({"name": "openus-small"})
