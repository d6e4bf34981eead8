"""The llmc plugin API: every hook a plugin or a modifier may implement.

This module is the whole contract between core and plugins, and its docstrings are its
documentation (``docs/plugins.md`` is generated from them). There are two kinds of hooks:

* **Registration hooks** (``llmc_register_*``) are implemented by a plugin *module*, the object
  named by an entry point in group ``llmc``. They are called once when the plugin manager is built
  and tell core what the plugin offers. The entry-point name (``gptq``, ``sparsity``, a third
  party's name) is the plugin's name in recipes (``gptq.GPTQModifier``) and in error messages.

* **Lifecycle hooks** (``llmc_initialize`` ... ``llmc_finalize``) are implemented by the *run state*
  object a modifier returns from ``Modifier.start(context)``. One such object exists per modifier
  per run; core calls them in recipe order while it calibrates the model layer by layer.

Implement a hook with the ``hookimpl`` marker exported here (or ``pluggy.HookimplMarker("llmc")``)::

    from llmc import hookimpl

    @hookimpl
    def llmc_register_modifiers():
        return [MyPruningModifier]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from llmc.context import RunContext
    from llmc.modifier import Modifier

__all__ = [
    "LIFECYCLE_HOOKS",
    "REGISTRATION_HOOKS",
    "hookimpl",
    "hookspec",
]

PROJECT = "llmc"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Registration hooks: implemented by plugin modules ------------------------------------


@hookspec
def llmc_register_modifiers() -> list[type[Modifier]]:
    """Return the modifier classes this plugin provides.

    Called once per plugin when the plugin manager is built. Each class is a subclass of
    ``llmc.Modifier`` (a frozen attrs class whose fields are its recipe parameters) and carries
    its recipe name in the ``modifier_name`` class attribute (default: the class name). A plugin
    returning the same name twice is refused. Two plugins may offer the same name; recipes then
    have to say which one they mean (``gptq.GPTQModifier``).
    """


@hookspec
def llmc_register_recipes() -> dict[str, Path]:
    """Return recipes this plugin ships, as ``{short name: path of a YAML file}``.

    Users load them by ``llmc:<short name>`` (``recipe="llmc:w4a16"``), with no path. A name that
    two plugins register is refused with both owners named.
    """


# --- Lifecycle hooks: implemented by a modifier's run state --------------------------------


@hookspec
def llmc_initialize(context: RunContext) -> None:
    """The model is loaded and the calibration data is ready; nothing has been changed yet.

    Resolve targets, check that the modifier applies to this model (raise ``CalibrationError``
    naming the module and the fix when it does not) and allocate run state. Called once, in
    recipe order, before the first layer is calibrated.
    """


@hookspec
def llmc_layer_start(context: RunContext, layer_name: str, layer: torch.nn.Module) -> bool | None:
    """A block (usually a decoder layer) is about to be calibrated.

    Attach forward hooks to the modules of ``layer`` whose inputs you need (to accumulate a
    Hessian or activation statistics). Return ``True`` if this modifier needs the calibration
    samples to run through ``layer`` now; when no modifier asks for them the pass is skipped.
    During the pass ``context.attention_mask`` holds the current batch's mask, so padded tokens
    can be left out of statistics.
    """


@hookspec
def llmc_layer_end(context: RunContext, layer_name: str, layer: torch.nn.Module) -> None:
    """The calibration pass over ``layer`` is done: compress it now, in place.

    Remove the hooks added in ``llmc_layer_start``, change the weights (quantize, prune), and
    record per-module results in ``context.report``. After every modifier has run this hook,
    core runs the samples through the compressed layer to produce the next layer's inputs, so
    the errors made here are seen, and compensated, by the following layers.
    """


@hookspec
def llmc_finalize(context: RunContext) -> None:
    """All blocks are done; compress whatever lies outside them and release run state.

    Modules outside the calibrated blocks (for example ``lm_head`` when it is targeted) are
    compressed here, without calibration data. Called once, in recipe order.
    """


REGISTRATION_HOOKS = ("llmc_register_modifiers", "llmc_register_recipes")
LIFECYCLE_HOOKS = ("llmc_initialize", "llmc_layer_start", "llmc_layer_end", "llmc_finalize")
