"""`python -m llavadi`: the `llavadi` command."""

import sys

from llavadi.cli import main

sys.exit(main())
