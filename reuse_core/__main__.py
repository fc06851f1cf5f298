"""``python -m reuse_core`` runs the ``reuse`` command."""
import sys

from reuse_core.cli import main

sys.exit(main())
