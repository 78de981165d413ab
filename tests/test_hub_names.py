"""Hugging Face hub repo ids (`org/name[@revision]`) as checkpoints, resolved by huggingface_hub's own
code from a hub cache built here, offline (HF_HUB_OFFLINE=1): nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import chameleon
from benchmarks.cli import main
from chameleon.checkpoint import resolve_checkpoint_path
from chameleon.errors import InputError
from tests.conftest import REPO

REPO_ID = "tiny-org/tiny-chameleon"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SUITE = """\
name: hub
backend: chameleon
batch_size: 2
benchmarks:
  - {name: gsm8k, benchmark: gsm8k, shots: 1, limit: 2, generation: {max_gen_toks: 6}}
  - {name: coco, benchmark: coco, shots: 1, subset: with_images, limit: 2, generation: {max_gen_toks: 4}}
"""


def hub_cache(root: Path, repo_id: str, checkpoint: Path, commit: str = COMMIT) -> Path:
    """A hub cache in huggingface_hub's layout: models--ORG--NAME/refs/main holds the commit,
    snapshots/COMMIT/ links each file to its content in blobs/."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "blobs").mkdir()
    for file in (f for f in checkpoint.rglob("*") if f.is_file()):
        blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = folder / "snapshots" / commit / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


@pytest.fixture(scope="module")
def cache(tiny_hf, tiny_meta, tmp_path_factory) -> Path:
    return hub_cache(hub_cache(tmp_path_factory.mktemp("hub"), REPO_ID, tiny_hf), "tiny-org/tiny-meta", tiny_meta)


@pytest.fixture
def offline(cache, monkeypatch) -> Path:
    """This process's huggingface_hub reading `cache`, offline: the settings it took from HF_HUB_CACHE
    and HF_HUB_OFFLINE at import, set as those variables would have set them."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_load_by_repo_id_equals_the_directory(tiny_hf, tiny_meta, offline):
    """The repo id, bare or at a revision (branch or commit), loads the cached snapshot: same weights
    and logits as loading the directory it was made from."""
    local = chameleon.load(tiny_hf)
    ids = torch.tensor([local.encode_prompt("Natalia sold clips to 48 of her friends")])
    snapshot = offline / "models--tiny-org--tiny-chameleon" / "snapshots" / COMMIT
    for name in (REPO_ID, f"{REPO_ID}@main", f"{REPO_ID}@{COMMIT}"):
        assert resolve_checkpoint_path(name) == snapshot
        model = chameleon.load(name)
        assert model.fingerprint == local.fingerprint
        assert torch.equal(model(ids), local(ids))
    # a Meta-format repo (its params.json found, it is resolved again with the Meta file patterns)
    assert chameleon.load("tiny-org/tiny-meta").fingerprint == chameleon.load(tiny_meta).fingerprint


def test_a_local_path_wins_over_a_repo_id(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO_ID).mkdir(parents=True)  # a directory of that name here, not a checkpoint
    assert resolve_checkpoint_path(REPO_ID) == Path(REPO_ID)
    with pytest.raises(InputError, match=f"^{REPO_ID}: not a checkpoint directory"):
        chameleon.load(REPO_ID)


def test_generate_by_repo_id_records_repo_and_commit(tiny_hf, offline, tmp_path):
    base = ["generate", "--prompt", "Natalia sold clips", "--max-new-tokens", "8", "--seed", "3"]
    assert main([*base, "--model", str(tiny_hf), "--out", str(tmp_path / "dir")]) == 0
    assert main([*base, "--model", REPO_ID, "--out", str(tmp_path / "hub")]) == 0
    by_dir, by_hub = (json.loads((tmp_path / d / "generation.json").read_text()) for d in ("dir", "hub"))
    assert by_hub["new_ids"] == by_dir["new_ids"] and by_hub["model_fingerprint"] == by_dir["model_fingerprint"]
    assert (by_hub["model"], by_hub["model_commit"]) == (REPO_ID, COMMIT) and "model_commit" not in by_dir


def test_hf_backend_by_repo_id(tiny_hf, offline):
    from benchmarks.backends import load_backend

    from_dir, from_hub = load_backend("hf", str(tiny_hf)), load_backend("hf", REPO_ID)
    assert from_hub.fingerprint == from_dir.fingerprint and from_hub.image_problem is None
    assert from_hub.describe()["path"] == REPO_ID and from_hub.describe()["commit"] == COMMIT
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    assert torch.equal(from_hub._logits(ids, torch.ones_like(ids)), from_dir._logits(ids, torch.ones_like(ids)))


def test_hf_fingerprint_ignores_a_bin_copy_beside_safetensors(tiny_hf, tmp_path, monkeypatch):
    """A repo may hold its weights twice, model.safetensors and pytorch_model.bin: the hub fetch skips
    the .bin and transformers loads the safetensors, so a .bin copy (in a directory, or put into the
    snapshot by a full `hf download` of the same commit) must not make another model: the same run
    directory resumes."""
    from safetensors.torch import load_file

    from benchmarks.backends import load_backend

    both = hub_cache(tmp_path / "hub", REPO_ID, tiny_hf) / "models--tiny-org--tiny-chameleon" / "snapshots" / COMMIT
    plain = load_backend("hf", str(both)).fingerprint
    torch.save(load_file(both / "model.safetensors"), both / "pytorch_model.bin")
    assert load_backend("hf", str(both)).fingerprint == plain == load_backend("hf", str(tiny_hf)).fingerprint


@pytest.mark.parametrize("backend", ["chameleon", "hf"])
def test_run_by_repo_id_equals_the_directory_and_resumes_it(backend, tiny_hf, offline, tmp_path):
    """`run --backend B --model REPO_ID` (text and images): the same results as the directory;
    run.json and results.json name the repo and commit; the directory's run directory is the repo
    id's too (same model fingerprint)."""
    suite = tmp_path / "hub.yaml"
    suite.write_text(SUITE)
    for model, out in ((tiny_hf, "dir"), (REPO_ID, "hub")):
        assert main(["run", str(suite), "--backend", backend, "--model", str(model), "--out", str(tmp_path / out)]) == 0
    for record in ("run.json", "results.json"):
        model = json.loads((tmp_path / "hub" / record).read_text())["model"]
        assert (model["backend"], model["path"], model["commit"]) == (backend, REPO_ID, COMMIT)
    assert "commit" not in json.loads((tmp_path / "dir" / "results.json").read_text())["model"]
    by_dir, by_hub = ({name: (b["metrics"], (tmp_path / d / b["samples_file"]).read_text())
                       for name, b in json.loads((tmp_path / d / "results.json").read_text())["benchmarks"].items()}
                      for d in ("dir", "hub"))
    assert by_hub == by_dir and set(by_hub) == {"gsm8k", "coco"}
    assert main(["run", str(suite), "--backend", backend, "--model", REPO_ID, "--out", str(tmp_path / "dir")]) == 0
    resumed = json.loads((tmp_path / "dir" / "results.json").read_text())["benchmarks"]
    assert all(b["computed_requests"] == 0 for b in resumed.values())  # all answered from the cache


def test_repo_not_in_the_offline_cache_is_named(cache, offline, tmp_path, capsys):
    """generate, run and convert: exit 2, no traceback, the repo named and what to do."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", "generate", "--model", "nobody/missing", "--prompt", "x",
                           "--out", str(tmp_path / "gen")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [proc.stderr]
    for argv in (["run", "smoke", "--model", "nobody/missing@v1", "--out", tmp_path / "run"],
                 ["convert", "nobody/missing", tmp_path / "converted", "--to", "meta"]):
        assert main(list(map(str, argv))) == 2
        errors.append(capsys.readouterr().err)
    for err in errors:
        assert err.startswith("error: nobody/missing") and "hub repo nobody/missing is not in the Hugging Face cache" in err
        assert "HF_HUB_OFFLINE=0" in err and "local checkpoint directory" in err
    assert not any((tmp_path / name).exists() for name in ("gen", "run", "converted"))


class HubErrors(BaseHTTPRequestHandler):
    """Answers as the hub's API does for a repo named by its org: gated, missing, or without the revision asked."""

    def do_GET(self):
        if not self.path.startswith("/api/models/"):  # (huggingface_hub's other calls)
            status, code = 404, None
        else:  # /api/models/ORG/NAME/revision/REV
            status, code = {"gated": (403, "GatedRepo"), "nobody": (404, "RepoNotFound"),
                            "norev": (404, "RevisionNotFound")}.get(self.path.split("/")[3], (500, None))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("name, expected", [
    ("gated/x", "gated/x is gated: accept its licence at https://huggingface.co/gated/x, then log in with `hf auth login`"),
    ("nobody/x", "nobody/x was not found, or is private and needs a token: check the name, or log in"),
    ("norev/x@v9", "norev/x has no revision 'v9'"),
    ("down/x", "down/x could not be fetched (Server error '500"),
    ("closed/x", "closed/x could not be fetched ("),
])
def test_hub_errors_name_the_repo_and_what_to_do(name, expected, tmp_path, monkeypatch):
    """Online, against a local server answering as the hub does (or a closed port): huggingface_hub's
    errors become InputErrors naming the repo."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1] if not name.startswith("closed") else 9  # (the discard port: nothing listens)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "")  # (no token of this machine's sent)
    try:
        with pytest.raises(InputError) as err:
            chameleon.load(name)
    finally:
        server.shutdown()
        server.server_close()
    assert str(err.value).startswith(f"{name}: no local directory of that name; Hugging Face hub repo ") and expected in str(err.value)
