"""Promotion that only goes forward: a new iteration head to head with the promoted policy.

Both policies answered the same held-out prompts greedily, so every prompt gives a paired
difference: the annotator's preference for the new answer over the promoted one (an LM
annotator is asked in both orders), whether each answer is a real answer that meets its
constraints, and whether each is degenerate. A percentile bootstrap over the prompts gives each
mean difference a confidence interval (`eval.gate.confidence`, two-sided).

The decision (`decide`): promote when no figure could be worse by more than `eval.gate.margin`
(its interval's lower end above -margin: non-inferiority) and at least one is better with that
confidence (its lower end above 0). A tie is refused: the promoted policy stays until something
beats it. The margin must not be smaller than the intervals' half-width at the held-out size,
or nothing can be shown non-inferior; each interval's `mde` says how wide that is.
"""

from __future__ import annotations

import math
from statistics import NormalDist

POWER = 0.8  # the power at which the smallest detectable difference is reported
RESAMPLES = 10_000
# Per-prompt improvement of the new policy over the promoted one, for each gated figure.
LABELS = {
    "win_rate": "head-to-head win rate",
    "substantive_pass_rate": "real pass rate",
    "degenerate": "degenerate share",
}


def paired_interval(diffs: list[float], confidence: float, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Mean of paired differences, its percentile-bootstrap interval and the smallest difference
    a test at this confidence detects with 80% power given the observed spread."""
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None, "sd": None, "mde": None}
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory at any n
        idx = rng.integers(0, n, size=(min(1000, resamples - start), n))
        means[start:start + len(idx)] = d[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    z = NormalDist().inv_cdf(1 - tail) + NormalDist().inv_cdf(POWER)
    return {"n": n, "mean": float(d.mean()), "low": float(low), "high": float(high), "sd": sd,
            "mde": z * sd / math.sqrt(n) if n > 1 else None}


def detectable(n: int, sd: float, confidence: float) -> float:
    """The smallest mean difference the paired test detects with 80% power on n prompts."""
    return (NormalDist().inv_cdf(1 - (1 - confidence) / 2) + NormalDist().inv_cdf(POWER)) * sd / math.sqrt(n)


def differences(preferences: dict[str, float | None], new: dict[str, dict], old: dict[str, dict]) -> dict:
    """Per-prompt improvements of `new` over `old` on the prompts both were measured on.

    `preferences`: the annotator's AlpacaEval preference per prompt for the new answer against
    the old one (1..2, None when the annotation failed). `new`/`old`: per-prompt flags
    `{"real_pass": bool | None, "degenerate": bool}` of each policy's answer.
    """
    shared = [k for k in new if k in old]
    return {
        "win_rate": [p - 1.5 for p in preferences.values() if p is not None],
        "substantive_pass_rate": [float(new[k]["real_pass"]) - float(old[k]["real_pass"]) for k in shared
                                  if new[k]["real_pass"] is not None and old[k]["real_pass"] is not None],
        "degenerate": [float(old[k]["degenerate"]) - float(new[k]["degenerate"]) for k in shared],
    }


def head_to_head(diffs: dict[str, list[float]], metrics: list[str], confidence: float) -> dict:
    return {m: paired_interval(diffs[m], confidence) for m in metrics}


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def describe(metric: str, c: dict) -> str:
    """'real pass rate +0.047 [+0.016, +0.078]' (improvement of the new policy, with its interval)."""
    return f"{LABELS[metric]} {_signed(c['mean'])} [{_signed(c['low'])}, {_signed(c['high'])}]"


def decide(comparisons: dict[str, dict], against: str, margin: float, confidence: float) -> dict:
    """Promote or refuse, with one reason a person can read and a check per figure."""
    measured = {m: c for m, c in comparisons.items() if c["n"]}
    checks = []
    for m, c in measured.items():
        checks.append({"condition": f"{LABELS[m]} vs {against}: not lower by more than {margin} with "
                                    f"{confidence:.0%} confidence",
                       "value": c["mean"], "low": c["low"], "high": c["high"], "target": -margin,
                       "ok": c["low"] > -margin})
    pct = f"{confidence:.0%}"
    if not measured:
        return {"promoted": False, "checks": checks,
                "reason": f"refused: nothing could be compared with {against} (no usable annotation or answer)"}
    better = [m for m, c in measured.items() if c["low"] > 0]
    worse = [m for m, c in measured.items() if c["high"] < 0 and c["low"] <= -margin]
    unsure = [m for m, c in measured.items() if c["low"] <= -margin]
    if worse:
        return {"promoted": False, "checks": checks, "reason": (
            f"refused: worse than {against} (" + "; ".join(describe(m, measured[m]) for m in worse) + ")")}
    if unsure:
        return {"promoted": False, "checks": checks, "reason": (
            f"refused: could be worse than {against} by more than {margin} ("
            + "; ".join(describe(m, measured[m]) for m in unsure) + ")")}
    if not better:
        return {"promoted": False, "checks": checks, "reason": (
            f"refused: not better than {against} with {pct} confidence ("
            + "; ".join(describe(m, c) for m, c in measured.items()) + ")")}
    return {"promoted": True, "checks": checks, "reason": (
        f"promoted: better than {against} (" + "; ".join(describe(m, measured[m]) for m in better)
        + f"), and no figure worse by more than {margin}")}
