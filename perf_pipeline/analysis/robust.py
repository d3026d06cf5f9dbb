"""Small robust-statistics helpers shared by the analyses."""

from __future__ import annotations

import numpy as np

MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal sample is 0.6745 sigma


def lag1_autocorrelation(residuals: np.ndarray) -> float:
    """Lag-1 autocorrelation with the Marriott–Pope small-sample bias correction."""
    n = len(residuals)
    centred = residuals - residuals.mean()
    denominator = float(np.dot(centred, centred))
    if n < 4 or denominator == 0:
        return 0.0
    raw = float(np.dot(centred[1:], centred[:-1]) / denominator)
    return float(np.clip(raw + (1 + 4 * raw) / n, -0.95, 0.95))


def ar1_variance_inflation(rho: float) -> float:
    """Factor by which positive lag-1 autocorrelation inflates the variance of a mean-like
    statistic: (1 + rho) / (1 - rho), the effective-sample-size correction of AR(1)."""
    rho = min(max(rho, 0.0), 0.9)
    return (1 + rho) / (1 - rho)


def mostly_one_value(values: np.ndarray, share: float = 0.5) -> bool:
    """Whether `share` or more of the values are one and the same: counts of rare events,
    pass rates stuck at 100%. Their MAD is zero, so robust scores mean nothing there."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return True
    _, counts = np.unique(values, return_counts=True)
    return counts.max() >= share * len(values)
