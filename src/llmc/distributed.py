"""Several processes on torch.distributed: one rank per GPU (NCCL) or per CPU process (gloo).

Launched as users launch any torch job, ``torchrun --nproc-per-node N -m llmc oneshot ...`` (or
a script calling ``oneshot`` under torchrun): ``process_group`` initialises the default group
from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``) unless
the caller already did, and destroys it only when it created it. What differs from one process:

* **data**: each rank calibrates on its own contiguous share of the samples (``shard_bounds``),
  propagates its own activations and keeps them;
* **statistics**: every statistic of ``llmc.statistics`` is reduced here, in one place
  (``reduce_statistics``): tensors that add up across shards are summed in float64 (so a
  Hessian differs from one process's only by the fp32 rounding of each rank's partial sums),
  everything else is gathered and merged in rank order with the statistic's own ``merge``;
* **solves**: a layer's input groups are spread over the ranks by cost (``owners``: the
  largest first, each to the least loaded rank), each rank solves its own (groups a modifier
  can solve as one, MoE experts of one shape, in batches), and the results are broadcast so
  every rank applies every result (``solve_groups``);
* **output**: only rank 0 writes the checkpoint and the report (``is_writer``); the others
  wait for it at the end, so the checkpoint exists when ``oneshot`` returns on any rank.

A rank that dies makes the next collective of the others fail (gloo and NCCL see the closed
connection) or time out after ``LLMC_DISTRIBUTED_TIMEOUT`` seconds (default 1800); that error
is raised as a one-line ``DistributedError`` naming the rank and what it was doing, and
torchrun then stops the remaining ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import attrs
import torch
import torch.distributed as dist

from llmc.errors import DataError, DistributedError

__all__ = [
    "BATCH_COST",
    "barrier",
    "broadcast_object",
    "check_same_everywhere",
    "gather_objects",
    "is_writer",
    "local_ranks",
    "map_tensors",
    "owners",
    "process_group",
    "rank",
    "rank_device",
    "rank_share",
    "reduce_statistics",
    "shard_bounds",
    "solve_groups",
    "sum_counts",
    "sum_in_float64_",
    "world_size",
]

logger = logging.getLogger("llmc.distributed")

T = TypeVar("T")
# float64 pieces of at most this many elements: a 14336-wide Hessian is reduced without a
# second full-size copy of it
_REDUCE_PIECE = 1 << 22

# A batch of solves holds every member's factorisation at once: at most this summed cost
# (``llmc.statistics.group_cost``: columns³ + rows · columns², as ``owners`` weighs them; 64
# experts of 256 × 1024 fit), so only small solves, whose time is overhead, are batched, and a
# batch's memory stays bounded.
BATCH_COST = float(1 << 38)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """Whether this process writes files (the checkpoint, the report, a journal): rank 0 (read
    from torchrun's environment before the process group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def local_ranks() -> int:
    """How many ranks of the job run on this machine (each holds its own copy of the model)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _timeout() -> datetime.timedelta:
    text = os.environ.get("LLMC_DISTRIBUTED_TIMEOUT", "1800")
    try:
        seconds = float(text)
    except ValueError:
        raise DistributedError(
            f"LLMC_DISTRIBUTED_TIMEOUT must be a number of seconds (got {text!r})"
        ) from None
    return datetime.timedelta(seconds=seconds)


def rank_device(requested: torch.device | None) -> torch.device | None:
    """This rank's GPU when the run calibrates on CUDA: ``cuda:LOCAL_RANK`` for a bare 'cuda'."""
    if requested is None or requested.type != "cuda" or requested.index is not None or world_size() == 1:
        return requested
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _share_cores() -> None:
    """Let numba's kernels (the CPU sweeps of GPTQ and SparseGPT) use as many threads as torch.

    torchrun gives each rank ``OMP_NUM_THREADS`` threads (1 unless set), which torch follows;
    numba would still start one thread per core in every rank, and N ranks on a machine would
    then run N times more threads than it has cores.
    """
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@contextlib.contextmanager
def process_group(device: torch.device | None) -> Iterator[None]:
    """Join torchrun's process group for the run (see module docstring); nothing for one process.

    The backend is NCCL when this rank calibrates on a GPU, gloo otherwise.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:
        _share_cores()
    if not launched or not dist.is_available() or dist.is_initialized():
        yield
        return
    cuda = device is not None and device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=_timeout())
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"cannot join the torchrun process group ({backend}): {_first_line(error)}") from error
    logger.info("rank %d of %d (%s)", rank(), world_size(), backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective into one line that says which rank and what it was doing."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as error:
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} with the other ranks failed "
            f"({_first_line(error)}); another rank probably stopped, see its log"
        ) from error


def barrier(what: str) -> None:
    if world_size() > 1:
        with _collective(what):
            dist.barrier()


def shard_bounds(count: int, rank_index: int, ranks: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank_index``'s contiguous share of ``count`` samples.

    Shares differ by at most one sample and the first ``count % ranks`` ranks take the larger
    ones, so the shares of all ranks cover every sample exactly once, in order.
    """
    if ranks < 1 or not 0 <= rank_index < ranks:
        raise ValueError(f"rank {rank_index} of {ranks}")
    base, extra = divmod(count, ranks)
    start = rank_index * base + min(rank_index, extra)
    return start, start + base + (1 if rank_index < extra else 0)


def rank_share(samples: Sequence[T]) -> Sequence[T]:
    """This rank's share of the calibration samples (``shard_bounds``); all of them alone."""
    ranks = world_size()
    if ranks == 1:
        return samples
    if len(samples) < ranks:
        raise DataError(
            f"{len(samples)} calibration samples cannot be shared by {ranks} ranks; use at least "
            f"{ranks} (num_calibration_samples) or fewer ranks"
        )
    start, stop = shard_bounds(len(samples), rank(), ranks)
    return samples[start:stop]


def _on_device(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda tensor: tensor.to(device)


def map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``function`` applied to every tensor in it (attrs classes, dicts, lists)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, list):
        return [map_tensors(item, function) for item in value]
    if isinstance(value, tuple):
        return tuple(map_tensors(item, function) for item in value)
    if attrs.has(type(value)):
        changes = {
            field.alias: map_tensors(getattr(value, field.name), function)
            for field in attrs.fields(type(value))
            if field.init
        }
        return attrs.evolve(value, **changes)
    return value


def broadcast_object(value: T | None, source: int, device: torch.device, what: str) -> T:
    """``value`` of rank ``source`` on every rank, its tensors on ``device`` (sent via CPU)."""
    if world_size() == 1:
        return value  # type: ignore[return-value]
    payload = [map_tensors(value, torch.Tensor.cpu) if rank() == source else None]
    with _collective(what):
        dist.broadcast_object_list(payload, src=source)
    if rank() == source:
        return value  # type: ignore[return-value]
    return map_tensors(payload[0], _on_device(device))


def gather_objects(value: T, what: str) -> list[T]:
    """Every rank's ``value`` (picklable, tensors on the CPU), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    everyone: list[Any] = [None] * world_size()
    with _collective(what):
        dist.all_gather_object(everyone, value)
    return everyone


def check_same_everywhere(value: Any, what: str) -> None:
    """Refuse to go on when ranks disagree on ``value`` (something each found on its own)."""
    if world_size() == 1:
        return
    everyone = gather_objects(value, f"comparing {what}")
    for other_rank, other in enumerate(everyone):
        if other != everyone[0]:
            raise DistributedError(
                f"ranks 0 and {other_rank} disagree on {what} ({str(everyone[0])[:80]} against "
                f"{str(other)[:80]}); every rank must run the same model and recipe"
            )


def sum_counts(counts: torch.Tensor, what: str) -> torch.Tensor:
    """Integer counts (tokens per expert, tokens per statistic) summed over the ranks."""
    if world_size() == 1:
        return counts
    total = counts.to(torch.int64).cpu()
    with _collective(what):
        dist.all_reduce(total)
    return total.to(counts.device)


def sum_in_float64_(tensor: torch.Tensor, what: str) -> None:
    """Sum ``tensor`` over the ranks in place, piece by piece in float64."""
    if world_size() == 1:
        return
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), _REDUCE_PIECE):
        piece = flat[start:start + _REDUCE_PIECE]
        wide = piece.to(torch.float64)
        if dist.get_backend() == "gloo" and wide.device.type != "cpu":
            wide = wide.cpu()
        with _collective(what):
            dist.all_reduce(wide)
        piece.copy_(wide)


def reduce_statistics(
    statistics: Sequence[Any], make: Sequence[Callable[[], Any]], device: torch.device, what: str
) -> list[Any]:
    """The statistics of all ranks' data, each from this rank's part (see module docstring).

    ``statistics[i]`` is this rank's part of statistic ``i`` (None when this rank gathered
    none: ``make[i]()`` creates an empty one); every rank passes the same list in the same
    order. A statistic whose ``shard_sums()`` gives its tensors that add up across shards is
    summed; any other is merged, rank by rank, with its ``merge``. The token counts are summed
    first, so a statistic no rank saw a token of is returned as None without more traffic.
    """
    if world_size() == 1:
        return list(statistics)
    parts = [statistic if statistic is not None else build() for statistic, build in zip(statistics, make)]
    tokens = sum_counts(torch.tensor([part.tokens for part in parts], dtype=torch.int64), what)
    reduced: list[Any] = []
    merged_later: list[int] = []
    for index, part in enumerate(parts):
        if not int(tokens[index]):
            reduced.append(None)
            continue
        sums = part.shard_sums() if hasattr(part, "shard_sums") else None
        if sums is None:
            reduced.append(part)
            merged_later.append(index)
            continue
        for tensor in sums:
            sum_in_float64_(tensor, what)
        part.tokens = int(tokens[index])
        reduced.append(part)
    if merged_later:
        mine = [map_tensors(parts[index], torch.Tensor.cpu) for index in merged_later]
        everyone = gather_objects(mine, what)
        for position, index in enumerate(merged_later):
            merged = map_tensors(everyone[0][position], _on_device(device))
            for other in everyone[1:]:
                merged.merge(map_tensors(other[position], _on_device(device)))
            reduced[index] = merged
    return reduced


def owners(costs: Sequence[float], ranks: int) -> list[int]:
    """The rank that solves each item: largest cost first, each to the least loaded rank
    (ties to the lower rank, then the lower index), so every rank computes the same plan."""
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        chosen = min(range(ranks), key=lambda r: (load[r], r))
        owner[index] = chosen
        load[chosen] += costs[index]
    return owner


def solve_groups(
    groups: Sequence[T],
    costs: Sequence[float],
    compute: Callable[[T], Any],
    apply: Callable[[T, Any], None],
    device: torch.device,
    what: str,
    *,
    batch_key: Callable[[T], Hashable | None] | None = None,
    compute_batch: Callable[[list[T]], list[Any]] | None = None,
) -> None:
    """``apply(group, compute(group))`` for every group, the computes spread over the ranks.

    One process: compute and apply one group after the other. Several: each rank computes the
    groups ``owners`` gives it, then every group's result goes from its owner to all ranks, in
    the groups' order, and every rank applies it.

    Batches: with ``batch_key`` and ``compute_batch``, a rank's own groups of one key (not None:
    groups the modifier can solve as one, such as MoE experts of one shape) are computed by one
    ``compute_batch(groups) -> results`` call, when the first of them is due, in batches of at
    most ``BATCH_COST`` summed cost (one group always fits); the results are applied in the
    groups' order as before. The plan does not depend on batching, only how a rank computes.
    """
    if (batch_key is None) != (compute_batch is None):
        raise ValueError("give batch_key and compute_batch together")
    plan = owners(costs, world_size()) if world_size() > 1 else [0] * len(groups)
    mine = [index for index in range(len(groups)) if plan[index] == rank()]
    batch_of = _batches(mine, groups, costs, batch_key)
    results: dict[int, Any] = {}
    for index, group in enumerate(groups):
        if plan[index] == rank() and index not in results:
            members = batch_of[index]
            if len(members) == 1:
                results[index] = compute(group)
            else:
                assert compute_batch is not None
                logger.debug("%s: groups %s in one batch", what, members)
                computed = compute_batch([groups[member] for member in members])
                results.update(zip(members, computed, strict=True))
        result = results.pop(index, None)
        if world_size() > 1:
            result = broadcast_object(result, plan[index], device, f"{what}: results of group {index}")
        apply(group, result)


def _batches(
    indices: Sequence[int],
    groups: Sequence[T],
    costs: Sequence[float],
    batch_key: Callable[[T], Hashable | None] | None,
) -> dict[int, list[int]]:
    """Each of ``indices`` with the members of its batch (itself alone when not batched)."""
    batch_of: dict[int, list[int]] = {}
    open_batches: dict[Hashable, tuple[list[int], float]] = {}
    for index in indices:
        key = batch_key(groups[index]) if batch_key is not None else None
        if key is None:
            batch_of[index] = [index]
            continue
        members, cost = open_batches.get(key, ([], 0.0))
        if members and cost + costs[index] > BATCH_COST:
            members, cost = [], 0.0
        members.append(index)
        open_batches[key] = (members, cost + costs[index])
        batch_of[index] = members
    return batch_of
