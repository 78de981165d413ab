"""lm-eval filters for maj@k: a vote over the final answers of the k samples.

lm-eval's `majority_vote` counts raw strings: "1,000" and "1000" split their votes though
exact_match scores them alike, free-form MATH solutions never agree, and samples without an
answer vote for "[invalid]", which can win. Here samples without an answer do not vote unless no
sample has one, and answers are counted as the task's metric compares them:
- GSM8K (`AnswerMajorityVote`, after the regex filter): equal under lm-eval's own exact_match
  with the task's settings; the first extracted answer of the winning kind is passed on.
- MATH (`MinervaMajorityVote`, on whole solutions): equal after lm-eval's own
  `normalize_final_answer(get_unnormalized_answer(text))`; the first sample that carries the
  winning answer is passed on, and minerva's `process_results` scores it unchanged.
"""

from __future__ import annotations

from collections import Counter

from lm_eval.api.filter import Filter
from lm_eval.api.metrics import exact_match_hf_evaluate
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


class AnswerMajorityVote(Filter):
    """The most common extracted answer (ties: the earliest), counted as exact_match with these
    settings (the task's metric_list) compares answers; `fallback` (the regex filter's "no
    answer") wins only where no sample has an answer."""

    def __init__(self, fallback: str = "[invalid]", **exact_match_settings) -> None:
        self.fallback = fallback
        self.settings = exact_match_settings

    def vote(self, answers: list[str]) -> str:
        candidates = list(dict.fromkeys(a for a in answers if a != self.fallback)) or answers[:1]
        # exact_match's mean over all answers against one candidate, times k: that answer's votes
        votes = [exact_match_hf_evaluate(answers, [c] * len(answers), **self.settings)["exact_match"] for c in candidates]
        return candidates[votes.index(max(votes))]

    def apply(self, resps, docs):
        return [[self.vote(list(answers))] for answers in resps]
