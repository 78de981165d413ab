"""lm-eval filter for MATH maj@k: vote on the normalized final answers of the k samples.

lm-eval's `majority_vote` counts raw strings, which never agree for free-form solutions, and
minerva's `process_results` scores a whole solution text. So votes are cast on lm-eval's own
`normalize_final_answer(get_unnormalized_answer(text))` and the filter passes on the first
sample that carries the winning answer; `process_results` then scores it unchanged.
Samples without a "Final Answer: ..." line do not vote unless no sample has one.
"""

from __future__ import annotations

from collections import Counter

from lm_eval.api.filter import Filter
from lm_eval.tasks.minerva_math.utils import get_unnormalized_answer, normalize_final_answer

INVALID = "[invalidanswer]"


def _answer(text: str) -> str:
    raw = get_unnormalized_answer(text)
    return INVALID if raw == INVALID else normalize_final_answer(raw)


def majority_sample(samples: list[str]) -> str:
    """The first sample whose normalized answer is the most common (ties: earliest answer)."""
    answers = [_answer(s) for s in samples]
    votes = Counter(a for a in answers if a != INVALID) or Counter(answers)
    winner = votes.most_common(1)[0][0]
    return samples[answers.index(winner)]


class MinervaMajorityVote(Filter):
    def apply(self, resps, docs):
        return [[majority_sample(list(samples))] for samples in resps]
