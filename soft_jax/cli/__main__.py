"""`python -m soft_jax.cli`: the `soft-jax` command."""

import sys

from soft_jax.cli import main

sys.exit(main())
