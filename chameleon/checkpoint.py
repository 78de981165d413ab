"""Reading and writing checkpoint directories, HF's and Meta's, with strict validation.

HF format:   config.json, model.safetensors | model.safetensors.index.json + shards, tokenizer.json,
             processor_config.json + preprocessor_config.json (transformers' ChameleonProcessor; written,
             not read: our stack preprocesses images itself), [vqgan_decoder.safetensors: this
             project's extra file keeping the VQGAN decoder]
Meta format: params.json [+ consolidate_params.json], consolidated.pth | consolidated.NN.pth,
             tokenizer/{text_tokenizer.json, vqgan.yaml, vqgan.ckpt} (or ../../tokenizer, the release layout)
Either may also be named by a Hugging Face hub repo id (`resolve_checkpoint_path`).
The files themselves are written one tensor at a time by tensor_files.py.
"""

from __future__ import annotations

import contextlib
import glob
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from chameleon.config import ModelArgs, VQGANConfig, read_json
from chameleon.convert import HF_VQ_PREFIX, LazyTensors, Tensors, from_hf, from_meta_shards, specs, to_hf, to_meta_shards
from chameleon.errors import InputError
from chameleon.tensor_files import pth_write_errors, write_pth, write_safetensors
from chameleon.tokenizer import SPECIAL_NAMES, ChameleonTokenizer

HF_DECODER_FILE = "vqgan_decoder.safetensors"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# transformers finds the image placeholder by the name `<image>` (tokenizer and config.json's
# vocabulary_map); Meta's tokenizer calls that id `<reserved08707>`, and transformers' converter renames it.
HF_IMAGE_TOKEN, META_IMAGE_TOKEN = "<image>", "<reserved08707>"


@dataclass
class Checkpoint:
    """Everything a directory holds, in this stack's layout."""

    args: ModelArgs
    weights: Tensors  # decoder, our names (merged Meta shards: a LazyTensors, merged as read)
    vq_config: VQGANConfig
    vq_weights: Tensors  # taming names; decoder.* may be absent
    tokenizer_file: Path
    format: str
    path: Path

    @property
    def nbytes(self) -> int:
        """The bytes of all its tensors (what a write holds, without the files' headers)."""
        return sum(t.nbytes for t in (*specs(self.weights).values(), *self.vq_weights.values()))

    @property
    def has_decoder(self) -> bool:
        """HF checkpoints ship the VQGAN encoder only; ours add the decoder."""
        return any(k.startswith("decoder.") for k in self.vq_weights)


# A hub repo id, `org/name[@revision]` (a branch, tag or commit); each part starts with a letter or
# digit, so that relative paths such as ./ckpt or ../ckpt are never taken for one.
HUB_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@\s]+))?")
# What the loaders read, and no more: a repo may also hold other formats' copies of the weights.
# (The hf backend also runs other causal LMs, whose tokenizers may be sentencepiece or BPE files.)
HUB_FILES = {"hf": ["*.json", "*.safetensors", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"],
             "meta": ["*.json", "consolidated*.pth", "tokenizer/*"]}
# Older repos hold PyTorch weights only: transformers reads pytorch_model.bin, else the shards that
# pytorch_model.bin.index.json's weight_map names, whatever their names (e.g. model-00001-of-00002.bin);
# other .bin files (an fp16 variant's copy, training_args.bin) it reads only when asked.
HUB_BIN_WEIGHTS, HUB_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# (repo, revision, cache, offline) -> its snapshot: a process resolves a repo once, so that its
# checks before loading (run's) and its load read one commit, with one lookup on the network.
_snapshots: dict[tuple, Path] = {}
HUB_LOGIN = "log in with `hf auth login` (`huggingface-cli login` in older versions) or set HF_TOKEN"


def resolve_checkpoint_path(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself where it exists or is no hub repo id (a local
    path always wins); else the Hugging Face hub repo `org/name[@revision]`, fetched by
    huggingface_hub into its cache (HF_HUB_CACHE), only the files this stack reads. Under
    HF_HUB_OFFLINE=1 it comes from that cache alone. The snapshot directory returned is named by the
    commit it holds (see `hub_commit`)."""
    match = HUB_REPO_ID.fullmatch(str(path))
    if match is None or Path(path).exists():
        return Path(path)
    from huggingface_hub import constants, errors, snapshot_download

    repo, revision = match["repo"], match["revision"]
    key = (repo, revision, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    if key in _snapshots and _snapshots[key].is_dir():
        return _snapshots[key]
    where = f"{path}: no local directory of that name; Hugging Face hub repo {repo}"
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES["hf"]))
        # A second fetch, of the files its format needs, reads the commit the first resolved (the
        # snapshot's name): a branch may have moved since.
        if (snapshot / "config.json").is_file() and (patterns := hf_patterns(snapshot)) != HUB_FILES["hf"]:  # .bin weights only
            snapshot = Path(snapshot_download(repo, revision=snapshot.name, allow_patterns=patterns))
        elif not (snapshot / "config.json").is_file() and (snapshot / "params.json").is_file():  # Meta's format
            snapshot = Path(snapshot_download(repo, revision=snapshot.name, allow_patterns=HUB_FILES["meta"]))
    except errors.GatedRepoError:
        raise InputError(f"{where} is gated: accept its licence at https://huggingface.co/{repo}, then {HUB_LOGIN}") from None
    except errors.RevisionNotFoundError:
        raise InputError(f"{where} has no revision {revision!r}") from None
    except (errors.RepositoryNotFoundError, errors.HfHubHTTPError) as err:
        if isinstance(err, errors.RepositoryNotFoundError) or getattr(err.response, "status_code", None) == 401:
            raise InputError(f"{where} was not found, or is private and needs a token: check the name, or {HUB_LOGIN}") from None
        raise InputError(f"{where} could not be fetched ({_first_line(err)})") from None
    except errors.LocalEntryNotFoundError as err:
        if isinstance(err, getattr(errors, "IncompleteSnapshotError", ())):
            raise InputError(f"{path}: {_first_line(err)}") from None
        if constants.HF_HUB_OFFLINE:
            raise InputError(f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                             "forbids downloading it: set HF_HUB_OFFLINE=0 to download it, or pass a local checkpoint directory") from None
        raise InputError(f"{where} could not be fetched ({_first_line(err.__cause__ or err)}) and is not in the Hugging Face "
                         f"cache ({constants.HF_HUB_CACHE}): check the network, or pass a local checkpoint directory") from None
    except errors.HFValidationError as err:
        raise InputError(f"{path}: no such local directory, nor a valid hub repo id ({_first_line(err)})") from None
    except InputError:  # (a malformed index, from hf_patterns: it names the file)
        raise
    except Exception as err:  # the HTTP library's own errors (connection reset, proxy), a full disk
        raise InputError(f"{where} could not be downloaded ({type(err).__name__}: {_first_line(err)})") from None
    _snapshots[key] = snapshot
    return snapshot


def hf_patterns(path: Path) -> list[str]:
    """The file patterns of a HF-format checkpoint in `path` that a hub fetch brings and transformers
    reads: its .bin weights only where it holds no safetensors (which transformers would load instead),
    the shards by the names its .bin index in `path` gives (a hub fetch's first pass brings the index).
    Only the model's own safetensors count (transformers' names): an adapter's or another variant's
    beside .bin weights is not what transformers loads."""
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return HUB_FILES["hf"]
    shards = read_weight_map(path / HUB_BIN_INDEX) if (path / HUB_BIN_INDEX).is_file() else {}
    return HUB_FILES["hf"] + [HUB_BIN_WEIGHTS] + sorted({glob.escape(shard) for shard in shards.values()})  # literal names


def occupied(path: Path) -> str | None:
    """Why a checkpoint cannot be written into `path` ("not a directory", "not empty": another
    checkpoint's files there would be overwritten, or mixed in), or None where it is new or empty."""
    if not path.exists():
        return None
    return "not a directory" if not path.is_dir() else "not empty" if any(path.iterdir()) else None


def topmost_missing(path: Path) -> Path | None:
    """The topmost of `path` and its parents that does not exist: what creating it would make."""
    return next((p for p in reversed([path.absolute(), *path.absolute().parents]) if not p.exists()), None)


@contextlib.contextmanager
def removed_on_failure(out: Path, made: Path | None):
    """On any failure in the body (bad input, a full disk, ^C): remove `made`, the topmost directory
    made for `out`, or where `out` existed (`made` None), only what the body added to it."""
    held = set(out.iterdir()) if made is None else set()
    try:
        yield
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        else:
            for child in set(out.iterdir()) - held:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def read_weight_map(index: Path) -> dict[str, str]:
    """An index file's weight_map (tensor name -> shard file name), checked."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: expected a JSON object whose 'weight_map' maps tensor names to shard file names")
    return weight_map


def hub_commit(given: str | Path, resolved: Path) -> str | None:
    """The commit `resolve_checkpoint_path(given)` fetched from the hub (its snapshot's name), or None
    where `given` is a local path: records name a checkpoint by the repo id and this commit."""
    return resolved.name if Path(given) != resolved else None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def detect_format(path: Path) -> str:
    if not path.exists():
        raise InputError(f"{path}: checkpoint directory not found")
    if not path.is_dir():
        raise InputError(f"{path}: expected a checkpoint directory, got a file")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    raise InputError(f"{path}: not a checkpoint directory: expected config.json (HF format) or params.json (Meta format)")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint's config, tokenizer files and weights, checked. Reading takes a moment: the
    files are memory-mapped, and the tensors merged (Meta shards) or permuted (HF's q/k) as each
    is used (a Meta .pth in torch's legacy format, which cannot be mapped, is read whole)."""
    path = Path(path)
    fmt = detect_format(path)
    ckpt = _read_hf(path) if fmt == "hf" else _read_meta(path)
    _check_weights(ckpt)
    return ckpt


# --- safetensors / torch.load with errors that name the file ------------------------------------
def _load_safetensors(file: Path) -> Tensors:
    if not file.is_file():
        raise InputError(f"{file}: weights file not found")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{file}: corrupt or unreadable safetensors file ({err})") from None
    return _state_dict(tensors, file)


def _load_pth(file: Path) -> object:
    if not file.is_file():
        raise InputError(f"{file}: checkpoint file not found")
    if file.stat().st_size == 0:
        raise InputError(f"{file}: empty file (0 bytes): corrupt or incompletely copied PyTorch checkpoint")
    # torch.save writes a zip archive (since torch 1.6), read here memory-mapped; its legacy format
    # (_use_new_zipfile_serialization=False), a bare pickle stream, cannot be mapped and is read whole.
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as err:  # (permission denied, an I/O error): named, as the failures of torch.load below are
        raise InputError(f"{file}: cannot read the checkpoint file ({err.strerror or err})") from None
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=head.startswith(b"PK\x03\x04"))
    except MemoryError:
        raise
    except Exception as err:  # weights_only runs no code from the file: whatever fails is its content
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # a zip's local file header; pickle's PROTO opcode (protocol 2+)
            raise InputError(f"{file}: not a PyTorch checkpoint this stack reads: expected torch.save's zip format or "
                             "its legacy pickle format (protocol 2 or later)") from None
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsupported:  # torch's own advice (weights_only=False) is no option of this stack's commands
            raise InputError(f"{file}: holds Python objects besides tensors (e.g. {unsupported[1]}), which this stack does not "
                             "unpickle: it reads weights only, running no code from the file. If you trust the file, "
                             "re-save its tensors alone (torch.load(..., weights_only=False), then torch.save of the state dict)") from None
        raise InputError(f"{file}: corrupt or unreadable PyTorch checkpoint ({_first_line(err)})") from None


def _state_dict(obj: object, file: Path, what: str = "the checkpoint", skip: str | None = None) -> Tensors:
    """Names to floating-point tensors (an integer tensor cannot be a parameter); names starting
    with `skip` are dropped unchecked."""
    if not isinstance(obj, dict):
        raise InputError(f"{file}: {what} must be a dict of tensors (a state dict), got {type(obj).__name__}")
    out: Tensors = {}
    for name, t in obj.items():
        if not isinstance(name, str):
            raise InputError(f"{file}: {what} has a non-string key {name!r}")
        if skip and name.startswith(skip):
            continue
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{file}: entry {name} is a {type(t).__name__}, expected a tensor")
        if not t.is_floating_point():
            raise InputError(f"{file}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, expected a floating-point dtype")
        out[name] = t
    return out


# --- HF ---------------------------------------------------------------------------------------
def read_args(path: str | Path) -> ModelArgs:
    """A checkpoint directory's model config alone (its weights unread)."""
    path = Path(path)
    return _hf_config(path)[0] if detect_format(path) == "hf" else _meta_config(path)[0]


def _hf_config(path: Path) -> tuple[ModelArgs, dict]:
    cfg = read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise InputError(f"{path / 'config.json'}: expected a JSON object")
    return ModelArgs.from_hf(cfg, str(path / "config.json")), cfg


def _meta_config(path: Path) -> tuple[ModelArgs, list[Path]]:
    # each file's values are checked under its own name
    configs = [path / "params.json"] + [f for f in [path / "consolidate_params.json"] if f.is_file()]
    return ModelArgs.from_meta([(str(f), read_json(f)) for f in configs]), configs


def _read_hf(path: Path) -> Checkpoint:
    args, cfg = _hf_config(path)
    vq_config = VQGANConfig.from_hf(cfg.get("vq_config"), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.is_file() and (path / "model.safetensors").is_file():
        # transformers would load model.safetensors, this stack the shards: refuse to guess which is current
        raise InputError(f"{path}: both model.safetensors and {index.name}: keep one layout (one file, or the shards and their index)")
    if index.is_file():
        weight_map = read_weight_map(index)
        raw: Tensors = {}
        for shard in sorted(set(weight_map.values())):
            for name, t in _load_safetensors(path / shard).items():
                # Each tensor in the one shard the index names: a stray or second copy would be loaded silently.
                if weight_map.get(name) != shard:
                    where = f"lists it in {weight_map[name]}" if name in weight_map else "does not list it"
                    raise InputError(f"{path / shard}: holds tensor {name}, but {index.name}'s weight_map {where}")
                raw[name] = t
        missing = sorted(set(weight_map) - set(raw))
        if missing:
            raise InputError(f"{index}: weights listed but not found in the shards: {', '.join(missing[:5])}")
    elif (path / "model.safetensors").is_file():
        raw = _load_safetensors(path / "model.safetensors")
    else:
        raise InputError(f"{path}: no weights: expected model.safetensors or model.safetensors.index.json")
    vq = {k[len(HF_VQ_PREFIX):]: v for k, v in raw.items() if k.startswith(HF_VQ_PREFIX)}
    decoder_file = path / HF_DECODER_FILE
    if decoder_file.is_file():
        vq.update(_load_safetensors(decoder_file))
    weights = from_hf({k: v for k, v in raw.items() if not k.startswith(HF_VQ_PREFIX)}, args, str(path))
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise InputError(f"{path}: tokenizer.json is missing (the text tokenizer, `tokenizers` JSON)")
    return Checkpoint(args, weights, vq_config, vq, tok, "hf", path)


def write_hf(ckpt: Checkpoint, out: Path, tokenizer: ChameleonTokenizer, max_shard_bytes: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    rename = META_IMAGE_TOKEN in tokenizer.vocab and HF_IMAGE_TOKEN not in tokenizer.vocab
    vocab = {(HF_IMAGE_TOKEN if rename and k == META_IMAGE_TOKEN else k): v for k, v in tokenizer.vocab.items()}
    cfg = ckpt.args.to_hf(ckpt.vq_config, dict(sorted(vocab.items(), key=lambda kv: kv[1])), special)
    cfg["dtype"] = str(next(iter(specs(ckpt.weights).values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    decoder = to_hf(ckpt.weights, ckpt.args)  # permuted (and merged, cast) as each tensor is written
    encoder = {HF_VQ_PREFIX + k: v for k, v in ckpt.vq_weights.items() if not k.startswith("decoder.")}
    tensors = LazyTensors({**specs(decoder), **encoder}, lambda k: encoder[k] if k in encoder else decoder[k])
    _write_safetensors_sharded(tensors, out, max_shard_bytes)
    vq_decoder = {k: v for k, v in ckpt.vq_weights.items() if k.startswith("decoder.")}
    if vq_decoder:
        write_safetensors(vq_decoder, out / HF_DECODER_FILE)
    if rename:
        _write_renamed_tokenizer(ckpt.tokenizer_file, out / "tokenizer.json", META_IMAGE_TOKEN, HF_IMAGE_TOKEN)
    else:
        shutil.copyfile(ckpt.tokenizer_file, out / "tokenizer.json")
    # Special tokens by name, so that transformers' AutoTokenizer knows them too.
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ckpt.args.max_seq_len}
    for key in ("bos", "eos", "pad"):
        tok_cfg[f"{key}_token"] = SPECIAL_NAMES[key]  # the tokenizer found its ids by these names
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    for name, content in zip(PROCESSOR_FILES, processor_configs(ckpt.vq_config)):
        (out / name).write_text(json.dumps(content, indent=2))


def _write_renamed_tokenizer(src: Path, dst: Path, old: str, new: str) -> None:
    """A `tokenizers` JSON with one token renamed, in the model's vocabulary and the added tokens."""
    doc = json.loads(src.read_text(encoding="utf-8"))
    vocab = doc.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    for token in doc.get("added_tokens") or []:
        if token.get("content") == old:
            token["content"] = new
    dst.write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")


def processor_configs(vq: VQGANConfig) -> tuple[dict, dict]:
    """transformers' ChameleonProcessor settings (processor_config.json, preprocessor_config.json),
    as HF's Chameleon checkpoints ship them, but sized for this VQGAN and with Meta's exact scaling
    (`vqgan.preprocess`): shortest side to the resolution with LANCZOS, centre crop, x * 2/255 - 1
    (HF's files say 0.0078, which shifts every pixel by up to 1%)."""
    processor = {"processor_class": "ChameleonProcessor", "image_seq_length": vq.image_seq_len, "image_token": "<image>"}
    side = vq.resolution
    image = {"image_processor_type": "ChameleonImageProcessor", "processor_class": "ChameleonProcessor",
             "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": side}, "resample": 1,  # PIL LANCZOS
             "do_center_crop": True, "crop_size": {"height": side, "width": side},
             "do_rescale": True, "rescale_factor": 2 / 255, "do_normalize": True,
             "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0]}
    return processor, image


def _write_safetensors_sharded(tensors: Tensors, out: Path, max_shard_bytes: int | None) -> None:
    if not max_shard_bytes:
        write_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    spec = specs(tensors)
    sizes = {name: t.nbytes for name, t in spec.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(sizes):
        if shards[-1] and size + sizes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += sizes[name]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = LazyTensors({k: spec[k] for k in names}, tensors.__getitem__)
        write_safetensors(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))


# --- Meta -------------------------------------------------------------------------------------
def _meta_tokenizer_dir(path: Path) -> Path:
    for candidate in (path / "tokenizer", path.parent.parent / "tokenizer"):
        if (candidate / "text_tokenizer.json").is_file():
            return candidate
    raise InputError(f"{path}: tokenizer folder not found: expected {path / 'tokenizer'}/text_tokenizer.json (or ../../tokenizer, the release layout)")


def _read_meta(path: Path) -> Checkpoint:
    args, configs = _meta_config(path)
    files = sorted(path.glob("consolidated.*.pth"))
    shard_names = [f"consolidated.{i:02d}.pth" for i in range(args.model_parallel_size)]
    if files and [f.name for f in files] != shard_names:
        # e.g. a shard lost in copying: the rest, read as one merged file, would fail on shapes naming no file
        missing = [n for n in shard_names if not (path / n).is_file()]
        extra = [f.name for f in files if f.name not in shard_names]
        found = (f"missing {', '.join(missing)}" if missing else "") + ("; " if missing and extra else "") + (f"unexpected {', '.join(extra)}" if extra else "")
        raise InputError(f"{path}: shard files do not match model_parallel_size={args.model_parallel_size} "
                         f"({' / '.join(f.name for f in configs)}), which means {shard_names[0]} to {shard_names[-1]}: {found}")
    single = path / "consolidated.pth"
    if single.is_file():
        if files:
            raise InputError(f"{path}: both {single.name} and {files[0].name}: keep one layout (one file, or one file per shard)")
        files = [single]
    if not files:
        raise InputError(f"{path}: no weights: expected consolidated.pth or consolidated.NN.pth")
    shards = [_state_dict(_load_pth(f), f) for f in files]
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            raise InputError(f"{f}: its keys differ from {files[0].name}'s")
        # Model-parallel shards hold equal slices, of one dtype: merged lazily, each tensor's shape
        # and dtype are taken from the first shard's before it is made (torch.cat would promote).
        for name, t in shard.items():
            if t.shape != shards[0][name].shape:
                raise InputError(f"{f}: tensor {name} has shape {tuple(t.shape)}, but {files[0].name} has {tuple(shards[0][name].shape)}")
            if t.dtype != shards[0][name].dtype:
                ours, first = (str(d).removeprefix("torch.") for d in (t.dtype, shards[0][name].dtype))
                raise InputError(f"{f}: tensor {name} has dtype {ours}, but {files[0].name} has {first}")
    _check_keys(set(shards[0]) - {"rope.freqs"}, _expected_meta_keys(args), str(files[0]))
    weights = from_meta_shards(shards, args, str(path))

    tok_dir = _meta_tokenizer_dir(path)
    vq_yaml, vq_ckpt = tok_dir / "vqgan.yaml", tok_dir / "vqgan.ckpt"
    if not vq_yaml.is_file() or not vq_ckpt.is_file():
        raise InputError(f"{tok_dir}: expected vqgan.yaml and vqgan.ckpt beside text_tokenizer.json")
    try:
        vq_config = VQGANConfig.from_yaml_dict(yaml.safe_load(vq_yaml.read_text()), str(vq_yaml))
    except yaml.YAMLError as err:
        raise InputError(f"{vq_yaml}: not valid YAML ({err})") from None
    raw = _load_pth(vq_ckpt)
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise InputError(f"{vq_ckpt}: expected a dict with a 'state_dict' entry")
    # The training checkpoint also holds the GAN loss/discriminator: not part of the tokenizer.
    vq = _state_dict(raw["state_dict"], vq_ckpt, "'state_dict'", skip="loss.")
    return Checkpoint(args, weights, vq_config, vq, tok_dir / "text_tokenizer.json", "meta", path)


def write_meta(ckpt: Checkpoint, out: Path, num_shards: int | None = None) -> None:
    num_shards = num_shards or ckpt.args.model_parallel_size
    if not ckpt.has_decoder:
        # Meta's loader reads vqgan.ckpt non-strictly: it would decode images with random weights.
        raise InputError(
            f"{'this model' if ckpt.format == 'memory' else ckpt.path}: no VQGAN decoder weights (HF checkpoints ship the encoder only), and Meta's format "
            "needs them: convert from a Meta checkpoint, or keep this one in HF format"
        )
    shards = to_meta_shards(ckpt.weights, ckpt.args, num_shards)
    out.mkdir(parents=True, exist_ok=True)
    # The files' layout is the model-parallel size Meta's loader builds (it reads
    # consolidate_params.json unconditionally): one file is a model_parallel_size 1 checkpoint.
    args = replace(ckpt.args, model_parallel_size=num_shards)
    (out / "params.json").write_text(json.dumps(args.to_params(), indent=2))
    (out / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": num_shards}))
    # Each shard made, written and dropped before the next (no loop variable keeps it while the next is made).
    for name in ["consolidated.pth"] if num_shards == 1 else [f"consolidated.{i:02d}.pth" for i in range(num_shards)]:
        write_pth(next(shards), out / name)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    shutil.copyfile(ckpt.tokenizer_file, tok_dir / "text_tokenizer.json")
    (tok_dir / "vqgan.yaml").write_text(yaml.safe_dump(ckpt.vq_config.to_yaml_dict(), sort_keys=False))
    with pth_write_errors(tok_dir / "vqgan.ckpt"):
        torch.save({"state_dict": ckpt.vq_weights}, tok_dir / "vqgan.ckpt")


# --- validation -------------------------------------------------------------------------------
def _expected_meta_keys(args: ModelArgs) -> set[str]:
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        keys |= {p + s for s in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                                 "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                                 "attention_norm.weight", "ffn_norm.weight")}
        if args.qk_normalization:
            keys |= {p + f"attention.{n}_normalization.{t}" for n in ("q", "k") for t in ("weight", "bias")}
    return keys


def _check_keys(found: set[str], expected: set[str], source: str) -> None:
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing:
        raise InputError(f"{source}: missing weight(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unknown:
        raise InputError(f"{source}: unknown weight(s): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")


def _check_against(found: Tensors, ref: dict, source: str) -> None:
    """Names, then shapes, of `found` against a reference state dict: a mismatch names the key."""
    _check_keys(set(found), set(ref), source)
    for name, w in specs(found).items():
        if tuple(w.shape) != tuple(ref[name].shape):
            raise InputError(f"{source}: weight {name} has shape {tuple(w.shape)}, the config implies {tuple(ref[name].shape)}")


def _check_weights(ckpt: Checkpoint) -> None:
    """Shapes and names against a freshly built model (the VQGAN decoder may be absent)."""
    from chameleon.model import Transformer
    from chameleon.vqgan import VQGAN

    with torch.device("meta"):
        ref = Transformer(ckpt.args).state_dict()
        vq_ref = VQGAN(ckpt.vq_config).state_dict()
    if not ckpt.has_decoder:
        vq_ref = {k: v for k, v in vq_ref.items() if not k.startswith("decoder.")}
    _check_against(ckpt.weights, ref, str(ckpt.path))
    _check_against(ckpt.vq_weights, vq_ref, f"{ckpt.path} (VQGAN)")