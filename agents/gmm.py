"""Gaussian mixtures fitted by EM in plain numpy: what `agents.alp_gmm` clusters its task history with.

    mixture = select_mixture(points, range(2, 11), rng, criterion="aic")   # None when nothing fits
    sample = mixture.sample(mixture.means.shape[0] - 1, rng)              # one draw of component k

k-means++ seeds the means, EM refines them until the mean log-likelihood stops rising.
Covariances are ``full`` or ``diag``, each with ``reg_covar`` added to its diagonal so a
component on a few (or identical) points stays invertible. `select_mixture` fits every k
that the data can hold (k <= number of points) and keeps the one with the lowest AIC or BIC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

COVARIANCE_TYPES = ("full", "diag")
CRITERIA = ("aic", "bic")


@dataclass
class GaussianMixture:
    """A fitted mixture: ``weights`` (k,), ``means`` (k, d), ``covariances`` (k, d, d) (diagonal for ``diag``)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str
    log_likelihood: float
    """Total log-likelihood of the points it was fitted on."""
    num_points: int

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    def num_parameters(self) -> int:
        k, d = self.means.shape
        per_covariance = d * (d + 1) // 2 if self.covariance_type == "full" else d
        return (k - 1) + k * d + k * per_covariance

    def aic(self) -> float:
        return 2.0 * self.num_parameters() - 2.0 * self.log_likelihood

    def bic(self) -> float:
        return self.num_parameters() * float(np.log(max(self.num_points, 1))) - 2.0 * self.log_likelihood

    def score(self, criterion: str) -> float:
        return self.aic() if criterion == "aic" else self.bic()

    def sample(self, component: int, rng: np.random.Generator) -> np.ndarray:
        """One point drawn from Gaussian ``component``."""
        factor = _cholesky(self.covariances[component])
        return self.means[component] + factor @ rng.standard_normal(self.means.shape[1])

    def log_responsibilities(self, points: np.ndarray) -> tuple[np.ndarray, float]:
        """(log p(component | point) of shape (n, k), total log-likelihood)."""
        weighted = np.log(np.maximum(self.weights, 1e-300))[None, :] + _log_densities(points, self.means,
                                                                                     self.covariances)
        total = _logsumexp(weighted)  # (n,)
        return weighted - total[:, None], float(total.sum())

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.copy(), "means": self.means.copy(), "covariances": self.covariances.copy(),
                "covariance_type": self.covariance_type, "log_likelihood": self.log_likelihood,
                "num_points": self.num_points}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "GaussianMixture":
        return cls(np.asarray(state["weights"], dtype=np.float64), np.asarray(state["means"], dtype=np.float64),
                   np.asarray(state["covariances"], dtype=np.float64), str(state["covariance_type"]),
                   float(state["log_likelihood"]), int(state["num_points"]))


def _cholesky(covariance: np.ndarray) -> np.ndarray:
    """A lower Cholesky factor, with growing jitter when round-off made the matrix not quite positive definite."""
    jitter = 0.0
    scale = max(float(np.mean(np.diag(covariance))), 1e-12)
    for _ in range(8):
        try:
            return np.linalg.cholesky(covariance + jitter * np.eye(len(covariance)))
        except np.linalg.LinAlgError:
            jitter = scale * 1e-8 if jitter == 0.0 else jitter * 100.0
    raise np.linalg.LinAlgError("covariance is not positive definite even with jitter")


def _log_densities(points: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """log N(point | mean_j, cov_j) for every point and component: (n, k)."""
    n, d = points.shape
    out = np.empty((n, len(means)))
    for j, (mean, covariance) in enumerate(zip(means, covariances)):
        factor = _cholesky(covariance)
        solved = np.linalg.solve(factor, (points - mean).T)  # (d, n)
        log_det = 2.0 * np.sum(np.log(np.diag(factor)))
        out[:, j] = -0.5 * (d * np.log(2.0 * np.pi) + log_det + np.sum(solved * solved, axis=0))
    return out


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = np.max(values, axis=1, keepdims=True)
    return (top + np.log(np.sum(np.exp(values - top), axis=1, keepdims=True)))[:, 0]


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k seeds, each drawn with probability proportional to its squared distance to the seeds so far."""
    chosen = [int(rng.integers(len(points)))]
    for _ in range(1, k):
        distances = np.min(((points[:, None, :] - points[chosen][None, :, :]) ** 2).sum(-1), axis=1)
        total = distances.sum()
        # All points on the seeds already (duplicates): any point will do.
        chosen.append(int(rng.choice(len(points), p=distances / total)) if total > 0
                      else int(rng.integers(len(points))))
    return points[chosen].copy()


def _m_step(points: np.ndarray, responsibilities: np.ndarray, previous_means: np.ndarray, covariance_type: str,
            reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d = points.shape
    mass = responsibilities.sum(axis=0)  # (k,)
    weights = np.maximum(mass, 1e-12) / n
    means = np.where(mass[:, None] > 1e-12, (responsibilities.T @ points) / np.maximum(mass, 1e-12)[:, None],
                     previous_means)  # an empty component keeps its mean
    covariances = np.empty((len(mass), d, d))
    for j in range(len(mass)):
        centred = points - means[j]
        if mass[j] <= 1e-12:
            covariances[j] = np.eye(d) * max(reg_covar, 1e-6)
            continue
        if covariance_type == "full":
            covariance = (responsibilities[:, j, None] * centred).T @ centred / mass[j]
        else:
            covariance = np.diag(responsibilities[:, j] @ (centred * centred) / mass[j])
        covariances[j] = covariance + reg_covar * np.eye(d)
    return weights / weights.sum(), means, covariances


def fit_mixture(points: np.ndarray, k: int, rng: np.random.Generator, *, covariance_type: str = "full",
                reg_covar: float = 1e-4, max_iter: int = 100, tol: float = 1e-4) -> GaussianMixture | None:
    """EM for a k-component mixture on ``points`` (n, d); None when there are fewer than k points."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or not np.isfinite(points).all():
        raise ValueError("points must be a finite (n, d) array")
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
    if k < 1 or len(points) < k:
        return None
    # Start: hard assignment to k-means++ seeds, then one M-step.
    seeds = _kmeans_plus_plus(points, k, rng)
    nearest = np.argmin(((points[:, None, :] - seeds[None, :, :]) ** 2).sum(-1), axis=1)
    responsibilities = np.eye(k)[nearest]
    weights, means, covariances = _m_step(points, responsibilities, seeds, covariance_type, reg_covar)
    mixture = GaussianMixture(weights, means, covariances, covariance_type, -np.inf, len(points))
    previous = -np.inf
    for _ in range(max_iter):
        log_resp, total = mixture.log_responsibilities(points)
        mixture.log_likelihood = total
        if (total - previous) / len(points) < tol:  # EM never lowers it: a small rise means converged
            break
        previous = total
        weights, means, covariances = _m_step(points, np.exp(log_resp), mixture.means, covariance_type, reg_covar)
        mixture = GaussianMixture(weights, means, covariances, covariance_type, -np.inf, len(points))
    else:
        mixture.log_likelihood = mixture.log_responsibilities(points)[1]
    return mixture


def select_mixture(points: np.ndarray, ks: Iterable[int], rng: np.random.Generator, *, criterion: str = "aic",
                   covariance_type: str = "full", reg_covar: float = 1e-4) -> GaussianMixture | None:
    """The mixture with the lowest AIC/BIC among those fitted with each k of ``ks`` (None: no k fits)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    best: GaussianMixture | None = None
    for k in ks:
        try:
            mixture = fit_mixture(points, int(k), rng, covariance_type=covariance_type, reg_covar=reg_covar)
        except np.linalg.LinAlgError:
            continue  # a degenerate fit is skipped, the other k still compete
        if mixture is None or not np.isfinite(mixture.log_likelihood):
            continue
        if best is None or mixture.score(criterion) < best.score(criterion):
            best = mixture
    return best


__all__ = ["COVARIANCE_TYPES", "CRITERIA", "GaussianMixture", "fit_mixture", "select_mixture"]
