"""Progress bars of checkpoint reads and writes (tqdm on stderr, as generate's and run's bars): bytes,
with rate and ETA. The safetensors writer and torch.save report no progress of their own, so a
write's bar follows the bytes this process has written (Linux's /proc/self/io), whatever files
they go to."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path


@contextlib.contextmanager
def byte_bar(desc: str, total: int, enabled: bool = True):
    """A bar over about `total` bytes (an estimate: the files' headers and the VQGAN's weights count
    in one size and not in the other), full when the body ends; a disabled one (updates do nothing)
    unless `enabled`."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False, disable=not enabled,
              file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:
        yield bar
        bar.update(max(0, total - bar.n))
        bar.refresh()  # the final count, which tqdm may have skipped (mininterval), in logs


def _bytes_written() -> int | None:
    """Bytes this process has passed to write calls so far (None where /proc/self/io is absent)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


@contextlib.contextmanager
def writing_bar(directory: Path, total: int, enabled: bool = True, every: float = 0.5):
    """While the body writes `total` bytes (the tensors', without the files' headers) into
    `directory`, a bar of the bytes written, polled from a thread every `every` seconds; none where
    the system does not count them."""
    start = _bytes_written() if enabled else None
    if start is None:
        yield
        return
    stop = threading.Event()
    with byte_bar(f"writing {directory.name}", total) as bar:

        def follow() -> None:
            while True:
                done = stop.wait(every)
                bar.update(min((_bytes_written() or start) - start, total) - bar.n)
                if done:
                    return

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
