"""Model backends: one mixed-modal interface (lm-eval `LM` + images), three implementations.

Importing this package registers them with lm-eval, so after `import benchmarks.backends`,
`lm_eval.simple_evaluate(model="chameleon", model_args="pretrained=DIR")` works; "hf-mm" is the
transformers baseline and "responses" a file of pre-computed outputs.
"""

from __future__ import annotations

from benchmarks.backends.base import GenSettings, MixedModalLM, parse_gen_kwargs, request_hash
from chameleon.errors import InputError

# --backend name -> (lm-eval registry name, module)
BACKENDS = {
    "chameleon": ("chameleon", "benchmarks.backends.chameleon_backend"),
    "hf": ("hf-mm", "benchmarks.backends.hf"),
    "responses": ("responses", "benchmarks.backends.responses"),
}


def _register_all() -> None:
    import importlib

    for _, module in BACKENDS.values():
        importlib.import_module(module)


_register_all()


def load_backend(kind: str, model: str, **kwargs) -> MixedModalLM:
    """Build backend `kind` ("chameleon" | "hf" | "responses") for the model path `model`."""
    if kind not in BACKENDS:
        raise InputError(f"--backend {kind!r}: expected one of {sorted(BACKENDS)}")
    from lm_eval.api.registry import get_model

    return get_model(BACKENDS[kind][0])(pretrained=model, **kwargs)


def image_input_problem(kind: str, model: str) -> str | None:
    """Why backend `kind` cannot take images from `model`, from its files alone (None: it can, or
    loading it will say what is wrong)."""
    if kind not in BACKENDS:
        return None
    from lm_eval.api.registry import get_model

    return get_model(BACKENDS[kind][0]).checkpoint_image_problem(model)


__all__ = ["BACKENDS", "GenSettings", "MixedModalLM", "image_input_problem", "load_backend", "parse_gen_kwargs", "request_hash"]
