"""Preprocessing a whole dataset: many cases in threads, through the cache when it has one.

This sits above :mod:`segmenter.preprocessing.case` (one case) and
:mod:`segmenter.preprocessing.cache` (one cached case), so neither imports the other's caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from segmenter.preprocessing.cache import cached_case
from segmenter.preprocessing.case import PreprocessedCase, preprocess_case
from segmenter.preprocessing.spec import PreprocessingSpec

if TYPE_CHECKING:
    from segmenter.data.layout import Case


def preprocess_dataset(
    cases: Sequence[Case],
    spec: PreprocessingSpec | None = None,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = False,
) -> list[PreprocessedCase]:
    """Preprocess many cases in parallel threads (gzip and numpy release the GIL).

    Args:
        cases: the cases to read.
        spec: the preprocessing settings (see
        :func:`segmenter.preprocessing.case.preprocess_arrays`).
        cache_dir: keep and reuse the results there (:mod:`segmenter.preprocessing.cache`), or None.
        workers: threads reading cases at once.
        progress: show a tqdm progress bar (stderr).

    Returns:
        One :class:`PreprocessedCase` per case, in the order of ``cases``.

    Raises:
        InputError: the first bad case, as :func:`segmenter.preprocessing.case.preprocess_case`.
    """
    spec = spec or PreprocessingSpec()

    def one(case: Case) -> PreprocessedCase:
        if cache_dir:
            return cached_case(case, cache_dir, spec)
        return preprocess_case(case, spec)

    out: list[PreprocessedCase] = []
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        with tqdm(total=len(cases), desc="preprocess", unit="case", disable=not progress) as bar:
            for pre in pool.map(one, cases):
                out.append(pre)
                bar.update()
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, do not read the remaining cases
    return out


__all__ = ["preprocess_dataset"]
