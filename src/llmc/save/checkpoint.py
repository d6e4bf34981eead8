"""Write a compressed model as a checkpoint directory that transformers and vLLM load.

A compression run can take hours, and its output directory is what users point serving at, so
the write is all or nothing: everything goes into a hidden sibling directory
(``.<name>.tmp-<pid>-<hex>``, same file system, so the final step is a rename) and only a
complete checkpoint ever appears at ``output_dir``. An existing non-empty directory is kept
unless ``overwrite=True``, and even then it is replaced only after the new checkpoint is
completely written; how it is replaced, so that a kill at any moment leaves a complete
checkpoint, and how the next run clears what a killed one left, is ``llmc.save.atomic``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError
from torch import nn

from llmc.errors import SaveError
from llmc.save.atomic import (
    check_writable,
    clean_leftovers,
    make_sibling_dir,
    move_into_place,
    pause_point,
)
from llmc.save.compressed_tensors import (
    compressed_state_dict,
    quantization_config,
    with_config_entries,
)
from llmc.save.safetensors_stream import TensorEntry, entry_of_tensor, write_safetensors

__all__ = ["MAX_SHARD_SIZE", "check_output_dir", "save_checkpoint"]

logger = logging.getLogger("llmc.save")

MAX_SHARD_SIZE = "5GB"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _is_empty_dir(path: Path) -> bool:
    return not any(path.iterdir())


def check_output_dir(output_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Refuse an output directory ``save_checkpoint`` would refuse, before hours of work.

    Returns the absolute path (a symlink's target: replacing the link itself would leave its
    target untouched). Raises ``SaveError`` if the path is a file, a non-empty directory and
    ``overwrite`` is false, or a place where the checkpoint could not be written (checked by
    creating the missing parents and a probe folder). It also clears what killed runs for the
    same output left behind, restoring the previous checkpoint if one was killed mid-swap,
    so that a restored checkpoint is refused like any other without ``overwrite``.
    """
    output_dir = output_path(output_dir)
    if not output_dir.name:
        raise SaveError(
            f"output directory {output_dir} is a file system root; choose a directory inside it"
        )
    check_writable(output_dir)
    clean_leftovers(output_dir)
    _check_destination(output_dir, overwrite)
    return output_dir


def output_path(output_dir: str | os.PathLike[str]) -> Path:
    """The absolute path the checkpoint goes to (a symlink's target), without any check."""
    path = Path(os.path.abspath(Path(output_dir).expanduser()))
    return path.resolve() if path.name and _is_symlink(path) else path


def _is_symlink(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:  # a name too long to stat: check_writable says so
        return False


def _check_destination(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise SaveError(
            f"output path {output_dir} exists and is not a directory; choose another directory"
        )
    if output_dir.is_dir() and not overwrite and not _is_empty_dir(output_dir):
        raise SaveError(
            f"output directory {output_dir} is not empty; pass overwrite=True "
            f"(CLI: --overwrite) or choose another directory"
        )


def _check_extra_files(extra_files: Mapping[str, str | bytes]) -> None:
    for name, content in extra_files.items():
        path = Path(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise SaveError(
                f"extra file name {name!r} must be a relative path inside the checkpoint "
                f"(no '..', not absolute)"
            )
        if not isinstance(content, (str, bytes)):
            raise SaveError(
                f"extra file {name!r} must be str or bytes (got {type(content).__name__})"
            )


def _readable_as_umask_allows(path: Path) -> None:
    """Give a shard the mode any other file gets (safetensors creates it 0600, so a serving user
    other than the writer could not read the checkpoint)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _natural_key(name: str) -> list[Any]:
    """``model.layers.10`` after ``model.layers.9``: the order tensors are assigned to shards."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _write_weights(entries: list[TensorEntry], directory: Path) -> list[str]:
    """The shards and index, one tensor at a time (``llmc.save.safetensors_stream``).

    Tensors go to shards in name order, so an in-memory run and a streamed one, whose finished
    layers come from part files, write the same files.
    """
    by_name = {entry.name: entry for entry in sorted(entries, key=lambda e: _natural_key(e.name))}
    if len(by_name) != len(entries):
        raise SaveError("two tensors of the checkpoint have the same name")
    split = split_state_dict_into_shards_factory(
        by_name, get_storage_size=lambda entry: entry.nbytes,
        filename_pattern=WEIGHTS_PATTERN, max_shard_size=MAX_SHARD_SIZE,
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(directory / filename, [by_name[name] for name in names], {"format": "pt"})
        _readable_as_umask_allows(directory / filename)
        size = (directory / filename).stat().st_size
        logger.info("wrote %s (%d tensors, %.1f MB)", filename, len(names), size / 1e6)
        written.append(filename)
        if len(written) == 1:
            pause_point("after-first-shard")
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        logger.info("wrote %s (%d shards)", INDEX_NAME, len(written))
        written.append(INDEX_NAME)
    return written


def _write_config(model: nn.Module, quant_config: dict[str, Any] | None, directory: Path) -> None:
    """``config.json`` with our ``quantization_config``, from a copy of the model's config."""
    config = getattr(model, "config", None)
    if config is None:
        raise SaveError(
            f"the model ({type(model).__name__}) has no 'config'; save_checkpoint needs a "
            f"transformers PreTrainedModel"
        )
    config = copy.deepcopy(config)
    if quant_config is not None:
        config.quantization_config = quant_config
    elif hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(directory))
    logger.info("wrote config.json")


def _write_extra_files(
    extra_files: Mapping[str, str | bytes], directory: Path, existing: Iterable[str]
) -> None:
    existing = set(existing)
    for name, content in extra_files.items():
        path = directory / name
        if name in existing or path.exists():
            raise SaveError(
                f"extra file {name!r} would overwrite a checkpoint file of the same name; rename it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        logger.info("wrote %s", name)


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike[str],
    *,
    save_compressed: bool = True,
    overwrite: bool = False,
    ignore: Iterable[str] = (),
    extra_files: Mapping[str, str | bytes] | None = None,
    config_entries: Mapping[str, Any] | None = None,
    written_layers: Sequence[str] = (),
    layer_entries: Sequence[TensorEntry] = (),
) -> Path:
    """Write ``model`` (with its quantized Linears compressed), its tokenizer and extra files.

    The directory holds safetensors shards (``model.safetensors``, or 5 GB shards with
    ``model.safetensors.index.json``), ``config.json`` with ``quantization_config``,
    ``generation_config.json`` when the model has one, the tokenizer files when
    ``tokenizer`` is given, and each of ``extra_files`` (name relative to the checkpoint →
    text or bytes). ``ignore`` adds entries to the config's ignore list (every unquantized
    Linear is listed anyway). ``config_entries`` are added to ``quantization_config`` (what
    plugins contribute, ``plugin_config_entries``). A streamed run passes the layers it has
    already written (``written_layers``, module names) and their tensors (``layer_entries``,
    read from its part files). Returns the absolute path of the checkpoint.
    """
    output_dir = check_output_dir(output_dir, overwrite=overwrite)
    extra_files = dict(extra_files or {})
    _check_extra_files(extra_files)

    quant_config = with_config_entries(
        quantization_config(model, list(ignore), save_compressed=save_compressed),
        dict(config_entries or {}),
    )
    state = compressed_state_dict(model, save_compressed=save_compressed, skip=tuple(written_layers))
    entries = [entry_of_tensor(name, tensor) for name, tensor in state.items()] + list(layer_entries)

    try:
        temp_dir = make_sibling_dir(output_dir, "tmp")
    except OSError as error:
        raise _write_failed(output_dir, error) from error
    logger.info("writing checkpoint for %s into %s", output_dir, temp_dir)
    try:
        written = _write_weights(entries, temp_dir)
        _write_config(model, quant_config, temp_dir)
        written.append("config.json")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(temp_dir))
            written.append("generation_config.json")
            logger.info("wrote generation_config.json")
        if tokenizer is not None:
            written.extend(Path(f).name for f in tokenizer.save_pretrained(str(temp_dir)))
            logger.info("wrote the tokenizer")
        _write_extra_files(extra_files, temp_dir, written)
        _check_destination(output_dir, overwrite)
        move_into_place(temp_dir, output_dir)
    except (OSError, SafetensorError) as error:
        # SafetensorError is how safetensors reports a failed write (disk full, file too large)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise _write_failed(output_dir, error) from error
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    logger.info("saved checkpoint to %s", output_dir)
    return output_dir


def _write_failed(output_dir: Path, error: BaseException) -> SaveError:
    reason = (str(error).strip() or type(error).__name__).splitlines()[0]
    return SaveError(
        f"could not write the checkpoint to {output_dir}: {reason}; check free disk space and "
        f"permissions"
    )
