"""Write docs/plugins.md from llmc.hookspecs, so the plugin docs are the hook docstrings.

Run: python scripts/gen_plugin_docs.py   (a test fails when the file is out of date)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = '''\
## A plugin of your own

A third-party plugin is a small package; nothing in llmc changes to use it.

`pyproject.toml`:

```toml
[project]
name = "acme-llmc"
dependencies = ["llmc-core"]

[project.entry-points.llmc]
acme = "acme_llmc.plugin"
```

`acme_llmc/modifier.py`, the recipe parameters as a frozen attrs class (``targets`` and
``ignore`` come from ``TargetedModifier``; validators raise ``ArgumentError``, which recipes
report with the parameter's path and line):

```python
import attrs
from llmc.modifier import TargetedModifier
from llmc.validators import is_number_in

@attrs.frozen(kw_only=True)
class AcmePruningModifier(TargetedModifier):
    """Zero the smallest weights of each Linear (why you would want to, in one line)."""

    sparsity: float = attrs.field(default=0.5, validator=is_number_in(0, 1))
    requires_calibration_data = False   # data-free: no dataset needed

    def start(self, context):
        from acme_llmc.run import AcmeRun
        return AcmeRun(config=self)     # run state: implements the lifecycle hooks
```

`acme_llmc/run.py`, the run state; ``RunState`` gives every hook as a no-op, so override only
what you need (no marker needed; a misspelled ``llmc_*`` name is an error naming the closest):

```python
import attrs
from llmc.modifier import RunState
from llmc.targets import match_modules

@attrs.define
class AcmeRun(RunState):
    config: "AcmePruningModifier"

    def llmc_layer_end(self, context, layer_name, layer):
        for name, module in match_modules(layer, self.config.targets, self.config.ignore, prefix=layer_name + "."):
            ...  # prune module.weight in place, then context.record(modifier=..., module=name, ...)
```

`acme_llmc/plugin.py`:

```python
from llmc import hookimpl
from acme_llmc.modifier import AcmePruningModifier

@hookimpl
def llmc_register_modifiers():
    return [AcmePruningModifier]
```

A recipe then says `AcmePruningModifier: {sparsity: 0.6}`, or `acme.AcmePruningModifier` when
another plugin offers the same name. `llmc plugins` shows it; `LLMC_DISABLE_PLUGINS=acme`
leaves it out.

### Testing it

`llmc.testing` holds the helpers for plugin authors' tests, the ones core's and the bundled
plugins' tests use, so your plugin is tested on the same kind of model, with no network:
`build_causal_lm()` (a seeded random Llama, Mistral or Qwen small enough for a unit test),
`build_tokenizer()` (trained on a few sentences), `save_tiny_model(path)` (both, saved as a
checkpoint to pass by path), `write_text_file(path)` (a local jsonl calibration set),
`sample_logits(model, tokenizer)` (to compare before and after a save) and
`correlated_inputs(tokens, cols)` (seeded layer inputs for math tests). It does not import pytest;
`llmc.testing_fixtures` (which does) holds the fixtures the bundled plugins share (`tokenizer`,
`model_dir`, `text_file` and the autouse `one_thread`): import them in your `conftest.py`, or
make fixtures of your own:

```python
import pytest
from llmc import oneshot
from llmc.testing import save_tiny_model

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))

def test_acme_pruning_writes_a_checkpoint(model_dir, tmp_path):
    recipe = "pruning_modifiers:\\n  AcmePruningModifier: {sparsity: 0.5}\\n"
    oneshot(model=str(model_dir), recipe=recipe, output_dir=str(tmp_path / "out"))
```
'''


SEAMS = """\
## Where new work plugs in

Each of these is the one place a new algorithm, format or backend is added; nothing else in
core changes.

- **A data-driven algorithm** (an observer, a new pruner): its run state holds one
  `llmc.statistics.LayerCalibration(input_statistic=..., output_statistic=..., true_sequential=...)`,
  calls `start(context, layer_name, layer, modules)` from `llmc_layer_start` and
  `finish(context, layer_name, layer, solve)` from `llmc_layer_end`. Core groups the Linears
  that read one tensor (one statistic for q/k/v), filters padding (`real_tokens`), stops each
  batch once everything is collected, and runs true-sequential stages; `solve(groups)` gets
  each `InputGroup` (names, input statistic, output statistics). A statistic implements
  `Statistic` (`update(x, mask)`, `merge(other)`, `finalize()`), so a distributed run reduces
  every statistic in `LayerCalibration.finish`, before `solve`. A statistic with a
  `share_key` (and a `readers` count its `release` honours) is gathered once for every
  modifier of the stage that asks for an equal one; a solver must then not change what
  `finalize()` returns beyond what it would do to its own copy (`zero_dead_columns_`).
- **A modifier's parameters**: subclass `llmc.modifier.TargetedModifier` (`targets`, `ignore`)
  or, for a quantizer, `llmc.modifiers.quantization.QuantizingModifier` (`scheme`,
  `config_groups`, `skip_incompatible`, `plan(context)`); validate fields with
  `llmc.validators` or `attrs.validators` (errors are `ArgumentError`).
- **A modifier's run state**: subclass `llmc.modifier.RunState` and override the hooks it needs.
- **A modifier that depends on its stage** (llmc-awq's `AWQModifier` takes its scheme from the
  quantizer after it): override `Modifier.check_stage(stage)`, called with every modifier of the
  stage before the model is loaded (raise `RecipeError` when the stage cannot work); while the
  stage runs, `context.stage_modifiers` holds the same modifiers, for `start(context)`.
- **A checkpoint format**: one `llmc.save.register_format(FormatWriter(name, tensors, infers))`
  in `llmc/save/formats.py`; schemes name it with `format:` or are inferred to it.
- **A checkpoint config entry** (`sparsity_config`, a plugin's own record): implement
  `llmc_checkpoint_config(model)` in the plugin module.
- **An MoE architecture whose fused experts core cannot cut**: subclass
  `llmc.experts_adapters.ExpertsAdapter` (`adapter_name`, `experts_classes`, and `layout` returning
  an `ExpertsLayout`: each expert's `[out, in]` weights and biases by role, the checkpoint names,
  the module joining gate and up, the routing) and return it from
  `llmc_register_experts_adapters()`; `unfuse_experts_` then cuts that class, and everything
  after it (targets, calibration, saving) is unchanged.
"""

# Core modules whose ``__all__`` is the API plugins may import (a test checks that the
# first-party plugins import nothing else).
PLUGIN_API_MODULES = (
    "llmc",
    "llmc.calibration",
    "llmc.context",
    "llmc.distributed",
    "llmc.errors",
    "llmc.experts_adapters",
    "llmc.hessian",
    "llmc.hookspecs",
    "llmc.masks",
    "llmc.modifier",
    "llmc.modifiers.quantization",
    "llmc.pipeline",
    "llmc.quantization",
    "llmc.report",
    "llmc.save",
    "llmc.statistics",
    "llmc.targets",
    "llmc.testing",
    "llmc.validators",
)


def _summary(obj: object) -> str:
    if isinstance(obj, (str, int, float, tuple, frozenset, dict)):
        text = repr(obj)
        return f"constant, `{text}`" if len(text) <= 60 else "constant"
    if not (inspect.isroutine(obj) or inspect.isclass(obj) or inspect.ismodule(obj)):
        obj = type(obj)  # a marker or other instance: its class says what it is
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def _helpers() -> list[str]:
    import importlib

    lines = [
        "## Core helpers for plugins",
        "",
        "Everything a plugin may import from core: the `__all__` of these modules (anything else is",
        "internal and may change).",
        "",
    ]
    for module_name in PLUGIN_API_MODULES:
        module = importlib.import_module(module_name)
        lines += [f"### `{module_name}`", "", _summary(module), ""]
        for name in module.__all__:
            lines.append(f"- `{name}`: {_summary(getattr(module, name))}".rstrip(": "))
        lines.append("")
    return lines


def render() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from llmc import hookspecs

    lines = [
        "# The llmc plugin API",
        "",
        "<!-- generated by scripts/gen_plugin_docs.py from src/llmc/hookspecs.py; do not edit -->",
        "",
        inspect.getdoc(hookspecs) or "",
        "",
    ]
    for title, names in (
        ("Registration hooks", hookspecs.REGISTRATION_HOOKS),
        ("Checkpoint hooks", hookspecs.CHECKPOINT_HOOKS),
        ("Lifecycle hooks", hookspecs.LIFECYCLE_HOOKS),
        ("Training hooks", hookspecs.TRAINING_HOOKS),
    ):
        lines += [f"## {title}", ""]
        for name in names:
            function = getattr(hookspecs, name)
            signature = str(inspect.signature(function)).replace("'", "")
            lines += [f"### `{name}{signature}`", "", inspect.getdoc(function) or "", ""]
    lines.append(SEAMS)
    lines += _helpers()
    lines.append(EXAMPLE)
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "docs" / "plugins.md").write_text(render(), encoding="utf-8")
    print("wrote docs/plugins.md")
