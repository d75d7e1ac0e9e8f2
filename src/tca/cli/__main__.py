"""``python -m tca.cli``."""

import sys

from . import main

sys.exit(main())
