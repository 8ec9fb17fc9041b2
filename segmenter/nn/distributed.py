"""Data-parallel training across processes (``torchrun``), and the few collectives it needs.

``torchrun --nproc_per_node N -m segmenter train ...`` starts N processes with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; the CLI turns them into a
:class:`Dist` (:func:`from_environment`) and the training loop runs inside
:func:`process_group`: NCCL on CUDA (one GPU per process, ``torch.cuda.set_device(LOCAL_RANK)``),
gloo on the CPU, every collective bounded by :attr:`Dist.timeout_s`. Without those variables (or
with ``WORLD_SIZE=1``) :data:`SINGLE` stands for the plain single process and every collective
here is the identity, so single-process training is untouched.

The model is wrapped in ``DistributedDataParallel`` (:func:`wrap_model`): gradients are averaged
over the ranks during ``backward``, so clipping and the optimiser step see the synchronised
gradients. Batch-Dice statistics are summed over the ranks by the loss (:class:`Dist` is the
``sync`` of :mod:`segmenter.nn.losses`), so the loss equals the single-process loss on the
global batch.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from segmenter.errors import InputError

#: Seconds a collective may wait for the other ranks before the run fails (30 min: longer than
#: a validation, which the other ranks wait out; ``SEGMENTER_DIST_TIMEOUT_S`` overrides it).
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_VARIABLE = "SEGMENTER_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a data-parallel run.

    Attributes:
        rank: global rank (0 writes the run folder).
        world_size: number of processes (1: not distributed).
        local_rank: rank on this node (the GPU it uses).
        timeout_s: how long a collective waits for the others.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def chief(self) -> bool:
        """Whether this process writes files and decides stops (rank 0)."""
        return self.rank == 0

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks, in place (no gradient)."""
        if self.active:
            torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
        return values

    def sum_with_grad(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks, differentiable (backward sums the gradients)."""
        if not self.active:
            return values
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(values, op=torch_dist.ReduceOp.SUM)

    def mean(self, value: float, device: torch.device) -> float:
        """``value`` averaged over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        return float(self.sum_(t)[0]) / self.world_size

    def max_ints(self, values: Sequence[int], device: torch.device) -> list[int]:
        """Element-wise maximum over the ranks (a rank-0 decision: the others pass 0)."""
        if not self.active:
            return [int(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.int64, device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            torch_dist.barrier()

    def gather_to_chief(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the others."""
        if not self.active:
            return [value]
        out: list[Any] | None = [None] * self.world_size if self.chief else None
        torch_dist.gather_object(value, out, dst=0)
        return out


SINGLE = Dist()


def from_environment(env: Mapping[str, str]) -> Dist:
    """The :class:`Dist` that torchrun's variables in ``env`` describe (:data:`SINGLE` without).

    Raises:
        InputError: a malformed variable.
    """
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        timeout = float(env.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S))
    except ValueError as exc:
        raise InputError(f"bad torchrun environment variable: {exc}") from None
    if world < 1 or not 0 <= rank < world or timeout <= 0:
        raise InputError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return Dist(rank=rank, world_size=world, local_rank=local, timeout_s=timeout)


def per_rank_batch(batch_size: int, dist: Dist) -> int:
    """The share of ``data.batch_size`` (the global batch) one rank draws.

    Raises:
        InputError: the batch does not split evenly over the ranks.
    """
    if batch_size % dist.world_size:
        raise InputError(
            f"data.batch_size {batch_size} (the global batch) does not split over "
            f"{dist.world_size} ranks: use a multiple of {dist.world_size}"
        )
    return batch_size // dist.world_size


@contextlib.contextmanager
def process_group(dist: Dist, device: torch.device) -> Iterator[None]:
    """The default process group for the block: NCCL on CUDA, gloo on the CPU."""
    if not dist.active:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(dist.local_rank)
    torch_dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=dist.timeout_s),
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a lost peer can leave nothing to tear down
            torch_dist.destroy_process_group()


def device_for(device: torch.device, dist: Dist) -> torch.device:
    """The device this rank trains on: its own GPU (``LOCAL_RANK``) on CUDA."""
    if dist.active and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def wrap_model(model: torch.nn.Module, dist: Dist, *, unused_parameters: bool) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` (rank 0's weights broadcast), or itself.

    Args:
        model: the network, already on this rank's device.
        dist: the run.
        unused_parameters: some parameters get no gradient in a step (deep-supervision heads
            of weight 0), which DDP must be told.
    """
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused_parameters)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed: another rank died or timed out."""
    if isinstance(exc, torch_dist.DistError):
        return True
    text = str(exc)
    return any(k in text for k in ("Gloo", "gloo", "NCCL", "Connection closed", "timed out"))


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SINGLE",
    "TIMEOUT_VARIABLE",
    "Dist",
    "device_for",
    "from_environment",
    "is_peer_failure",
    "per_rank_batch",
    "process_group",
    "wrap_model",
]
