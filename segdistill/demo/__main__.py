"""``python -m segdistill.demo``."""

import sys

from segdistill.demo.run import main

sys.exit(main())
