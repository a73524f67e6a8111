"""`python -m bench.serve`: see cli.py."""

import sys

from bench.serve.cli import main

sys.exit(main())
