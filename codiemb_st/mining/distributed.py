"""Mining under ``torchrun`` (or ``accelerate launch``): which rank does which share, and how the ranks meet.

Each rank encodes every ``world_size``-th shard of the corpus and of the queries into the shared cache, searches
every ``world_size``-th chunk of queries, and the results are gathered so that every rank returns the same records
(the command line writes them on rank 0 only). Shards and query chunks are the same whatever the number of ranks,
so 2 ranks give byte-identical output to one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class RankContext:
    """This process's rank among ``world_size`` (one process: rank 0 of 1).

    Args:
        rank: This process's rank.
        world_size: The number of processes.

    Example:
        ::

            context = RankContext.current()  # the initialized torch.distributed group, or one process
            mine = [chunk for chunk in range(chunks) if context.owns(chunk)]
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls, distributed: bool | None = None) -> RankContext:
        """The initialized ``torch.distributed`` group (``distributed=None``: when there is one; ``False``: one
        process whatever is initialized; ``True``: require one).

        Raises:
            ValueError: With ``distributed=True`` and no initialized process group.
        """
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if distributed is True and not initialized:
            raise ValueError(
                "`distributed=True` needs an initialized torch.distributed process group (run under torchrun and "
                "call torch.distributed.init_process_group first, as `codiemb-st mine` does)."
            )
        if not initialized or distributed is False:
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    def owns(self, number: int) -> bool:
        """Whether shard or chunk ``number`` is this rank's (``number % world_size == rank``)."""
        return number % self.world_size == self.rank

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order (``[value]`` in one process)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def init_from_environment() -> bool:
    """Initialize ``torch.distributed`` when launched by torchrun (``WORLD_SIZE`` > 1) and not initialized yet:
    NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``), gloo on CPUs.

    Returns:
        Whether this call initialized a process group (the caller then destroys it when done).

    Example:
        ::

            started = init_from_environment()
            try:
                ...
            finally:
                if started:
                    torch.distributed.destroy_process_group()
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    logger.info("Mining as rank %d of %d.", dist.get_rank(), dist.get_world_size())
    return True


__all__ = ["RankContext", "init_from_environment"]
