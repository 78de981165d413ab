"""Few-shot exemplars taken from lm-eval's own task files, so there is one copy of each."""

from __future__ import annotations

from pathlib import Path

import lm_eval.tasks
import yaml


def gsm8k_cot() -> list[dict]:
    """The 8 chain-of-thought exemplars of Wei et al. (2022), as lm-eval's `gsm8k_cot` task has them."""
    path = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k-cot.yaml"
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)["fewshot_config"]["samples"]
