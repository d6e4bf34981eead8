"""``python -m llmc ...`` (and ``torchrun -m llmc ...``) run the ``llmc`` command."""

import sys

from llmc.cli import main

sys.exit(main())
