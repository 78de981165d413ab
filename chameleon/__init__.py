"""Reference Chameleon stack: `load` a checkpoint (HF or Meta format), run it, generate, convert.

    import chameleon, torch
    model = chameleon.load("path/to/checkpoint", device="cpu", dtype=torch.float32)
    logits = model(torch.tensor([model.encode_prompt(["A photo of a cat"])]))   # (1, seq, vocab)
    segments = model.generate(["Draw a cat:"], mode="interleaved", max_new_tokens=1200)
"""

from chameleon.chameleon import Chameleon, load
from chameleon.config import PRESETS, ModelArgs, VQGANConfig, preset
from chameleon.errors import InputError
from chameleon.generate import GenerationOptions, generate

__all__ = ["Chameleon", "load", "ModelArgs", "VQGANConfig", "PRESETS", "preset", "InputError", "GenerationOptions", "generate"]
