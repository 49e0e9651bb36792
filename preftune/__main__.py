"""``python -m preftune ...`` (and ``accelerate launch -m preftune train ...``)."""

import sys

from .cli import main

sys.exit(main())
