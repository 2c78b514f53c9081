import sys

from p2l_jax.cli import main

sys.exit(main())
