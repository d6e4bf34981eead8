"""What the benchmark scripts share, so that each script only says what it measures.

* ``env``: paths, the offline settings, ``--threads``, the machine's description (stdlib only).
* ``child``: the protocol of a one-run script: the chunks it reads, the dataset both tools get,
  the JSON line it prints last and the driver reads back.
* ``measure``: a whole process under ``/usr/bin/time -v``, and waiting for an idle machine.
* ``driver``: the A B A B driver: configurations run as processes, interleaved, checkpoints
  evaluated, results written after every run.
* ``results``: medians, quiet runs, ratios, the table and ``results/<name>.json``.
* ``inprocess``: the same interleaving for steps timed inside one process.
* ``data``: the benchmark models and calibration chunks (built once under ``BENCH_ROOT``).
* ``recipes``: the recipe names both tools know, and our recipe text for each.
* ``pipeline``: llmc's layer-by-layer pipeline on chunks, and the calibration floor.

No module imports llmc when it is imported (only ``pipeline`` does, and only the scripts of
llmc's venv import it), so ``peer_oneshot.py`` can use ``env`` and ``child`` in the peer's venv.
Importing the package sets the offline variables before transformers or datasets is imported.
"""

from benchlib.env import OFFLINE_ENV

__all__ = ["OFFLINE_ENV"]
