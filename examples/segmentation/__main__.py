"""``python -m examples.segmentation`` (or ``torchrun ... -m examples.segmentation``)."""

import sys

from examples.segmentation.cli import main

sys.exit(main())
