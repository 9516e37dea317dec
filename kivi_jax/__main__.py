"""``python -m kivi_jax``: the ``kivi-jax`` command (see kivi_jax/cli.py)."""

import sys

from kivi_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
