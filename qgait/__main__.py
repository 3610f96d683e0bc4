"""``python -m qgait ...``: the ``qgait`` command."""
import sys

from qgait.cli import main

sys.exit(main())
