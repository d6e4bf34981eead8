"""Layer-by-layer calibration, without tracing the model.

Tracing (torch.fx) breaks on new architectures; hooks do not. The pipeline only assumes the model
is a stack of blocks in a ``ModuleList`` (decoder layers, encoder layers), which holds for
Llama, Qwen, Mistral, Gemma, Phi, BERT and most others::

    capture: run the model on every batch until the first block, keep its inputs (on CPU)
    for each block:
        modifiers attach hooks           (llmc_layer_start)
        calibration pass                 the samples through the block, hooks see the inputs
        modifiers compress the block     (llmc_layer_end)
        propagation pass                 the samples through the *compressed* block
                                         -> the next block's inputs, so later blocks see
                                            (and compensate) the errors made here
    modifiers finish                     (llmc_finalize)

The inputs of a block are kept per batch as the positional and keyword arguments the model
passed to it (hidden states, attention mask, rotary embeddings...), so any block signature works.
In the calibration passes (never the propagation passes) the unfused experts of an MoE block
(``llmc.moe``) run in calibration mode: every expert on each batch, on every token with
``calibrate_all_experts``; the tokens routed to each expert go into its modules' report rows.

When a run fails (a modifier or a forward raises, or the user interrupts it), the pipeline
removes every forward and backward hook (and pre-hook) that was added to the model's modules
during the run, whoever added it, so the caller's model has exactly the hooks it had before
and no calibration hook (a Hessian accumulator, a hook raising ``StopLayerForward``) outlives
the run; then the error propagates unchanged. ``llmc_finalize`` is *not* called after a failure:
it compresses the modules outside the blocks, which is work, and a second failure there would
hide the first. Blocks compressed before the failure keep their new weights, but hooks that
compression itself installs (W8A8's input quantizer) are removed with the rest, so the model is
neither the original nor a usable compressed one: reload it rather than save it. A successful
run leaves the hooks the modifiers keep on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import pluggy
import torch
from tqdm.auto import tqdm

from llmc import hookspecs
from llmc.context import RunContext
from llmc.distributed import map_tensors
from llmc.errors import CalibrationError, PluginError
from llmc.memory import MemoryPeak, return_freed_memory
from llmc.moe import experts_calibration, record_routed_tokens
from llmc.offload import LayerPlacement
from llmc.plugins import check_hooks, trace_hook_calls, validation_text
from llmc.targets import is_match
from llmc.torch_hooks import hook_ids, remove_hooks_added_since

__all__ = [
    "BlockInputs",
    "LayerwisePipeline",
    "StopLayerForward",
    "find_blocks",
    "make_lifecycle",
]

logger = logging.getLogger("llmc.pipeline")


def make_lifecycle(run_states: Sequence[object]) -> pluggy.PluginManager:
    """A plugin manager whose hooks call the modifiers' run states in recipe order.

    pluggy calls the most recently registered implementation first, so the run states are
    registered in reverse. Every hook a run state implements is checked against the hookspecs
    here, before any work: a misspelled hook (``llmc_layer_strat``), or one taking an argument
    the hookspec does not have, raises a one-line ``PluginError`` naming the run state's class,
    the hook and the closest valid hook name. ``LLMC_TRACE_PLUGINS=1`` logs every call.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    index_of: dict[int, int] = {}

    def describe(run_state: object) -> str:
        kind = type(run_state)
        index = index_of[id(run_state)]
        return f"run state {kind.__module__}.{kind.__qualname__} (modifier-{index})"

    for index in reversed(range(len(run_states))):
        run_state = run_states[index]
        if id(run_state) in index_of:
            raise PluginError(
                f"modifier-{index} and modifier-{index_of[id(run_state)]} returned the same run "
                "state object from start(); start() must return a new object on each call"
            )
        index_of[id(run_state)] = index
        try:
            manager.register(run_state, name=f"modifier-{index}")
        except pluggy.PluginValidationError as error:
            raise PluginError(
                f"{describe(run_state)} has an invalid hook: {validation_text(error)}",
                plugin=f"modifier-{index}",
            ) from None
    check_hooks(manager, describe)
    trace_hook_calls(manager, "lifecycle")
    return manager


def find_blocks(
    model: torch.nn.Module, sequential_targets: Sequence[str] | None = None
) -> list[tuple[str, torch.nn.Module]]:
    """The blocks to calibrate one at a time, with their full names, in execution order.

    Without ``sequential_targets``: the ``ModuleList`` of same-class modules holding the most
    parameters (a decoder's ``model.layers``, BERT's ``encoder.layer``).
    """
    if sequential_targets:
        blocks = [
            (name, module)
            for name, module in model.named_modules()
            if name and is_match(name, module, sequential_targets)
        ]
        # Keep the outermost matches only: a block must not be nested in another.
        outer = [
            (name, module)
            for name, module in blocks
            if not any(name.startswith(f"{other}.") for other, _ in blocks if other != name)
        ]
        if not outer:
            raise CalibrationError(
                f"sequential_targets {list(sequential_targets)} match no module of "
                f"{type(model).__name__}"
            )
        return outer
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise CalibrationError(
            f"found no ModuleList of blocks in {type(model).__name__}; pass "
            "sequential_targets=[<class name of its layers>]"
        )
    _, list_name, blocks_list = best
    return [(f"{list_name}.{index}", block) for index, block in enumerate(blocks_list)]


def _to(value: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples, lists, dicts (and attrs classes)."""
    return map_tensors(value, lambda tensor: tensor.to(device, non_blocking=True))


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


class StopLayerForward(Exception):
    """Raise from a hook during a calibration pass to skip the rest of that batch's forward."""


@attrs.define
class BlockInputs:
    """What one batch passes to a block: its arguments (hidden states first) and mask."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    attention_mask: torch.Tensor | None

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden_states: torch.Tensor) -> BlockInputs:
        if self.args:
            return attrs.evolve(self, args=(hidden_states, *self.args[1:]))
        return attrs.evolve(self, kwargs={**self.kwargs, "hidden_states": hidden_states})


def _progress_text(layer: dict[str, Any]) -> str:
    text = f"{layer['layer']} {layer['seconds']:.1f}s {layer['peak_rss_mb'] / 1024:.2f}GB"
    if "peak_device_mb" in layer:
        text += f" gpu {layer['peak_device_mb'] / 1024:.2f}GB"
    return text


def _first_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise CalibrationError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


@attrs.define
class LayerwisePipeline:
    """Runs the calibration data through the model one block at a time (see module docstring).

    ``storage_device`` holds the block inputs between blocks (CPU by default, so activations
    for many samples never sit on the accelerator). ``calibrate_all_experts``: in calibration
    passes the unfused experts of an MoE block (``llmc.moe``) compute on every token, so each
    expert is calibrated on all of them; the block's output still uses only the routed experts.
    ``placement`` moves each block onto the device and off it (``llmc.offload``); a streamed
    run's placement may also resume at a later block. ``layer_stats`` gets one entry per block:
    its seconds, those of its end (``solve_seconds``: the modifiers' solves and rounding, and
    under torchrun their reductions and broadcasts) and its peak host (and device) memory.
    """

    model: torch.nn.Module
    context: RunContext
    lifecycle: pluggy.PluginManager
    sequential_targets: Sequence[str] | None = None
    storage_device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    show_progress: bool = True
    calibrate_all_experts: bool = True
    placement: LayerPlacement = attrs.field(factory=LayerPlacement)
    timings: dict[str, float] = attrs.field(factory=dict)
    layer_stats: list[dict[str, Any]] = attrs.field(factory=list)

    def run(self, batches: Sequence[dict[str, torch.Tensor]] | None) -> None:
        """Calibrate and compress every block; after a failure, see the module docstring."""
        blocks = find_blocks(self.model, self.sequential_targets)
        hooks_before = hook_ids(self.model)
        try:
            self._run(blocks, batches)
        except BaseException:
            self.context.forward_layer = None
            removed = remove_hooks_added_since(self.model, hooks_before)
            if removed:
                logger.info("run failed: removed %d hooks added to the model during it", removed)
            raise

    def _run(
        self,
        blocks: list[tuple[str, torch.nn.Module]],
        batches: Sequence[dict[str, torch.Tensor]] | None,
    ) -> None:
        self.context.layer_names = [name for name, _ in blocks]
        hook = self.lifecycle.hook
        placement = self.placement
        placement.prepare(self.model, blocks)
        start, inputs, rows, stats = placement.resume_point()
        hook.llmc_initialize(context=self.context)
        if start:
            self.context.report.extend(rows)
            self.layer_stats.extend(stats)
        elif batches:
            inputs = self._capture(blocks[0][1], batches)
        memory = MemoryPeak(self._device())
        progress = tqdm(
            blocks[start:], desc="calibrating", unit="layer", disable=not self.show_progress,
            initial=start, total=len(blocks),
        )
        with progress:
            for index, (name, block) in enumerate(progress, start=start):
                started = time.perf_counter()
                memory.start()
                placement.onload(name, block)
                self.context.forward_layer = self._calibration_pass(name, block, inputs)
                wants_data = any(hook.llmc_layer_start(context=self.context, layer_name=name, layer=block))
                if wants_data:
                    self.context.forward_layer()
                first_row = len(self.context.report)
                ending = time.perf_counter()
                hook.llmc_layer_end(context=self.context, layer_name=name, layer=block)
                solve_seconds = time.perf_counter() - ending
                record_routed_tokens(self.context.report[first_row:], name, block)
                self.context.forward_layer = None
                if inputs is not None and name != blocks[-1][0]:
                    with self._compute_precision():
                        inputs = [
                            placement.keep(batch.with_hidden_states(output.to(self.storage_device)))
                            for batch, output in zip(inputs, self._forward(block, inputs))
                        ]
                else:
                    inputs = None
                self.timings[name] = time.perf_counter() - started
                layer = {
                    "layer": name, "seconds": round(self.timings[name], 3),
                    "solve_seconds": round(solve_seconds, 3), **memory.stop(),
                }
                placement.done(index, name, block, inputs, self.context.report[first_row:], layer)
                return_freed_memory()  # the layer's temporaries (llmc.memory explains why)
                self.layer_stats.append(layer)
                progress.set_postfix_str(_progress_text(layer))
                logger.debug("%s done in %.2f s", name, self.timings[name])
        hook.llmc_finalize(context=self.context)
        placement.finish(self.model)

    def _calibration_pass(
        self, name: str, block: torch.nn.Module, inputs: list[BlockInputs] | None
    ) -> Callable[[], None]:
        def run_pass() -> None:
            if inputs is None:
                raise CalibrationError(
                    f"a modifier needs calibration data at {name} but no dataset was given; "
                    "pass dataset=... (for example 'llmc:stdlib-docs')",
                    module=name,
                )
            with self._compute_precision(), experts_calibration(
                block, all_experts=self.calibrate_all_experts,
                attention_mask=lambda: self.context.attention_mask,
            ):
                for _ in self._forward(block, inputs, stoppable=True):
                    pass

        return run_pass

    @contextlib.contextmanager
    def _compute_precision(self) -> Iterator[None]:
        """Autocast a whole pass to ``context.compute_dtype`` (weights are cast once per pass).

        Held for one pass, never across a modifier's change of the weights: autocast caches the
        cast weights until its outermost context exits, so the cache is also cleared on exit in
        case the caller runs inside an autocast context of its own.
        """
        dtype = self.context.compute_dtype
        if dtype is None:
            yield
            return
        try:
            with torch.autocast(device_type=self._device().type, dtype=dtype):
                yield
        finally:
            torch.clear_autocast_cache()

    def _device(self) -> torch.device:
        return self.context.device

    @torch.no_grad()
    def _capture(
        self, first_block: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]
    ) -> list[BlockInputs]:
        """The first block's inputs for every batch, from forwards cut short at that block."""
        captured: list[BlockInputs] = []
        current_mask: list[torch.Tensor | None] = [None]

        def grab(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append(
                self.placement.keep(
                    BlockInputs(
                        args=_to(args, self.storage_device),
                        kwargs=_to(kwargs, self.storage_device),
                        attention_mask=current_mask[0],
                    )
                )
            )
            raise _StopForward

        handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
        device = self._device()
        try:
            for batch in tqdm(batches, desc="capturing inputs", unit="batch", disable=not self.show_progress):
                current_mask[0] = batch.get("attention_mask")
                try:
                    self.model(**_to(batch, device), use_cache=False)
                except _StopForward:
                    continue
                raise CalibrationError(
                    "the model finished a forward pass without calling its first block; "
                    "check sequential_targets"
                )
        finally:
            handle.remove()
        return captured

    @torch.no_grad()
    def _forward(
        self, block: torch.nn.Module, inputs: list[BlockInputs], stoppable: bool = False
    ) -> Iterator[torch.Tensor | None]:
        device = self._device()
        try:
            for batch in inputs:
                mask = batch.attention_mask
                self.context.attention_mask = None if mask is None else mask.to(device)
                try:
                    output = block(*_to(batch.args, device), **_to(batch.kwargs, device))
                except StopLayerForward:
                    if not stoppable:
                        raise
                    yield None
                    continue
                yield _first_output(output)
        finally:
            self.context.attention_mask = None
