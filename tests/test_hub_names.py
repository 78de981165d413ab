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
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants

import chameleon
from benchmarks.cli import main
from chameleon.checkpoint import resolve_checkpoint_path
from chameleon.errors import InputError
from tests.conftest import REPO, build_tiny_llama

REPO_ID = "tiny-org/tiny-chameleon"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LATER = "fedcba9876543210fedcba9876543210fedcba98"  # a commit a branch moved to
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


class Hub(BaseHTTPRequestHandler):
    """Answers as the hub does for huggingface_hub's snapshot_download: for a repo in `server.repos`
    ({repo id: {file: bytes}}, at COMMIT) the revision API (its commit), the tree API (its files), HEAD
    and GET of /ORG/NAME/resolve/REV/FILE with the headers huggingface_hub reads; for any other repo
    the API's error for its org: gated, missing, or without the revision asked. A repo in
    `server.later` ({repo id: {file: bytes}}) has its branches moved to commit LATER, holding those
    files, once the revision API has answered for one. `server.asked` records the files fetched."""

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body=True):
        parts = unquote(urlsplit(self.path).path).split("/")
        api = parts[1] == "api"  # /api/models/ORG/NAME/{revision,tree}/REV, or /ORG/NAME/resolve/REV/FILE
        repo = "/".join(parts[3:5] if api else parts[1:3])
        rev = parts[6] if api else parts[4]  # a branch, or a commit (COMMIT, LATER)
        commit = rev if rev in (COMMIT, LATER) else self.server.heads.get(repo, COMMIT)
        files = (self.server.later if commit == LATER else self.server.repos).get(repo)
        status, headers, content = 200, {"X-Repo-Commit": commit}, b""
        if files is None:
            status, code = {"gated": (403, "GatedRepo"), "nobody": (404, "RepoNotFound"),
                            "norev": (404, "RevisionNotFound")}.get(repo.split("/")[0], (500, None))
            headers = {"X-Error-Code": code} if code else {}
        elif api and parts[5] == "revision":
            content = json.dumps({"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}).encode()
            if repo in self.server.later:
                self.server.heads[repo] = LATER
        elif api:
            content = json.dumps([{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                  for f, data in files.items()]).encode()
        elif (file := "/".join(parts[5:])) in files:
            content = files[file]
            headers["ETag"] = f'"{hashlib.sha256(content).hexdigest()}"'
            self.server.asked.append(file)
        else:
            status, headers = 404, {**headers, "X-Error-Code": "EntryNotFound"}
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(content))}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local server answering as the hub (`Hub`), and this process's huggingface_hub online, sending
    to it (the settings it took from HF_ENDPOINT at import) with an empty cache and no token."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.repos, server.later, server.heads, server.asked = {}, {}, {}, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "")  # (no token of this machine's sent)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """The backend tests' tiny Llama with its weights as model.safetensors ("safetensors"), as PyTorch
    .bin files only, one ("bin") or two shards and their index ("shards"; "named": shards not named
    pytorch_model*, beside an fp16 variant's copy that transformers loads only when asked; "adapter": one
    .bin beside a safetensors file that is not the model's, which transformers does not load as its
    weights), and as both ("both")."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("llamas")
    llamas = {"safetensors": build_tiny_llama(root / "safetensors", max_positions=64)}
    weights = load_file(llamas["safetensors"] / "model.safetensors")
    for kind in ("bin", "shards", "named", "adapter", "both"):
        skip = shutil.ignore_patterns("*.safetensors" if kind != "both" else "")
        llamas[kind] = Path(shutil.copytree(llamas["safetensors"], root / kind, ignore=skip))
    for kind in ("bin", "adapter", "both"):
        torch.save(weights, llamas[kind] / "pytorch_model.bin")
    save_file({"lora_A.weight": torch.zeros(2, 4)}, llamas["adapter"] / "adapter_model.safetensors")
    torch.save({name: t.half() for name, t in weights.items()}, llamas["named"] / "pytorch_model.fp16.bin")
    for kind, prefix in (("shards", "pytorch_model"), ("named", "model")):
        shards = {f"{prefix}-0000{i + 1}-of-00002.bin": sorted(weights)[i::2] for i in range(2)}
        for shard, names in shards.items():
            torch.save({name: weights[name] for name in names}, llamas[kind] / shard)
        weight_map = {name: shard for shard, names in shards.items() for name in names}
        (llamas[kind] / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return llamas


def files(checkpoint: Path) -> dict[str, bytes]:
    return {file.relative_to(checkpoint).as_posix(): file.read_bytes() for file in checkpoint.rglob("*") if file.is_file()}


def serve(hub, checkpoint: Path) -> str:
    hub.repos["tiny-org/llama"] = files(checkpoint)
    return "tiny-org/llama"


@pytest.mark.parametrize("kind", ["bin", "shards", "named", "adapter"])
def test_hf_backend_by_repo_id_of_bin_weights(kind, llamas, hub, monkeypatch):
    """A repo holding its weights only as PyTorch .bin files (older models'; one, or shards and their
    index, whatever the shards' names) is fetched with the files transformers reads, no other .bin:
    the hf backend loads it by repo id as from its directory, and then offline from the cache alone."""
    from benchmarks.backends import load_backend

    repo = serve(hub, llamas[kind])
    from_dir, from_hub = load_backend("hf", str(llamas[kind])), load_backend("hf", repo)
    assert sorted(set(hub.asked)) == sorted(set(hub.repos[repo]) - {"pytorch_model.fp16.bin"})
    assert from_hub.fingerprint == from_dir.fingerprint and from_hub.describe()["commit"] == COMMIT
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    logits = [backend._logits(ids, torch.ones_like(ids)) for backend in
              (from_hub, from_dir, load_backend("hf", str(llamas["safetensors"])))]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])  # (the .bin weights were read)
    hub.asked.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_backend("hf", repo).fingerprint == from_dir.fingerprint and not hub.asked


def test_hf_fingerprint_covers_the_tokenizer_files_fetched(llamas, tmp_path):
    """The fingerprint covers each file the hub fetch brings, tokenizer files too (another merges.txt
    is another model), and no other (training_args.bin beside .bin weights is not fetched)."""
    from benchmarks.backends.hf import hash_checkpoint

    checkpoint = Path(shutil.copytree(llamas["bin"], tmp_path / "llama"))
    for name in ("merges.txt", "vocab.txt", "cl100k_base.tiktoken"):
        (checkpoint / name).write_text("a b\n")
        before = hash_checkpoint(checkpoint)
        (checkpoint / name).write_text("a c\n")
        assert hash_checkpoint(checkpoint) != before, name
    before = hash_checkpoint(checkpoint)
    (checkpoint / "training_args.bin").write_bytes(b"not weights")
    assert hash_checkpoint(checkpoint) == before
    # shards count by the index's names (whatever they are), an fp16 variant's copy not
    checkpoint = Path(shutil.copytree(llamas["named"], tmp_path / "named"))
    before = hash_checkpoint(checkpoint)
    (checkpoint / "pytorch_model.fp16.bin").write_bytes(b"another copy")
    assert hash_checkpoint(checkpoint) == before
    (checkpoint / "model-00002-of-00002.bin").write_bytes(b"other weights")
    assert hash_checkpoint(checkpoint) != before


def test_a_repo_with_safetensors_fetches_no_bin(llamas, hub):
    """.bin copies of the weights beside the safetensors are never fetched (transformers loads the
    safetensors)."""
    from benchmarks.backends import load_backend

    repo = serve(hub, llamas["both"])
    assert load_backend("hf", repo).fingerprint == load_backend("hf", str(llamas["safetensors"])).fingerprint
    assert sorted(set(hub.asked)) == sorted(set(hub.repos[repo]) - {"pytorch_model.bin"})


@pytest.mark.parametrize("name, expected", [
    ("gated/x", "gated/x is gated: accept its licence at https://huggingface.co/gated/x, then log in with `hf auth login`"),
    ("nobody/x", "nobody/x was not found, or is private and needs a token: check the name, or log in"),
    ("norev/x@v9", "norev/x has no revision 'v9'"),
    ("down/x", "down/x could not be fetched (Server error '500"),
    ("closed/x", "closed/x could not be fetched ("),
])
def test_hub_errors_name_the_repo_and_what_to_do(name, expected, hub, monkeypatch):
    """Online, against a local server answering as the hub does (or a closed port): huggingface_hub's
    errors become InputErrors naming the repo."""
    if name.startswith("closed"):  # (the discard port: nothing listens)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(InputError) as err:
        chameleon.load(name)
    assert str(err.value).startswith(f"{name}: no local directory of that name; Hugging Face hub repo ") and expected in str(err.value)


def test_a_malformed_bin_index_is_named(llamas, hub):
    """The .bin index read to choose the shards to fetch: unreadable, it is named, not taken for a
    failed download."""
    repo = serve(hub, llamas["named"])
    hub.repos[repo]["pytorch_model.bin.index.json"] = b'{"weight_map": ["model-00001-of-00002.bin"]}'
    with pytest.raises(InputError, match=r"/pytorch_model.bin.index.json: expected a JSON object whose 'weight_map' maps"):
        resolve_checkpoint_path(repo)


@pytest.mark.parametrize("kind", ["meta", "bin"])
def test_a_second_fetch_reads_the_commit_the_first_resolved(kind, tiny_meta, llamas, hub):
    """A Meta-format repo, or a HF one of .bin weights, is fetched twice (the second time with the files
    its format needs): both from the commit the first resolved, though the branch moved in between (here
    to a commit holding another model)."""
    checkpoint, other = (tiny_meta, llamas["safetensors"]) if kind == "meta" else (llamas["bin"], tiny_meta)
    repo = serve(hub, checkpoint)
    hub.later[repo] = files(other)
    snapshot = resolve_checkpoint_path(repo)
    assert snapshot.name == COMMIT and files(snapshot) == hub.repos[repo]  # every file, each from COMMIT
