"""The suite runner: `chameleon-bench run`, resumable, sharded under torchrun.

    from benchmarks.runner import load_suite, run_suite, format_results_table
    results = run_suite(load_suite("smoke"), load_backend("chameleon", DIR), "runs/x")
    print(format_results_table(results))      # or format_results_table("runs/x/results.json")

Formats: SCHEMA.md.
"""

__all__ = ["format_results_table", "load_suite", "run_suite"]

_HOME = {"format_results_table": "results", "run_suite": "run", "load_suite": "suite"}


def __getattr__(name: str):
    # lazy: `chameleon-bench --help` should not import lm-eval and torch through this package
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"benchmarks.runner.{_HOME[name]}"), name)
    raise AttributeError(name)
