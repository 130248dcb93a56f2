"""``python -m longvita [info|generate ...]`` (no arguments: ``info``)."""

import sys

from longvita.cli import main

sys.exit(main(sys.argv[1:] or ["info"]))
