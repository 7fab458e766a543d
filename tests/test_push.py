"""``openus-hub push`` end to end: the real huggingface_hub client against an HTTP server on 127.0.0.1.

``FakeHub`` stands in for the Hugging Face Hub: it implements the endpoints huggingface_hub's ``create_repo``
(POST /api/repos/create), README metadata validation (POST /api/validate-yaml), ``create_branch``
(POST /api/models/{repo}/branch/{branch}), preupload (POST /api/models/{repo}/preupload/{rev}) and ``create_commit`` (POST /api/models/{repo}/commit/{rev}, NDJSON) call,
and records every request. It answers ``uploadMode: regular`` for every file, so file contents travel inline
(base64) in the commit and no LFS/Xet transfer is exercised."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import torch
import yaml
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from conversion.model_card import write_card
from openus_hub import cli
from openus_hub.hub import PushError, check_folder, push

TOKEN = "hf_test_write_token"


class FakeHub(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests, self.commits, self.fail = [], [], {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        hub: FakeHub = self.server
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub.requests.append({"path": unquote(url.path), "query": parse_qs(url.query),
                             "auth": self.headers.get("Authorization"), "body": body})
        for fragment, status in hub.fail.items():
            if fragment in url.path:
                return self._reply(status, {"error": f"simulated {status}"})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        parts = unquote(url.path).strip("/").split("/")
        if url.path == "/api/validate-yaml":  # the client sends README.md's front matter for checking before a commit
            content = json.loads(body)["content"]
            front = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            if not isinstance(front, dict) or "license" not in front:
                return self._reply(400, {"errors": [{"message": "no license in the metadata"}]})
            return self._reply(200, {"errors": [], "warnings": []})
        if url.path == "/api/repos/create":
            p = json.loads(body)
            return self._reply(200, {"url": f"{hub.url}/{p['organization']}/{p['name']}"})
        if parts[:2] == ["api", "models"] and parts[4] == "branch":
            return self._reply(200, {})
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            repo, rev = "/".join(parts[2:4]), "/".join(parts[5:])
            files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
            header = next(v["value"] for v in lines if v["key"] == "header")
            oid = f"{len(hub.commits) + 1:040x}"
            hub.commits.append({"repo": repo, "revision": rev, "files": files, "header": header,
                                "create_pr": url.query})
            payload = {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid}
            if "create_pr=1" in url.query:
                payload["pullRequestUrl"] = f"{hub.url}/{repo}/discussions/1"
            return self._reply(200, payload)
        return self._reply(404, {"error": f"no route {url.path}"})


@pytest.fixture()
def hub(monkeypatch):
    from huggingface_hub import constants

    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline before huggingface_hub is imported
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def folder(tmp_path):
    """A small stock SegFormer folder with a rendered card (licence 'other')."""
    torch.manual_seed(0)
    config = SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], decoder_hidden_size=16,
                             num_attention_heads=[1, 1, 1, 1], num_labels=3)
    out = tmp_path / "student"
    SegformerForSemanticSegmentation(config).save_pretrained(out)
    write_card(out, "transkd-base-b0-cityscapes")
    return out


def _local_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_push_uploads_exactly_the_folder_in_one_commit(hub, folder, capsys):
    code = cli.main(["push", str(folder), "--repo-id", "test-org/tiny-student", "--private"])
    assert code == 0, (capsys.readouterr().err, [(r["path"], r["query"]) for r in hub.requests])
    assert [r["path"] for r in hub.requests] == ["/api/repos/create", "/api/validate-yaml",
                                                 "/api/models/test-org/tiny-student/preupload/main",
                                                 "/api/models/test-org/tiny-student/commit/main"]
    assert json.loads(hub.requests[1]["body"])["content"] == (folder / "README.md").read_text()
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests)
    create = json.loads(hub.requests[0]["body"])
    assert create["name"] == "tiny-student" and create["organization"] == "test-org"
    assert create.get("visibility") == "private" or create.get("private") is True
    (commit,) = hub.commits
    assert commit["files"] == _local_files(folder)  # exactly the folder, byte for byte
    assert set(commit["files"]) == {"README.md", "config.json", "model.safetensors"}
    assert commit["header"]["summary"] == "Upload student with openus-hub push"
    out = capsys.readouterr().out
    assert "uploaded 3 file(s)" in out and "in one commit" in out


def test_dry_run_lists_files_and_uploads_nothing(hub, folder, capsys):
    assert cli.main(["push", str(folder), "--repo-id", "test-org/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.requests == [] and "would upload 3 file(s)" in out
    for name, data in _local_files(folder).items():
        assert f"  {name}\t{len(data):,}" in out


@pytest.mark.parametrize("name,content", [("weights.pth", b"pickle"), ("scan.dcm", b"x"), ("pytorch_model.bin", b"x"),
                                          ("frame.png", b"x"), ("anon", b"\0" * 128 + b"DICM" + b"\0" * 8)])
def test_refuses_pickles_and_patient_data(hub, folder, capsys, name, content):
    (folder / name).write_bytes(content)
    assert cli.main(["push", str(folder), "--repo-id", "test-org/x"]) == 2
    err = capsys.readouterr().err
    assert f"refusing to push {folder}" in err and f"- {name}:" in err
    assert hub.requests == []  # refused before any request
    with pytest.raises(PushError):
        push(folder, "test-org/x", dry_run=True)  # the dry run refuses it too


def test_refuses_missing_card_licence_or_weights(folder):
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("license: other\n", ""))
    with pytest.raises(PushError, match="sets no licence"):
        check_folder(folder)
    readme.unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(PushError) as err:
        check_folder(folder)
    assert "README.md (the model card) is missing" in str(err.value) and "no .safetensors weights" in str(err.value)


def test_refuses_folder_that_does_not_load(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights.pop("decode_head.classifier.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PushError, match="AutoModelForSemanticSegmentation loads it with problems.*missing_keys"):
        check_folder(folder)


def test_clear_errors_for_token_offline_and_http_status(hub, folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PushError, match=r"rejected the token \(401 Unauthorized\).*check HF_TOKEN"):
        push(folder, "test-org/x")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail = {"/api/repos/create": 403}
    with pytest.raises(PushError, match=r"may not write to test-org/x \(403 Forbidden\)"):
        push(folder, "test-org/x")
    hub.fail = {"/preupload/": 404}
    with pytest.raises(PushError, match=r"not found \(404\)"):
        push(folder, "test-org/x")
    assert hub.commits == []
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PushError, match="no Hub token: set HF_TOKEN"):
        push(folder, "test-org/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="offline mode is enabled"):
        push(folder, "test-org/x")
    with pytest.raises(PushError, match="must be ORG/NAME"):
        push(folder, "no-org")


def test_revision_branch_and_pull_request(hub, folder):
    result = push(folder, "test-org/x", revision="v1")
    assert "/api/models/test-org/x/branch/v1" in [r["path"] for r in hub.requests]
    assert hub.commits[-1]["revision"] == "v1" and result["pr_url"] is None
    hub.requests.clear()
    result = push(folder, "test-org/x", create_pr=True)
    assert "create_pr=1" in hub.commits[-1]["create_pr"] and result["pr_url"].endswith("/discussions/1")
    assert not any("/branch/" in r["path"] for r in hub.requests)


# ---------------------------------------------------------------------------------------------------------------------
# content, not names: the hostile folder of the finding, then each kind alone, --allow, and what we do publish

HF_LIKE = "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z"  # the shape of a Hugging Face token, not a real one


def _bmp_bytes():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="BMP")
    return buf.getvalue()


def _hostile(folder, outside, kind):
    """Add one hostile item to ``folder``; returns its relative name."""
    import pickle

    from pydicom.data import get_testdata_file

    if kind == "token-file":
        (folder / "hf_token.txt").write_text(HF_LIKE + "\n")
        return "hf_token.txt"
    if kind == "symlink-out":
        (folder / "notes.md").symlink_to(outside)
        return "notes.md"
    if kind == "symlink-dir-out":
        (folder / "data").symlink_to(outside.parent, target_is_directory=True)
        return "data"
    if kind == "pickle-renamed":
        (folder / "weights.safetensors.bak").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
        return "weights.safetensors.bak"
    if kind == "zip-as-safetensors":
        torch.save({"w": torch.zeros(2)}, folder / "extra.safetensors")
        return "extra.safetensors"
    if kind == "dicom-no-preamble":
        (folder / "extra.txt").write_bytes(open(get_testdata_file("ExplVR_LitEndNoMeta.dcm"), "rb").read())
        return "extra.txt"
    if kind == "dicom-preamble":
        (folder / "notes.json").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
        return "notes.json"
    if kind == "bmp-renamed":
        (folder / "figure.dat").write_bytes(_bmp_bytes())
        return "figure.dat"
    if kind == "unknown-kind":
        (folder / "run.sh").write_text("#!/bin/sh\necho hi\n")
        return "run.sh"
    if kind == "card-home-path":
        readme = folder / "README.md"
        readme.write_text(readme.read_text() + "\nTrained on manifest /home/alice/data/busi/manifest.json.\n")
        return "README.md"
    if kind == "card-existing-path":
        readme = folder / "README.md"
        readme.write_text(readme.read_text() + f"\ndata.root: {outside.parent}\n")
        return "README.md"
    if kind == "config-aws-key":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["note"] = "AKIA" + "ABCDEFGHIJKLMNOP"
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        return "config.json"
    if kind == "private-key":
        (folder / "NOTICE").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
        return "NOTICE"
    raise ValueError(kind)


HOSTILE = ["token-file", "symlink-out", "symlink-dir-out", "pickle-renamed", "zip-as-safetensors",
           "dicom-no-preamble", "dicom-preamble", "bmp-renamed", "unknown-kind", "card-home-path",
           "card-existing-path", "config-aws-key", "private-key"]
NOT_WAIVABLE = {"symlink-out", "symlink-dir-out", "pickle-renamed", "zip-as-safetensors"}


@pytest.fixture()
def outside(tmp_path):
    secret = tmp_path / "elsewhere" / "private.md"
    secret.parent.mkdir()
    secret.write_text("a file outside the model folder\n")
    return secret


def test_hostile_folder_of_the_finding_is_refused(hub, folder, outside, capsys):
    """Finding: a dry run said "would upload 13 file(s)" for a folder holding a token file, a symlink out of the
    folder, a renamed pickle, a renamed DICOM without preamble, a renamed BMP and a card with a local path."""
    names = [_hostile(folder, outside, k) for k in ("token-file", "symlink-out", "pickle-renamed",
                                                      "dicom-no-preamble", "bmp-renamed", "card-home-path")]
    assert cli.main(["push", str(folder), "--repo-id", "test-org/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    for name in names:
        assert f"- {name}:" in err, (name, err)
    assert "hf_token.txt: line 1: looks like a Hugging Face token (hf_aB3...)" in err and HF_LIKE not in err
    assert f"is a symlink to {outside}, outside the folder" in err
    assert "README.md: line " in err and "/home/alice/data/busi/manifest.json" in err
    assert hub.requests == []


@pytest.mark.parametrize("kind", HOSTILE)
def test_each_hostile_kind_is_refused_and_allow_is_explicit(hub, folder, outside, capsys, kind):
    name = _hostile(folder, outside, kind)
    with pytest.raises(PushError) as err:
        check_folder(folder)
    assert f"- {name}:" in str(err.value)
    capsys.readouterr()
    code = cli.main(["push", str(folder), "--repo-id", "test-org/x", "--dry-run", "--allow", name])
    out = capsys.readouterr()
    if kind in NOT_WAIVABLE:
        assert code == 2 and f"- {name}:" in out.err
    else:
        assert code == 0, out.err
        assert f"warning: allowed: {name}:" in out.err and f"[--allow {name}]" in out.err
    assert hub.requests == []


def test_figures_and_remote_code_are_published(hub, folder, tmp_path):
    """What we produce passes: Matplotlib figures, and an OpenUS folder with its remote-code sources."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openus_hub import OpenUSConfig, OpenUSModel

    (folder / "figures").mkdir()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(folder / "figures" / "loss.png")
    fig.savefig(folder / "figures" / "loss.svg")
    plt.close(fig)
    files = {str(f) for f in check_folder(folder)}
    assert {"figures/loss.png", "figures/loss.svg"} <= files
    openus = tmp_path / "openus"
    OpenUSModel(OpenUSConfig(embed_dim=8, depths=[1, 1, 1, 1])).save_pretrained(openus)
    write_card(openus, "openus-converted")
    files = {str(f) for f in check_folder(openus)}
    assert {"modeling_openus.py", "config.json", "model.safetensors", "README.md"} <= files
    (openus / "modeling_openus.py").write_text((openus / "modeling_openus.py").read_text()
                                               + f"\n# token {HF_LIKE}\n")
    with pytest.raises(PushError, match="modeling_openus.py: line .* looks like a Hugging Face token"):
        check_folder(openus)
