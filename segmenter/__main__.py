"""``python -m segmenter ...``: the same CLI as the ``segmenter`` console script (and the form
``torchrun ... -m segmenter`` launches)."""

import sys

from segmenter.cli import main

sys.exit(main())
