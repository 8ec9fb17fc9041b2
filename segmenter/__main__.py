"""``python -m segmenter ...``: the same CLI as the ``segmenter`` console script (and the form
``torchrun ... -m segmenter`` launches)."""

from segmenter.cli import entry

entry()
