"""Backends: the reference Chameleon, transformers and a responses file behind one lm-eval interface."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.instance import Instance
from PIL import Image

from benchmarks.backends import load_backend, request_hash
from chameleon.errors import InputError
from conftest import PHOTO

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
    with pytest.raises(InputError, match="processor_config.json"):  # no image processor in the tiny HF dir
        hf.generate_until([req])
    with pytest.raises(InputError, match="placeholder"):
        ours.generate_until([Instance("generate_until", {}, ("a <image> b <image>", {}, {"visual": [image]}), 0)])


def test_interleaved_output(ours):
    from benchmarks.backends import GenSettings

    [segments] = ours.generate_interleaved([["Draw a cat:"]], GenSettings(max_gen_toks=40), mode="image")
    assert any(isinstance(s, Image.Image) for s in segments)


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
    assert backend.generate_until(reqs) == ["The answer is 3.\nQ: more", "four"]  # stored verbatim
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
