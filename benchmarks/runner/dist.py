"""Scale-out under `torchrun`: items are sharded across processes and results gathered (gloo).

Without torchrun (no WORLD_SIZE, or 1) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass


class PeerFailed(RuntimeError):
    """A collective failed because another process of the job stopped (its own error says why)."""


# What gloo says when a peer process has gone (it exits on its own error)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


@contextmanager
def _peers_alive():
    # A process that fails exits, and gloo then fails this one's pending collective at once with a
    # RuntimeError about a closed connection; its traceback would bury the first process's error.
    # Other collective errors (a timeout, a bug) keep their own message and traceback.
    try:
        yield
    except RuntimeError as err:
        if not any(s in str(err) for s in PEER_GONE):
            raise
        raise PeerFailed(str(err).strip().splitlines()[0]) from err


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def device(self, device: str) -> str:
        """A bare "cuda" means this process's GPU under torchrun."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as tdist

        out = [None] * self.world_size
        with _peers_alive():
            tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """rank 0's value of `obj` on every rank (e.g. an error found by the main process)."""
        return self.all_gather(obj)[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            with _peers_alive():
                tdist.barrier()


def init_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo")  # CPU collectives; the payloads are small Python objects
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def as_single_process():
    """lm-eval returns results only where LOCAL_RANK is 0. Our sharding sits below lm-eval (in
    ResumableLM), so every process runs lm-eval as a whole, single-process evaluation."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved
