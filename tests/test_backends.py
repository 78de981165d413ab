"""Backends: the reference Chameleon, transformers and a responses file behind one lm-eval interface."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from lm_eval.api.instance import Instance
from PIL import Image

from benchmarks.backends import load_backend, request_hash
from benchmarks.backends.base import parse_gen_kwargs
from chameleon.errors import InputError
from conftest import PHOTO, REPO

LL = [  # (context, continuation): shared contexts, single- and multi-token continuations, empty context
    ("Question: 2+2?\nAnswer:", " A"), ("Question: 2+2?\nAnswer:", " B"), ("Question: 2+2?\nAnswer:", " C"),
    ("Natalia sold clips to", " 48 of her friends in April"), ("Natalia sold clips to", " some friends"),
    ("", "Hello world"), ("The cat sat ", "on the mat"),
]


def ll_requests(pairs=LL):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def gen_request(context, i=0, **kw):
    return Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 12, **kw}), i)


@pytest.fixture(scope="module")
def ours(tiny_hf):
    return load_backend("chameleon", str(tiny_hf), batch_size=3)


@pytest.fixture(scope="module")
def hf(tiny_hf):
    return load_backend("hf", str(tiny_hf), batch_size=2)


def test_chameleon_scores_equal_transformers(ours, hf):
    """Our prefix-sharing KV-cache path gives transformers' full-sequence scores and greedy text."""
    a, b = ours.loglikelihood(ll_requests()), hf.loglikelihood(ll_requests())
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb
    gens = [gen_request("Q: Natalia sold", 0), gen_request("Janet's ducks", 1, max_gen_toks=7)]
    assert ours.generate_until(gens) == hf.generate_until(gens)


def test_loglikelihood_independent_of_batch_size_and_order(ours, tiny_hf):
    one = load_backend("chameleon", str(tiny_hf), batch_size=1)
    base = ours.loglikelihood(ll_requests())
    rev = one.loglikelihood(ll_requests(LL[::-1]))[::-1]
    assert [round(x, 4) for x, _ in base] == [round(x, 4) for x, _ in rev]
    assert [g for _, g in base] == [g for _, g in rev]


def test_rolling_loglikelihood_is_sum_over_windows(ours):
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    [rolling] = ours.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    [(whole, _)] = ours.loglikelihood(ll_requests([("", text)]))
    assert rolling == pytest.approx(whole, abs=1e-4)  # one window: same as scoring after bos


def test_sampling_reproducible_per_request_and_sample(ours, tiny_hf):
    reqs = [gen_request("Q: Natalia sold", 0, do_sample=True, temperature=1.0, seed=3)] * 3
    a = ours.generate_until(reqs)
    assert len(set(a)) > 1  # the three repeats are different samples
    other = load_backend("chameleon", str(tiny_hf), batch_size=1)
    assert other.generate_until(reqs) == a  # batch size does not change samples
    assert other.generate_until(reqs[:2], sample_index=[2, 1]) == [a[2], a[1]]  # sample k is sample k


def test_images_in_lm_eval_multimodal_convention(ours, hf):
    image = Image.open(PHOTO).convert("RGB")
    req = Instance("generate_until", {}, ("<image>A photo of", {"until": ["\n"], "max_gen_toks": 6}, {"visual": [image]}), 0)
    [out] = ours.generate_until([req])
    assert isinstance(out, str)
    [(lp, _)] = ours.loglikelihood([Instance("loglikelihood", {}, ("<image>A photo of", " a cat", {"visual": [image]}), 0)])
    assert lp < 0
    # transformers' processor with the files our HF directories carry: the same VQ codes and output
    assert hf.encode_prompt(["A photo:", image]) == ours.encode_prompt(["A photo:", image])
    assert hf.generate_until([req]) == [out]
    # the image as a file read when needed (the runner's captioning prompts): the same output
    from benchmarks.backends.base import FileImage

    from_file = Instance("generate_until", {}, (*req.args[:2], {"visual": [FileImage(PHOTO)]}), 0)
    assert ours.generate_until([from_file]) == hf.generate_until([from_file]) == [out]
    with pytest.raises(InputError, match="placeholder"):
        ours.generate_until([Instance("generate_until", {}, ("a <image> b <image>", {}, {"visual": [image]}), 0)])


def test_hf_without_processor_files_names_what_is_missing(tiny_hf, tmp_path):
    """A Chameleon directory without transformers' processor files loads for text; image input is
    refused naming the files, and `image_input_problem` says so from the files alone (the runner
    refuses a suite with captioning before loading the model)."""
    from benchmarks.backends import image_input_problem
    from conftest import build_tiny_llama

    bare = tmp_path / "bare"
    shutil.copytree(tiny_hf, bare)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (bare / name).unlink()
    why = "it lacks processor_config.json and preprocessor_config.json"
    assert image_input_problem("hf", str(bare)).startswith(why) and image_input_problem("hf", str(tiny_hf)) is None
    backend = load_backend("hf", str(bare))
    assert backend.image_problem == image_input_problem("hf", str(bare))
    image = Image.open(PHOTO).convert("RGB")
    with pytest.raises(InputError, match=rf"--model {re.escape(str(bare))}: the hf backend cannot take image input: {why}"):
        backend.generate_until([Instance("generate_until", {}, ("<image>A", {"max_gen_toks": 2}, {"visual": [image]}), 0)])
    llama = build_tiny_llama(tmp_path / "llama", max_positions=64)
    assert image_input_problem("hf", str(llama)) == "it is a 'llama' checkpoint; images need a Chameleon one"
    assert image_input_problem("chameleon", str(bare)) is None and image_input_problem("responses", "r.jsonl") is None


def test_interleaved_output(ours, hf):
    """Image mode gives one image and nothing else (whatever max_gen_toks says); a backend without
    image output refuses by name."""
    from benchmarks.backends import GenSettings

    [segments] = ours.generate_interleaved([["Draw a cat:"]], GenSettings(max_gen_toks=40), mode="image")
    assert len(segments) == 1 and isinstance(segments[0], Image.Image)
    assert segments[0].size == (ours.model.vqgan.cfg.resolution,) * 2
    with pytest.raises(InputError, match="backend 'hf' cannot produce mixed-modal"):
        hf.generate_interleaved([["Draw a cat:"]], GenSettings(max_gen_toks=40), mode="image")


def test_registered_with_lm_eval_and_its_cache(tiny_hf, tmp_path):
    """simple_evaluate(model="chameleon") works, and lm-eval's CachingLM gets each result."""
    import lm_eval
    from sqlitedict import SqliteDict

    from benchmarks.text.run import text_task_manager

    kw = dict(model="chameleon", model_args=f"pretrained={tiny_hf},batch_size=4", tasks=["chameleon_mmlu_anatomy"],
              task_manager=text_task_manager(), limit=3, num_fewshot=1)
    out = lm_eval.simple_evaluate(**kw, use_cache=str(tmp_path / "cache"))
    acc = out["results"]["chameleon_mmlu_anatomy"]["acc,none"]
    db = next(tmp_path.glob("cache*"))
    with SqliteDict(str(db)) as d:
        assert len(d) == 12  # 3 items x 4 choices, each cached
    again = lm_eval.simple_evaluate(**kw, use_cache=str(tmp_path / "cache"))
    assert again["results"]["chameleon_mmlu_anatomy"]["acc,none"] == acc


def test_responses_file(tmp_path):
    reqs = [gen_request("Q: one", 0), gen_request("Q: two", 1)]
    reqs[1].task_name, reqs[1].doc_id = "gsm8k", 7
    path = tmp_path / "responses.jsonl"
    lines = [{"request_hash": request_hash("generate_until", reqs[0].args), "output": "The answer is 3.\nQ: more"},
             {"item_id": "gsm8k/7", "output": "four"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    backend = load_backend("responses", str(path))
    # cut at the request's stop ("\n"), as our model's and lm-eval's outputs are
    assert backend.generate_until(reqs) == ["The answer is 3.", "four"]
    assert backend.fingerprint.startswith("responses:")
    missing = backend.generate_until([gen_request("Q: three", 2)])
    assert missing == [""] and len(backend.failures) == 1  # a failure, not a crash
    [(lp, _)] = backend.loglikelihood(ll_requests(LL[:1]))
    assert lp == float("-inf") and len(backend.failures) == 2
    path.write_text('{"output": "x"}\n')
    with pytest.raises(InputError, match=r"responses.jsonl:1: expected an object with 'request_hash' or 'item_id'"):
        load_backend("responses", str(path))
    path.write_text('{"request_hash": "ab", "output": "x"\n')
    with pytest.raises(InputError, match=r"responses.jsonl:1: not valid JSON"):
        load_backend("responses", str(path))


def test_bad_backend_and_model(tmp_path):
    with pytest.raises(InputError, match="--backend 'vllm'"):
        load_backend("vllm", str(tmp_path))
    with pytest.raises(InputError, match="config.json"):
        load_backend("hf", str(tmp_path))


H = "9f2c" * 16  # a request hash


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"request_hash": H, "sample": "one", "output": "x"}], r":1: field 'sample' must be a non-negative integer, got 'one'"),
        ([{"request_hash": H, "sample": None, "output": "x"}], r":1: field 'sample' must be a non-negative integer, got None"),
        ([{"request_hash": H, "sample": 0.7, "output": "x"}], r":1: field 'sample' must be a non-negative integer, got 0.7"),
        ([{"request_hash": {"a": 1}, "output": "x"}], r":1: field 'request_hash' must be a non-empty string"),
        ([{"request_hash": 42, "output": "x"}], r":1: field 'request_hash' must be a non-empty string.*got 42"),
        ([{"item_id": ["gsm8k", 7], "output": "x"}], r":1: field 'item_id' must be a non-empty string: \"<task>/<doc_id>\", or the image id"),
        ([{"request_hash": H, "output": None}], r":1: field 'output' must be a string of valid Unicode text .*, got None"),
        ([{"request_hash": H, "output": 42}], r":1: field 'output' must be a string of valid Unicode text .*, got 42"),
        ([{"request_hash": H, "loglikelihood": "abc"}], r":1: field 'loglikelihood' must be a number <= 0.*got 'abc'"),
        ([{"request_hash": H, "loglikelihood": None}], r":1: field 'loglikelihood' must be a number <= 0.*got None"),
        ([{"request_hash": H, "loglikelihood": -1.0, "is_greedy": "yes"}], r":1: field 'is_greedy' must be true or false"),
        ([{"request_hash": H, "output": "a"}, {"request_hash": H, "output": "b"}],
         rf":2: request_hash '{H}' sample 0 has another response on line 1"),
        ([{"item_id": "gsm8k/7", "sample": 1, "output": "a"}, {"item_id": "gsm8k/7", "sample": 1, "output": "b"}],
         r":2: item_id 'gsm8k/7' sample 1 has another response on line 1"),
        ([], r": holds no responses"),
    ],
)
def test_responses_file_fields_checked(tmp_path, lines, message):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(InputError, match="responses.jsonl" + message):
        load_backend("responses", str(path))


def test_responses_file_repeats_are_fine(tmp_path):
    """Samples files hold one record per filter, so one request's response may come twice: equal repeats load."""
    path = tmp_path / "responses.jsonl"
    line = json.dumps({"request_hash": "h" * 64, "item_id": "gsm8k/7", "output": "The answer is 1."}) + "\n"
    path.write_text(line * 2)
    assert load_backend("responses", str(path)).by_hash[("h" * 64, 0)]["output"] == "The answer is 1."


def test_responses_file_encoding_and_line_breaks(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_bytes(b'{"request_hash": "ab", "output": "x"}\n{"request_hash": "cd", "output": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"responses.jsonl:2: not UTF-8 text"):
        load_backend("responses", str(path))
    req = gen_request("Q: one")
    path.write_text(json.dumps({"request_hash": request_hash("generate_until", req.args), "output": "a\u2028b"},
                               ensure_ascii=False) + "\n")  # U+2028 inside a JSON string is not a line break
    assert load_backend("responses", str(path)).generate_until([req]) == ["a\u2028b"]


def test_responses_output_ends_before_the_earliest_stop_string(tmp_path):
    """An output ends before whichever of the request's stop strings occurs first in it, not the
    first one listed, and the stop string is dropped (README, lm-eval's semantics)."""
    path = tmp_path / "responses.jsonl"
    req = gen_request("Q: one", until=["Q:", "\n\n"])
    path.write_text(json.dumps({"request_hash": request_hash("generate_until", req.args), "output": "42\n\nQ: two"}) + "\n")
    assert load_backend("responses", str(path)).generate_until([req]) == ["42"]


def test_hf_dtype_is_described_for_the_run_identity(hf, tiny_hf):
    """The fingerprint identifies the checkpoint files; the dtype, which changes outputs too, is in
    the description, which the run directory's identity records (a bf16 rerun of an fp32 run is refused)."""
    from benchmarks.runner.run import run_identity
    from benchmarks.runner.suite import load_suite

    half = load_backend("hf", str(tiny_hf), dtype="bfloat16")
    assert half.fingerprint == hf.fingerprint and len(hf.fingerprint) == 64
    suite = load_suite("smoke")
    assert run_identity(suite, half.describe())["dtype"] != run_identity(suite, hf.describe())["dtype"]


def test_hf_unloadable_checkpoint_dir(tiny_hf, tmp_path):
    import shutil

    bad = tmp_path / "hf"
    shutil.copytree(tiny_hf, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=rf"--model {re.escape(str(bad))}: cannot load .*config.json"):
        load_backend("hf", str(bad))
    shutil.copy(tiny_hf / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match=rf"--model {re.escape(str(bad))}: cannot load .*SafetensorError"):
        load_backend("hf", str(bad))


def test_gen_kwargs_from_lm_eval():
    """lm-eval's gen_kwargs as tasks give them: `until` as a string or list; an empty stop string
    (a task whose delimiter is "") would end every answer at once, so it is dropped."""
    from benchmarks.backends.base import parse_gen_kwargs

    assert parse_gen_kwargs({"until": "Q:"}).until == ("Q:",)
    greedy = parse_gen_kwargs({"until": ["", "\n\n"], "max_gen_toks": 30})
    assert (greedy.until, greedy.max_gen_toks, greedy.do_sample, greedy.temperature) == (("\n\n",), 30, False, 0.0)
    sampled = parse_gen_kwargs({"do_sample": True, "temperature": 0.6})
    assert sampled.do_sample and sampled.temperature == 0.6
    # lm-eval's rule: without do_sample, a temperature above 0 samples (as `--gen_kwargs temperature=0.7`)
    implied = parse_gen_kwargs({"temperature": 0.7})
    assert not implied.greedy and implied.temperature == 0.7
    assert parse_gen_kwargs({"do_sample": False, "temperature": 0.7}).greedy
    assert parse_gen_kwargs({"temperature": 0.0}).greedy
    assert parse_gen_kwargs({"top_k": None, "max_new_tokens": 9}) == parse_gen_kwargs({"top_k": 0, "max_gen_toks": 9})
    assert parse_gen_kwargs({"max_gen_toks": 8.0, "top_k": "3", "seed": -1}) == parse_gen_kwargs({"max_gen_toks": 8, "top_k": 3, "seed": -1})
    # values of the wrong type or range (a task YAML's, lm-eval's --gen_kwargs) name their key
    for bad, message in [({"temperature": "hot"}, "temperature 'hot': expected a number >= 0"),
                         ({"do_sample": True, "temperature": -1}, "temperature -1: expected a number >= 0"),
                         ({"top_p": None}, "top_p None: expected a number in (0, 1]"),
                         ({"top_k": -2}, "top_k -2: expected an integer >= 0"),
                         ({"max_gen_toks": "many"}, "max_gen_toks 'many': expected an integer >= 0"),
                         ({"do_sample": "yes"}, "do_sample 'yes': expected true or false"),
                         ({"until": 5}, "until 5: expected a string or a list of strings"),
                         ({"until": ["Q:", None]}, "until ['Q:', None]: expected a string or a list of strings"),
                         ({"until": 0}, "until 0: expected a string or a list of strings"),
                         ({"max_gen_toks": 3.7}, "max_gen_toks 3.7: expected an integer >= 0"),
                         ({"top_k": 2.5}, "top_k 2.5: expected an integer >= 0"),
                         ({"seed": 1.9}, "seed 1.9: expected an integer")]:
        with pytest.raises(InputError, match=re.escape(f"generation settings: {message}")):
            parse_gen_kwargs(bad)


# --- the hf backend against lm-eval's own hf model, on causal LMs whose tokenizers add no BOS ------

@pytest.fixture(scope="module", params=[True, False], ids=["bos-not-added", "no-bos"])
def tiny_llama(request, tmp_path_factory):
    """A tiny Llama whose tokenizer adds no BOS (GPT-2-like), or has none at all (an empty context
    is then scored after the end-of-text token)."""
    from conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama"), bos=request.param, max_positions=64)


def ours_and_lm_evals(path):
    from lm_eval.models.huggingface import HFLM

    return load_backend("hf", str(path), batch_size=2), HFLM(pretrained=str(path), batch_size=2, device="cpu")


def test_hf_backend_scores_and_generates_as_lm_eval(tiny_llama):
    ours, ref = ours_and_lm_evals(tiny_llama)
    pairs = LL + [("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 3, " How many")]
    a, b = ours.loglikelihood(ll_requests(pairs)), ref.loglikelihood(ll_requests(pairs))
    for (la, ga), (lb, gb) in zip(a, b):  # the last one is longer than the 64 positions: cut as lm-eval cuts
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May." * 2
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(ref.loglikelihood_rolling(rolling)[0], abs=1e-3)
    gens = [gen_request("Q: Natalia sold", 0), gen_request("Janet's ducks", 1, max_gen_toks=7)]
    assert ours.generate_until(gens) == ref.generate_until(gens)


def test_hf_backend_stops_at_every_end_id_of_the_generation_config(tiny_llama, tmp_path):
    """A checkpoint's generation_config may list several end ids (as Llama 3's does): generation
    ends at any of them, as in lm-eval, not only at the tokenizer's (and keeps the end token's
    text, as lm-eval does, where it is not a special token)."""
    ours, _ = ours_and_lm_evals(tiny_llama)
    free = ours._generate([ours.encode_prompt(["Q: Natalia sold"])], parse_gen_kwargs({"max_gen_toks": 12}), None)[0]
    shutil.copytree(tiny_llama, tmp_path / "llama")
    config = json.loads((tmp_path / "llama/generation_config.json").read_text())
    (tmp_path / "llama/generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, free[3]]}))
    ours, ref = ours_and_lm_evals(tmp_path / "llama")
    gens = [Instance("generate_until", {}, ("Q: Natalia sold", {"until": ["\n\n\n"], "max_gen_toks": 12}), 0)]
    [stopped] = ours.generate_until(gens)
    assert [stopped] == ref.generate_until(gens) and stopped == ours.decode_text(free[: free.index(free[3]) + 1])
    assert stopped != ours.decode_text(free)


def test_over_long_requests_cut_as_lm_eval(tiny_hf):
    """A continuation longer than the context window is a per-item failure (lm-eval refuses it);
    a prompt cut from the left never starts inside an image; max_gen_toks must leave room."""
    backend = load_backend("chameleon", str(tiny_hf), batch_size=2)
    long = " ".join(["clips"] * (backend.max_length + 10))
    [(lp, greedy)] = backend.loglikelihood(ll_requests([("Q:", long)]))
    assert lp == float("-inf") and not greedy
    [why] = backend.failures.values()
    assert re.fullmatch(rf"continuation of \d+ tokens is longer than the model's max_length {backend.max_length}", why)
    tok = backend.tok
    image = [tok.boi_id] + [int(tok.code_to_id[0])] * 6 + [tok.eoi_id]
    ids = [tok.bos_id] + image + backend.encode_text(" A cat.") + image + backend.encode_text(" Another")
    for keep in range(1, len(ids)):
        kept = backend._cut_left(ids, keep)
        assert ids[len(ids) - len(kept):] == kept or kept == [backend.prefix_token_id]
        assert kept[0] != tok.eoi_id and not (tok.eoi_id in kept and tok.boi_id not in kept[: kept.index(tok.eoi_id)])
    with pytest.raises(InputError, match=f"max_gen_toks {backend.max_length} leaves no room for a prompt"):
        backend.generate_until([gen_request("Q:", 0, max_gen_toks=backend.max_length)])


def test_greedy_continuations_count_as_greedy(ours):
    """A continuation that greedy generation produced scores as greedy, also where the model's
    top token is a control token (`<unk>`, reserved ones), which text generation never picks."""
    import torch

    prompt = ours.encode_prompt(["Hello"])
    new = ours._generate([prompt], parse_gen_kwargs({"max_gen_toks": 15}), None)[0]
    with torch.no_grad():
        raw_top = ours.model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1].argmax(-1)
    assert ours.not_greedy[raw_top].any()  # the case worth testing: a control token on top somewhere
    [(lp, greedy)] = ours._score([(prompt, new)])
    assert greedy and lp > float("-inf")


def test_responses_loglikelihood_needs_the_request_hash(tmp_path):
    """An item asks one loglikelihood per choice: a record keyed by item_id cannot say which, so it
    answers none of them (each a failure saying why) rather than all four with one number."""
    reqs = ll_requests(LL[:3])
    for r in reqs:
        r.task_name, r.doc_id = "mmlu_anatomy", 0
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps({"item_id": "mmlu_anatomy/0", "loglikelihood": -1.5, "is_greedy": True}) + "\n"
                    + json.dumps({"request_hash": request_hash("loglikelihood", reqs[1].args), "loglikelihood": -0.5}) + "\n")
    backend = load_backend("responses", str(path))
    assert backend.loglikelihood(reqs) == [(float("-inf"), False), (-0.5, False), (float("-inf"), False)]
    assert len(backend.failures) == 2
    assert all(why.endswith("a loglikelihood response needs the request_hash: an item asks one per choice")
               for why in backend.failures.values())


def test_request_hash_is_lm_evals_with_each_image_digested_once(monkeypatch):
    """request_hash equals lm-eval's hash_args (its cache key) for requests with images, and
    PNG-encodes each image object once however many requests show it."""
    import lm_eval.utils
    from lm_eval.api.model import hash_args

    photo = Image.open(PHOTO)
    photo.load()
    rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 128))
    requests = [
        ("<image>A photo of", {"until": ["\n"]}, {"visual": [photo]}),
        ("<image>x<image>", {"max_gen_toks": 4}, {"visual": [rgba, photo]}),
        ("<image>A photo of", {"until": ["\n"]}, {"visual": [photo.copy()]}),  # another object, same pixels: same key
        ("no image", {"until": []}),
    ]
    want = [hash_args("generate_until", args) for args in requests]
    encoded = []
    real = lm_eval.utils.convert_pil_to_hash
    monkeypatch.setattr(lm_eval.utils, "convert_pil_to_hash", lambda image: encoded.append(image) or real(image))
    got = [request_hash("generate_until", args) for args in requests] + [request_hash("generate_until", requests[0])]
    assert got[:4] == want and got[4] == want[0] == want[2] and len(set(want)) == 3
    assert len(encoded) == 3  # photo, rgba, the copy: each once


def test_images_digested_ahead_in_threads(monkeypatch):
    """digest_images computes each distinct image's digest once, ahead, in threads; request_hash
    then encodes nothing and gives lm-eval's key."""
    import threading

    import lm_eval.utils
    from lm_eval.api.model import hash_args

    from benchmarks.backends.base import digest_images

    images = [Image.new("RGB", (64, 48), (i, 2 * i, 3 * i)) for i in range(6)]
    requests = [(f"<image><image> {i}", {}, {"visual": [images[i], images[(i + 1) % 6]]}) for i in range(6)]
    want = [hash_args("generate_until", r) for r in requests]
    threads, real = set(), lm_eval.utils.convert_pil_to_hash
    monkeypatch.setattr(lm_eval.utils, "convert_pil_to_hash", lambda im: threads.add(threading.current_thread().name) or real(im))
    digest_images(im for r in requests for im in r[2]["visual"])
    assert all(name != threading.main_thread().name for name in threads)
    monkeypatch.setattr(lm_eval.utils, "convert_pil_to_hash", None)  # nothing left to encode
    assert [request_hash("generate_until", r) for r in requests] == want


def test_file_images_hash_as_their_pixels_and_errors_name_the_file(ours, tmp_path, monkeypatch):
    """A FileImage's request hash is lm-eval's for its decoded image (a CMYK one's, which lm-eval
    cannot hash, its own); digest_images reads it in a thread, and an unreadable file, or one
    changed since it was hashed, is the InputError naming it. The backend keeps each digested
    image's ids, at most IMAGE_MEMO of them."""
    from lm_eval.api.model import hash_args

    from benchmarks.backends.base import FileImage, digest_images

    files = [FileImage(PHOTO), FileImage(REPO / "benchmarks/data/images/skimage/astronaut.png")]
    args = ("<image> and <image>", {"max_gen_toks": 2}, {"visual": files})
    digest_images(files)
    assert request_hash("generate_until", args) == hash_args("generate_until", (*args[:2], {"visual": [f.read() for f in files]}))
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(PHOTO.read_bytes()[:3000])
    with pytest.raises(InputError, match="cut.jpg: image is truncated"):
        digest_images([FileImage(bad), *(FileImage(PHOTO) for _ in range(20))])
    # CMYK (which PNG, and so hash_args, cannot hold) gets a key of its own, from its pixels
    cmyk = [tmp_path / "cmyk0.jpg", tmp_path / "cmyk1.jpg"]
    for i, path in enumerate(cmyk):
        Image.new("CMYK", (40, 30), (10 * i, 20, 30, 40)).save(path)
    with pytest.raises(OSError, match="cannot write mode CMYK as PNG"):
        hash_args("generate_until", ("<image>", {}, {"visual": [Image.open(cmyk[0])]}))
    keys = [request_hash("generate_until", ("<image>", {}, {"visual": [FileImage(p)]})) for p in cmyk + cmyk[:1]]
    assert keys[0] == keys[2] != keys[1]
    # PA pixels are palette indices: two PA images alike but for their palettes differ
    red, blue = (Image.new("P", (4, 4), 0) for _ in range(2))
    red.putpalette([255, 0, 0] * 256), blue.putpalette([0, 0, 255] * 256)
    assert len({request_hash("generate_until", ("<image>", {}, {"visual": [im.convert("PA")]})) for im in (red, blue)}) == 2
    # a file changed after its first read: its hash would describe other content
    changing = tmp_path / "changing.png"
    shutil.copyfile(PHOTO, changing)
    image = FileImage(changing)
    digest_images([image])
    Image.new("RGB", (8, 8)).save(changing)
    with pytest.raises(InputError, match="changing.png: image file changed during the run"):
        image.read()
    monkeypatch.setattr(ours, "IMAGE_MEMO", 1)
    first = ours.image_ids(files[0])
    assert ours.image_ids(files[1]) != first and ours.image_ids(files[0]) == first == ours.encode_image(files[0].read())
    assert len(ours._image_memo) == 1
    with pytest.raises(InputError, match="expected a PIL image, got int"):
        ours.image_ids(3)


def test_image_digests_shared_by_processes(tmp_path, monkeypatch):
    """Under torchrun each process reads and hashes its share of the images and they exchange the
    digests (two ranks as threads here, gathering through a barrier); an unreadable file in one
    share is the same InputError in every process."""
    import threading

    from benchmarks.backends.base import FileImage, _pixels_digest, digest_images, known_digest

    class ThreadDist:
        def __init__(self, rank, board, barrier):
            self.rank, self.world_size, self.board, self.barrier = rank, 2, board, barrier

        def all_gather(self, obj):
            self.board[self.rank] = obj
            self.barrier.wait(timeout=60)
            return list(self.board)

    files = sorted((REPO / "benchmarks/data/images/coco").glob("*.jpg"))[:5]
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(files[0].read_bytes()[:3000])
    want = [json.dumps(_pixels_digest(FileImage(f)), sort_keys=True) for f in files]
    reads = []
    real = FileImage.read
    monkeypatch.setattr(FileImage, "read", lambda self: reads.append(self.path) or real(self))

    def run(paths):
        board, barrier, out = [None, None], threading.Barrier(2), {}

        def rank(r):
            images = [FileImage(p) for p in paths]
            images += images[:2]  # shown again: hashed once
            try:
                digest_images(images, ThreadDist(r, board, barrier))
                # every file stamped, the other share's too: a change before its read is refused
                out[r] = [known_digest(im) for im in images[:len(paths)]] if all(im.seen for im in images) else "unstamped"
            except InputError as err:
                out[r] = str(err)

        threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    assert run(files) == {0: want, 1: want}
    assert sorted(reads) == files  # each file read once, by one of the two
    out = run([*files[:3], bad, files[4]])  # the bad file is in rank 1's share
    assert out[0] == out[1] and "cut.jpg: image is truncated" in out[0]


# --- our chameleon model against lm-eval's own HFLM on the same Chameleon weights ------------------

@pytest.fixture(scope="module")
def short_chameleon(tmp_path_factory):
    """A tiny Chameleon (HF format) with a 48-token context window: long requests get cut."""
    import dataclasses

    from chameleon.config import preset
    from chameleon.tiny import build_tiny_model

    args = dataclasses.replace(preset("tiny"), model_parallel_size=2, max_seq_len=48)
    return build_tiny_model(tmp_path_factory.mktemp("short") / "hf", "hf", seed=0, args=args)


def test_chameleon_scores_as_lm_evals_hflm(short_chameleon):
    """lm-eval's HFLM on transformers' ChameleonForConditionalGeneration and our backend on the
    same files give the same loglikelihoods (cut from the left past 48 tokens) and greedy text;
    an empty context whose continuation starts with the prefix token (BOS) is scored as lm-eval
    scores it: that token becomes the context."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    model = transformers.ChameleonForConditionalGeneration.from_pretrained(short_chameleon)
    ref = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(short_chameleon),
               batch_size=3, device="cpu")
    ours = load_backend("chameleon", str(short_chameleon), batch_size=2)
    assert ref.max_length == ours.max_length == 48
    pairs = LL + [("", "<s>Hello world"), ("Natalia sold clips to 48 of her friends in April, and then " * 3, " she sold")]
    for (la, ga), (lb, gb) in zip(ours.loglikelihood(ll_requests(pairs)), ref.loglikelihood(ll_requests(pairs))):
        assert la == pytest.approx(lb, abs=1e-4) and ga == gb
    gens = [gen_request("Q: Natalia sold", 0), gen_request("Janet's ducks", 1, max_gen_toks=7, until=["e"]),
            gen_request("Natalia sold clips to 48 of her friends in April " * 3, 2, until=["s "])]
    assert ours.generate_until(gens) == ref.generate_until(gens)


@pytest.mark.parametrize("name", ["chameleon", "hf-mm"])
def test_lm_eval_model_arguments(tiny_hf, name):
    """lm-eval's --batch_size/--max_batch_size/--device flags and --model_args reach our models'
    constructors: a fixed batch size works beside --max_batch_size (which bounds only 'auto', as in
    HFLM); 'auto' and other bad values are refused naming the argument and what is expected."""
    from lm_eval.api.registry import get_model

    def make(model_args, **flags):
        return get_model(name).create_from_arg_string(f"pretrained={tiny_hf},{model_args}".rstrip(","),
                                                     {"batch_size": None, "max_batch_size": None, "device": None, **flags})

    assert make("", batch_size="2", max_batch_size=8, device="cpu").batch_size == 2  # the CLI passes strings
    for model_args, flags, message in [
        ("", {"batch_size": "auto", "max_batch_size": 8}, "batch_size 'auto': expected a positive integer"),
        ("", {"batch_size": "auto:4"}, "batch_size 'auto:4': expected a positive integer"),
        ("batch_size=0", {}, "batch_size 0: expected a positive integer"),
        ("", {"batch_size": "\u00b2"}, "batch_size '\u00b2': expected a positive integer"),  # a digit to str.isdigit, not to int()
        ("max_gen_toks=many", {}, "max_gen_toks 'many': expected a positive integer"),
        ("dtype=bogus", {}, "dtype 'bogus': expected one of float32"),
        ("", {"device": "cuda:7"}, "device 'cuda:7'"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            make(model_args, **flags)


def test_lm_eval_chat_template_refused_naming_the_flag(tiny_hf):
    """lm-eval's --apply_chat_template asks the model for a chat template, which these models do
    not have: refused saying so, not lm-eval's 'please implement the tokenizer_name property'."""
    import lm_eval

    model = load_backend("chameleon", str(tiny_hf))
    with pytest.raises(InputError, match=r"^--apply_chat_template: these models have no chat template"):
        lm_eval.simple_evaluate(model=model, tasks=["chameleon_gsm8k_cot"], limit=1, apply_chat_template=True,
                                task_manager=lm_eval.tasks.TaskManager(include_path=str(REPO / "benchmarks/text/tasks")))
