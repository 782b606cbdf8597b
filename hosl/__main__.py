"""``python -m hosl ...`` (and ``torchrun -m hosl ...``): the ``hosl`` command."""

import sys

from hosl.cli import main

sys.exit(main())
