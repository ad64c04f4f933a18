"""Evidence from many answers of one host, combined into one verdict.

Fisher's method: under honesty every answer's p-value is uniform or larger (ours are
conservative), so -2 * sum(ln p) is at most chi-squared with 2n degrees of freedom and
its tail is a valid p-value for the whole set. A host is `dishonest` when that p-value
is below alpha (default 1e-4: the chance of flagging an honest host in one audit),
`honest` when it is comfortably large and there are enough answers, else
`inconclusive`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from scipy import stats


@dataclass(frozen=True)
class HostRule:
    alpha: float = 1e-4
    honest_from: float = 1e-2  # combined p-value at or above which a host is called honest
    min_records: int = 3  # fewer answers than this are never enough to call a host honest


def fisher(p_values: Iterable[float]) -> float:
    ps = list(p_values)
    if not ps:
        return 1.0
    if min(ps) <= 0.0:
        return 0.0
    statistic = -2.0 * sum(math.log(min(p, 1.0)) for p in ps)
    return float(stats.chi2.sf(statistic, 2 * len(ps)))


def host_verdict(p_values: list[float], verdicts: list[str], rule: HostRule = HostRule()) -> dict:
    p = fisher(p_values)
    if p < rule.alpha:
        verdict = "dishonest"
    elif p >= rule.honest_from and len(p_values) >= rule.min_records:
        verdict = "honest"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "records": len(p_values),
            "failed": sum(v == "fail" for v in verdicts), "p_value": p}
