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
* **solves**: a layer's input groups are spread over the ranks by cost (``plan_solves``: the
  largest first, each to the least loaded rank; a group larger than a rank's fair share is
  factored by one rank and its rows swept by several, ``RowSplit``), each rank solves its own
  (groups a modifier can solve as one, MoE experts of one shape, in batches), and the results
  are broadcast so every rank applies every result (``solve_groups``);
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
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
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
    "row_bounds",
    "RowSplit",
    "SolvePlan",
    "plan_solves",
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


def map_tensors(value: Any, function: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``function`` applied to every tensor in it (attrs classes, dicts, lists)."""
    return _map_leaves(value, lambda leaf: isinstance(leaf, torch.Tensor), function)


def _map_leaves(value: Any, is_leaf: Callable[[Any], bool], function: Callable[[Any], Any]) -> Any:
    if is_leaf(value):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_leaves(item, is_leaf, function) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_leaves(item, is_leaf, function) for item in value]
    if isinstance(value, tuple):
        return tuple(_map_leaves(item, is_leaf, function) for item in value)
    if attrs.has(type(value)):
        changes = {
            field.alias: _map_leaves(getattr(value, field.name), is_leaf, function)
            for field in attrs.fields(type(value))
            if field.init
        }
        return attrs.evolve(value, **changes)
    return value


@attrs.frozen
class _Slot:
    """A tensor of a broadcast value, sent after the value's skeleton as raw bytes."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a flat uint8 view of its storage (no copy)."""
    return tensor.reshape(-1).view(torch.uint8)


def broadcast_object(value: T | None, source: int, device: torch.device, what: str) -> T:
    """``value`` of rank ``source`` on every rank, its tensors on ``device``.

    The value goes as a pickled skeleton whose tensors are placeholders, then each tensor's
    bytes straight from the source's storage into the receiver's (on the GPU under NCCL):
    pickling the tensors of results (a weight of 5632 columns, a factor of its Hessian) costs
    copies and time that the raw transfer does not.
    """
    if world_size() == 1:
        return value  # type: ignore[return-value]
    carrier = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensors: list[torch.Tensor] = []

    def placeholder(tensor: torch.Tensor) -> _Slot:
        tensors.append(tensor.detach().to(carrier).contiguous())
        return _Slot(tuple(tensor.shape), tensor.dtype)

    header: list[Any] = [None]
    if rank() == source:
        header = [map_tensors(value, placeholder)]
    with _collective(what):
        dist.broadcast_object_list(header, src=source)
        if rank() == source:
            for tensor in tensors:
                if tensor.numel():
                    dist.broadcast(_raw(tensor), src=source)
            return value  # type: ignore[return-value]

        def received(slot: _Slot) -> torch.Tensor:
            tensor = torch.empty(slot.shape, dtype=slot.dtype, device=carrier)
            if tensor.numel():
                dist.broadcast(_raw(tensor), src=source)
            return tensor.to(device)

        return _map_leaves(header[0], lambda leaf: isinstance(leaf, _Slot), received)


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
    """Sum ``tensor`` (any view, such as the block rows of a Hessian) over the ranks in place.

    The sum is taken in float64, piece by piece, and rounded back to the tensor's dtype. Two
    ranks' float32 tensors are summed as they are: the float32 sum of two float32 numbers is
    the float64 sum rounded to float32, bit for bit (float64 has more than twice float32's
    precision, so rounding twice gives the rounding once), for half the bytes sent.
    """
    if world_size() == 1:
        return
    as_is = tensor.dtype == torch.float64 or (tensor.dtype == torch.float32 and world_size() == 2)
    whole = tensor.view(-1) if tensor.is_contiguous() else tensor
    step = _REDUCE_PIECE if whole.dim() == 1 else max(1, _REDUCE_PIECE // max(1, whole[0].numel()))
    for start in range(0, whole.shape[0], step):
        piece = whole[start:start + step]
        sent = piece.contiguous() if as_is else piece.to(torch.float64)
        if dist.get_backend() == "gloo" and sent.device.type != "cpu":
            sent = sent.cpu()
        with _collective(what):
            dist.all_reduce(sent)
        if sent is not piece:
            piece.copy_(sent)


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
    return _assign(costs, [0.0] * ranks, range(len(costs)), [0] * len(costs))


def _assign(costs: Sequence[float], load: list[float], indices: Iterable[int], owner: list[int]) -> list[int]:
    """``owner`` with each of ``indices`` given to the least loaded rank, largest cost first."""
    for index in sorted(indices, key=lambda i: (-costs[i], i)):
        chosen = min(range(len(load)), key=lambda r: (load[r], r))
        owner[index] = chosen
        load[chosen] += costs[index]
    return owner


@attrs.frozen
class RowSplit:
    """How a modifier lets several ranks share the solve of one group (``solve_groups``).

    A group whose solve alone outweighs a rank's fair share of the layer would keep the other
    ranks waiting (the down projection of a Llama layer: its Hessian is the widest). Its work
    splits in two: ``prepare(group)``, done once by one rank (GPTQ's factorisation of the
    Hessian; the result must pickle), then the rows of its modules, which are solved
    independently of each other from that result: ``compute_rows(group, prepared, start,
    stop)`` solves the rows between the fractions ``start`` and ``stop`` of each module's rows
    (``row_bounds``), and ``join(group, prepared, parts)`` makes of the parts, in row order,
    what ``GroupSolver.compute`` returns. ``can_split(group)`` says whether the group's rows
    are independent (a per-tensor scale or a mask chosen over a whole block of rows is not).
    """

    prepare: Callable[[Any], Any]
    compute_rows: Callable[[Any, Any, float, float], Any]
    join: Callable[[Any, Any, list[Any]], Any]
    can_split: Callable[[Any], bool]


def row_bounds(rows: int, start: float, stop: float, step: int = 1) -> tuple[int, int]:
    """``[first, last)`` of the rows between the fractions ``start`` and ``stop`` of ``rows``,
    at multiples of ``step``: shares that tile ``[0, 1]`` tile the rows exactly once."""
    blocks = -(-rows // step)

    def at(fraction: float) -> int:
        return min(rows, round(fraction * blocks) * step)

    return at(start), at(stop)


@attrs.frozen
class SolvePlan:
    """Which rank computes what: ``owner[i]`` solves group ``i`` whole, or, for a group in
    ``shares``, prepares it; ``shares[i][r]`` is the ``(start, stop)`` fraction of the rows
    rank ``r`` then solves (``start == stop``: none)."""

    owner: list[int]
    shares: dict[int, list[tuple[float, float]]]


def plan_solves(
    costs: Sequence[float],
    ranks: int,
    *,
    prepare_costs: Sequence[float] | None = None,
    splittable: Sequence[bool] | None = None,
) -> SolvePlan:
    """Share out a layer's solves (``costs``, each with the part ``prepare_costs`` that one rank
    must do before its rows can be shared out), so that the last rank finishes early.

    A splittable group that costs more than a rank's fair share (total / ranks) is split
    (``RowSplit``): its preparation goes first, to the least loaded rank; then every other
    group, whole, largest first, to the least loaded rank (``owners``); then its rows are
    shared out so that all ranks finish together: a rank's rows start when both its own work
    and the preparation are done, and the rows fill the ranks that are free first.
    """
    count = len(costs)
    split = [
        index for index in range(count)
        if ranks > 1 and splittable is not None and splittable[index] and prepare_costs is not None
        and costs[index] > sum(costs) / ranks
    ]
    if not split:
        return SolvePlan(owners(costs, ranks), {})
    assert prepare_costs is not None
    load = [0.0] * ranks
    owner = _assign(prepare_costs, load, split, [0] * count)
    ready = {index: load[owner[index]] for index in split}  # preparations come first, in order
    _assign(costs, load, [index for index in range(count) if index not in ready], owner)
    shares: dict[int, list[tuple[float, float]]] = {}
    for index in sorted(split, key=lambda i: (ready[i], i)):
        rows_cost = costs[index] - prepare_costs[index]
        starts = [max(load[r], ready[index]) for r in range(ranks)]
        if rows_cost > 0:
            work = _water_fill(starts, rows_cost)
        else:  # nothing left to share: the preparing rank solves the rows too
            work = [1.0 if r == owner[index] else 0.0 for r in range(ranks)]
        total = sum(work)
        taking = [r for r in range(ranks) if work[r] > 1e-9 * total]
        fractions, begin = [], 0.0
        for r in range(ranks):
            end = begin if r not in taking else 1.0 if r == taking[-1] else begin + work[r] / total
            fractions.append((begin, end))
            begin = end
            if r in taking:
                load[r] = starts[r] + max(rows_cost, 0.0) * (work[r] / total)
        shares[index] = fractions
    return SolvePlan(owner, shares)


def _water_fill(starts: Sequence[float], amount: float) -> list[float]:
    """How much of ``amount`` each rank takes so that all that take some finish together (at
    the lowest level ``L`` with ``Σ max(0, L − start) = amount``)."""
    order = sorted(range(len(starts)), key=lambda r: (starts[r], r))
    level = starts[order[0]]
    remaining, filling = amount, 1
    while True:
        next_start = starts[order[filling]] if filling < len(order) else float("inf")
        if remaining <= (next_start - level) * filling:
            level += remaining / filling
            break
        remaining -= (next_start - level) * filling
        level = next_start
        filling += 1
    return [max(0.0, level - start) for start in starts]


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
    split: RowSplit | None = None,
    prepare_costs: Sequence[float] | None = None,
) -> None:
    """``apply(group, compute(group))`` for every group, the computes spread over the ranks.

    One process: compute and apply one group after the other. Several (``plan_solves``):

    1. each rank computes what needs nothing from the others: the preparations of the split
       groups it owns, then its own whole groups;
    2. each split group's preparation goes from its owner to every rank, and every rank solves
       its share of the group's rows;
    3. in the groups' order, every group's result goes from its owner to all ranks (a split
       group's parts from each rank, joined); then every rank applies them, in that order.

    So no rank waits on another before it has done all the work it can. Batches: with
    ``batch_key`` and ``compute_batch``, a rank's own groups of one key (not None: groups the
    modifier can solve as one, such as MoE experts of one shape) are computed by one
    ``compute_batch(groups) -> results`` call, in batches of at most ``BATCH_COST`` summed cost
    (one group always fits). The plan does not depend on batching, only how a rank computes.
    ``split`` and ``prepare_costs`` let ranks share the rows of a group (``RowSplit``).
    """
    if (batch_key is None) != (compute_batch is None):
        raise ValueError("give batch_key and compute_batch together")
    if world_size() == 1:
        result_of = _own_results(range(len(groups)), groups, costs, compute, batch_key, compute_batch, what)
        for index, group in enumerate(groups):
            apply(group, result_of(index))
        return
    me = rank()
    started = time.perf_counter()
    plan = plan_solves(
        costs, world_size(), prepare_costs=prepare_costs,
        splittable=[split.can_split(group) for group in groups] if split is not None else None,
    )
    prepared = {index: split.prepare(groups[index]) for index in plan.shares if plan.owner[index] == me}  # type: ignore[union-attr]
    mine = [index for index in range(len(groups)) if plan.owner[index] == me and index not in plan.shares]
    result_of = _own_results(mine, groups, costs, compute, batch_key, compute_batch, what)
    results = {index: result_of(index) for index in mine}
    own_done = time.perf_counter()
    parts: dict[int, Any] = {}
    for index in sorted(plan.shares):
        prepared[index] = broadcast_object(prepared.get(index), plan.owner[index], device, f"{what}: preparing group {index}")
        start, stop = plan.shares[index][me]
        if stop > start:
            parts[index] = split.compute_rows(groups[index], prepared[index], start, stop)  # type: ignore[union-attr]
    rows_done = time.perf_counter()
    everyone: dict[int, Any] = {}  # every result, sent before any is applied: no rank waits on another's apply
    for index, group in enumerate(groups):
        if index in plan.shares:
            own_part = parts.pop(index, None)
            pieces = [
                broadcast_object(own_part if source == me else None, source, device, f"{what}: rows of group {index}")
                for source, (start, stop) in enumerate(plan.shares[index]) if stop > start
            ]
            everyone[index] = split.join(group, prepared.pop(index), pieces)  # type: ignore[union-attr]
        else:
            everyone[index] = broadcast_object(
                results.pop(index, None), plan.owner[index], device, f"{what}: results of group {index}"
            )
    for index, group in enumerate(groups):
        apply(group, everyone.pop(index))
    logger.debug(
        "%s: rank %d: own solves %.2f s, shared rows %.2f s, results sent and applied %.2f s",
        what, me, own_done - started, rows_done - own_done, time.perf_counter() - rows_done,
    )


def _own_results(
    indices: Sequence[int],
    groups: Sequence[T],
    costs: Sequence[float],
    compute: Callable[[T], Any],
    batch_key: Callable[[T], Hashable | None] | None,
    compute_batch: Callable[[list[T]], list[Any]] | None,
    what: str,
) -> Callable[[int], Any]:
    """``result_of(index)`` for each of ``indices`` (this rank's groups), in their order: the
    group's result, computed when first asked for together with the rest of its batch."""
    batch_of = _batches(indices, groups, costs, batch_key)
    results: dict[int, Any] = {}

    def result_of(index: int) -> Any:
        if index not in results:
            members = batch_of[index]
            if len(members) == 1:
                results[index] = compute(groups[index])
            else:
                assert compute_batch is not None
                logger.debug("%s: groups %s in one batch", what, members)
                results.update(zip(members, compute_batch([groups[member] for member in members]), strict=True))
        return results.pop(index)

    return result_of


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
