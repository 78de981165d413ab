"""Text benchmarks (GSM8K, MATH, MMLU) as lm-eval tasks on local files; see tasks/README.md."""

from benchmarks.text.run import (
    BENCHMARKS,
    TASKS_DIR,
    TextBenchmarkResult,
    run_text_benchmark,
    text_task_manager,
)

__all__ = ["BENCHMARKS", "TASKS_DIR", "TextBenchmarkResult", "run_text_benchmark", "text_task_manager"]
