"""How sure a comparison is: per-variant spread over replicates and paired differences.

A replicate is one training of a variant: one fold and one seed. From ``compare``'s rows (one
per variant, replicate and held-out case):

- per variant and metric, the replicate-level value (voxel ``dice``: mean over the replicate's
  cases; ``lesion_f1``: pooled over its lesions, from the summed tp/fp/fn) with its mean and
  sample standard deviation over replicates;
- per variant other than the reference, the per-case difference to the reference over the same
  (fold, seed, case) triples: mean, bootstrap interval, sign-flip p-value, wins and losses
  (:mod:`segmenter.evaluation.paired`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segmenter.evaluation.paired import PairedDifference, paired_difference

METRICS = ("dice", "lesion_f1")
STATISTICS_COLUMNS = (
    "variant", "metric", "replicates", "mean", "sd", "reference", "pairs", "diff_mean",
    "ci_low", "ci_high", "p_value", "wins", "losses",
)  # fmt: skip

Key = tuple[int, int, str]  # fold, seed, case id


@dataclass(frozen=True)
class VariantStatistics:
    """One variant's figures for one metric.

    Attributes:
        variant, metric: what they describe.
        replicates: replicate-level values, in (fold, seed) order.
        versus: paired difference to the reference per case (None for the reference itself).
    """

    variant: str
    metric: str
    replicates: tuple[float, ...]
    reference: str
    versus: PairedDifference | None

    @property
    def mean(self) -> float:
        vals = [v for v in self.replicates if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def sd(self) -> float:
        vals = [v for v in self.replicates if not math.isnan(v)]
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


def _num(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    return float(value)


def _replicate_value(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    if metric == "lesion_f1":
        tp, fp, fn = (sum(_num(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
        denom = 2 * tp + fp + fn
        return 2 * tp / denom if denom > 0 else math.nan
    vals = [_num(r[metric]) for r in rows]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def variant_statistics(
    rows: Sequence[Mapping[str, Any]],
    reference: str,
    metrics: Sequence[str] = METRICS,
) -> list[VariantStatistics]:
    """Spread and paired differences of every variant in ``rows`` (variant order kept).

    Raises:
        ValueError: ``reference`` names no variant of ``rows``.
    """
    names = list(dict.fromkeys(str(r["variant"]) for r in rows))
    if reference not in names:
        raise ValueError(f"reference variant '{reference}' is not among {names}")
    by_variant: dict[str, dict[Key, Mapping[str, Any]]] = {n: {} for n in names}
    for r in rows:
        key = (int(r["fold"]), int(r["seed"]), str(r["case_id"]))
        by_variant[str(r["variant"])][key] = r
    out = []
    for name in names:
        cases = by_variant[name]
        reps = sorted({(f, s) for f, s, _ in cases})
        ref_cases = by_variant[reference]
        shared = sorted(set(cases) & set(ref_cases))
        for metric in metrics:
            values = tuple(
                _replicate_value([r for k, r in cases.items() if k[:2] == rep], metric)
                for rep in reps
            )
            versus = None
            if name != reference:
                versus = paired_difference(
                    [_num(cases[k][metric]) for k in shared],
                    [_num(ref_cases[k][metric]) for k in shared],
                )
            out.append(VariantStatistics(name, metric, values, reference, versus))
    return out


def _fmt(value: float, digits: int = 4) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def statistics_csv(stats: Sequence[VariantStatistics]) -> str:
    """``statistics.csv``: one row per variant and metric (empty cells for undefined values)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STATISTICS_COLUMNS)
    for s in stats:
        v = s.versus
        paired = (
            [v.n, _fmt(v.mean), _fmt(v.low), _fmt(v.high), _fmt(v.p_value), v.wins, v.losses]
            if v is not None
            else [""] * 7
        )
        writer.writerow([
            s.variant, s.metric, len(s.replicates), _fmt(s.mean), _fmt(s.sd), s.reference,
            *paired,
        ])  # fmt: skip
    return buf.getvalue()


def statistics_lines(stats: Sequence[VariantStatistics]) -> list[str]:
    """A printable table: mean +- sd over replicates and the paired difference to the reference."""
    lines = [
        f"{'variant':<16} {'metric':<9} {'reps':>4} {'mean':>6} {'sd':>6}  "
        f"{'vs reference (per case)':<34} {'p':>6} {'W/L':>7}"
    ]
    for s in stats:
        sd = "-" if math.isnan(s.sd) else f"{s.sd:.3f}"
        mean = "nan" if math.isnan(s.mean) else f"{s.mean:.3f}"
        if s.versus is None:
            versus, p, wl = f"(reference, {s.reference})", "", ""
        elif s.versus.n == 0:
            versus, p, wl = "no shared cases", "", ""
        else:
            v = s.versus
            ci = "" if math.isnan(v.low) else f" [{v.low:+.3f}, {v.high:+.3f}]"
            versus = f"{v.mean:+.3f}{ci} over {v.n}"
            p, wl = f"{v.p_value:.3f}", f"{v.wins}/{v.losses}"
        lines.append(
            f"{s.variant:<16} {s.metric:<9} {len(s.replicates):>4} {mean:>6} {sd:>6}  "
            f"{versus:<34} {p:>6} {wl:>7}"
        )
    return lines


__all__ = [
    "METRICS",
    "STATISTICS_COLUMNS",
    "VariantStatistics",
    "statistics_csv",
    "statistics_lines",
    "variant_statistics",
]
