"""Console output of `chameleon-bench run`: one progress bar per benchmark, one summary line when it
finishes, and the libraries' own chatter (lm-eval, datasets, transformers) off unless --verbose.

Progress and summaries go to stderr; the results table (commands.py) to stdout. Under torchrun only
rank 0 draws a bar; every rank still reports errors.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from tqdm import tqdm

LIBRARY_LOGGERS = ("lm_eval", "datasets", "transformers", "evaluate", "huggingface_hub", "fsspec", "urllib3")


def configure_console(verbose: bool = False) -> None:
    """Quiet by default: the libraries log errors only and datasets draws no bars. `verbose` turns on
    lm-eval's own logging (INFO, its format) and leaves datasets and transformers at their defaults."""
    if verbose:
        from lm_eval.utils import setup_logging

        setup_logging("INFO")
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets  # lm-eval's dependency

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    # Its first use resets the logger's level, so use its own switches; set even where nothing has
    # imported it yet (the hf backend does when it loads, and would draw its "Loading weights" bar).
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


PREPARING = "{desc}  preparing requests [{elapsed}]"
BAR = "{desc}  {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class BenchmarkProgress:
    """One bar over a benchmark's model requests (this process's share under torchrun), with ETA.

    Requests answered from the run's cache count as done but stay out of the rate, so the ETA is that
    of the requests still to compute.
    """

    def __init__(self, name: str, enabled: bool = True, width: int = 0, placeholder: bool = True, file=None) -> None:
        self.cached = 0
        self._started = False
        self._args = dict(desc=name.ljust(width), unit="req", leave=False, disable=not enabled,
                          file=file or sys.stderr, dynamic_ncols=True)
        # a "preparing requests" line until the first request; not with --verbose, where lm-eval logs
        # and draws its own bars meanwhile (the bar is made only then, so theirs keep their line)
        self.bar = tqdm(total=None, bar_format=PREPARING, **self._args) if placeholder else None

    def add(self, total: int, cached: int = 0) -> None:
        """`total` more requests, of which `cached` are already answered."""
        self.cached += cached
        if self._args["disable"]:  # another rank under torchrun, or progress off
            return
        first = not self._started
        if first:  # elapsed and rate from the first model request on
            self._started = True
            if self.bar is None:
                self.bar = tqdm(total=total, bar_format=BAR, **self._args)
            else:
                self.bar.bar_format = BAR
                self.bar.reset(total=total)  # draws the bar
        else:
            self.bar.total += total
        if cached:
            self.bar.n += cached
            self.bar.last_print_n += cached
            self.bar.initial += cached
        self.bar.set_postfix_str(f"{self.cached} cached" if self.cached else "", refresh=False)
        if cached or not first:
            self.bar.refresh()

    def status(self, message: str) -> None:
        """What the benchmark does after its requests (scoring captions: SPICE takes minutes on the
        full Karpathy test), shown after the bar."""
        if self.bar is not None and not self._args["disable"]:
            self.bar.set_postfix_str(message)

    @contextmanager
    def chunk(self, size: int):
        """A hook for the backend to report requests as they finish, clipped to the chunk's `size`;
        whatever it did not report is counted when the chunk ends."""
        done = 0

        def hook(n: int) -> None:
            nonlocal done
            n = max(0, min(n, size - done))
            done += n
            if n and self.bar is not None:
                self.bar.update(n)

        yield hook
        if size > done and self.bar is not None:
            self.bar.update(size - done)

    def close(self) -> None:
        if self.bar is None:
            return
        if not self.bar.disable and self.bar.last_print_n < self.bar.n:
            self.bar.refresh()  # the final count, which tqdm may have skipped (mininterval), in logs
        self.bar.close()

    def __enter__(self) -> BenchmarkProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on errors and Ctrl-C: the message that follows starts on a clean line


def summary_line(name: str, entry: dict, cached: int = 0, width: int = 0) -> str:
    """`gsm8k  exact_match,strict-match 12.5 ± 3.1 | n=40, 0 failed | 37.2s, 160 requests computed, 0 cached`."""
    from benchmarks.runner.results import format_metric

    primary = entry.get("primary_metric")
    m = entry.get("metrics", {}).get(primary) if primary else None
    label = primary.split("/", 1)[-1] if primary else "-"
    if m is None:
        score = f"{label} -"
    else:
        value, half = format_metric(primary, m)
        score = f"{label} {value}" + (f" ± {half}" if half != "-" else "")
    failed = entry.get("n_failed", 0)
    where = f" (see samples/{name}.jsonl)" if failed else ""
    return (f"{name.ljust(width)}  {score} | n={entry.get('n_items', 0)}, {failed} failed{where} | "
            f"{entry.get('seconds', 0):.1f}s, {entry.get('computed_requests', 0)} requests computed, {cached} cached")
