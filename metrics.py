"""Evaluation metrics (SPEC §5, §7, §8) that fit nothing: ranking and correlation scores, the unit x factor
map's homes, DCI from an importance matrix, and MIG. The scores read from fitted linear probes (the probes
themselves, DCI from an L1 probe, few-shot) are in probes.py.

Everything is a plain function of arrays: inputs may be numpy arrays or torch tensors (N rows = samples);
outputs are numpy arrays or floats. A "unit" is a piece of the code z given as a slice or an index array
(a DiTi subset, a DisDiff factor, a PDAE chunk). No model code here.
"""
import math

import numpy as np
import torch


def as_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def unit_dims(unit, n_dims):
    """A unit (slice, int, or index array) as an index array into the code's n_dims columns."""
    if isinstance(unit, slice):
        return np.arange(n_dims)[unit]
    return np.atleast_1d(as_numpy(unit)).astype(int)


# ----------------------------------------------------------------------------- ranking and correlation

def average_precision(scores, labels):
    """AP = (1 / #pos) sum_{k: label_k = 1} precision@k, ranks k by descending score (stable sort on ties).
    nan if there is no positive."""
    scores, labels = as_numpy(scores).astype(float), as_numpy(labels).astype(float)
    ranked = labels[np.argsort(-scores, kind="stable")]
    if ranked.sum() == 0:
        return float("nan")
    precision_at_k = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
    return float((precision_at_k * ranked).sum() / ranked.sum())


def mean_average_precision(scores, labels):
    """scores, labels (N, A) -> (mean AP over attributes, per-attribute AP (A,))."""
    scores, labels = as_numpy(scores), as_numpy(labels)
    per_attribute = np.array([average_precision(scores[:, a], labels[:, a]) for a in range(scores.shape[1])])
    return float(np.nanmean(per_attribute)), per_attribute


def pearson(a, b):
    """r = sum (a - mean a)(b - mean b) / sqrt(sum (a - mean a)^2 sum (b - mean b)^2); nan if n < 3 or a
    constant input."""
    a, b = as_numpy(a).astype(float).ravel(), as_numpy(b).astype(float).ravel()
    if len(a) < 3:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt((da ** 2).sum() * (db ** 2).sum())
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def ranks(x):
    """1-based ranks of x; tied values share their average rank: ranks([1, 2, 2, 3]) = 1, 2.5, 2.5, 4."""
    x = as_numpy(x).astype(float).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first_of_run = np.r_[True, sorted_x[1:] != sorted_x[:-1]]          # runs of tied values
    run_id = np.cumsum(first_of_run) - 1
    run_start = np.flatnonzero(first_of_run)
    run_end = np.r_[run_start[1:], len(x)]                              # exclusive
    average_rank = (run_start + 1 + run_end) / 2.0                      # mean of ranks start+1 .. end
    out = np.empty(len(x))
    out[order] = average_rank[run_id]
    return out


def spearman(a, b):
    """Spearman rho = Pearson r of the (average-tie) ranks."""
    return pearson(ranks(a), ranks(b))


def rescaled_accuracy(acc, n_classes):
    """(acc - 1/n) / (1 - 1/n): chance = 0, perfect = 1."""
    chance = 1.0 / np.asarray(n_classes, dtype=float)
    return (np.asarray(acc, dtype=float) - chance) / (1.0 - chance)


def home(matrix):
    """SPEC §7: each factor's information-weighted mean unit index, sum_u u m[f,u] / sum_u m[f,u]; nan when
    the row sums to 0. matrix (F, U) -> (F,)."""
    m = np.asarray(matrix, dtype=float)
    total = m.sum(1)
    weighted = (m * np.arange(m.shape[1])).sum(1)
    return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), np.nan)


# ----------------------------------------------------------------------------- DCI (Eastwood & Williams 2018)

def _normalised_entropy(p, base):
    """H_base(p) = -sum_i p_i log p_i / log base along the last axis (0 log 0 = 0)."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(-1) / math.log(max(base, 2))


def dci(R):
    """R (U units, F factors), nonnegative importances.
    Disentanglement D = sum_u rho_u (1 - H_F(P_u.)), P_u. = R_u. / sum_f R_uf, rho_u = sum_f R_uf / sum R.
    Completeness C = mean_f (1 - H_U(P_.f)), P_.f = R_.f / sum_u R_uf. A zero unit has rho_u = 0; a zero
    factor has C_f = 0."""
    R = np.abs(np.asarray(R, dtype=float))
    n_units, n_factors = R.shape
    unit_total, factor_total = R.sum(1), R.sum(0)
    P_unit = R / np.where(unit_total > 0, unit_total, 1.0)[:, None]                 # (U, F)
    P_factor = (R / np.where(factor_total > 0, factor_total, 1.0)[None, :]).T      # (F, U)
    D_u = 1.0 - _normalised_entropy(P_unit, n_factors)
    rho = unit_total / max(R.sum(), 1e-12)
    C_f = np.where(factor_total > 0, 1.0 - _normalised_entropy(P_factor, n_units), 0.0)
    return {"disentanglement": float((rho * D_u).sum()), "completeness": float(C_f.mean())}


# ------------------------------------------------------------------------ MIG, DisDiff protocol (SPEC §8)

def first_principal_components(code, units):
    """Each unit projected onto its own first principal component (computed on this array, centred) ->
    (N, U); a 1-dim unit is returned as it is. The sign makes the largest-magnitude loading positive."""
    code = as_numpy(code).astype(np.float64)
    columns = []
    for unit in units:
        x = code[:, unit_dims(unit, code.shape[1])]
        if x.shape[1] == 1:
            columns.append(x[:, 0])
            continue
        x = x - x.mean(0)
        direction = np.linalg.svd(x, full_matrices=False)[2][0]           # top right-singular vector
        direction *= np.sign(direction[np.argmax(np.abs(direction))])
        columns.append(x @ direction)
    return np.stack(columns, axis=1)


def _discretise(column, bins):
    """Equal-width histogram bins over [min, max] -> bin ids 1..bins (disentanglement_lib's np.digitize)."""
    return np.digitize(column, np.histogram(column, bins)[1][:-1])


def mutual_information(a, b):
    """I(a; b) = sum_ij p_ij log(p_ij / (p_i p_j)) in nats, from the joint counts of two discrete arrays."""
    a = np.unique(a, return_inverse=True)[1].ravel()
    b = np.unique(b, return_inverse=True)[1].ravel()
    n_a, n_b = a.max() + 1, b.max() + 1
    p = np.bincount(a * n_b + b, minlength=n_a * n_b).reshape(n_a, n_b) / len(a)
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def entropy(a):
    """H(a) = -sum_i p_i log p_i in nats of a discrete array."""
    p = np.unique(a, return_counts=True)[1] / len(a)
    return float(-(p * np.log(p)).sum())


def mig(codes, factors, bins=20):
    """Mutual information gap (Chen et al. 2018): codes (N, U) each cut into `bins` equal-width bins, factors
    (N, F) discrete. MIG = mean_f (I_(1) - I_(2)) / H(v_f), I_(k) the k-th largest I(c_u; v_f) over units.
    Factors with H = 0 are skipped."""
    codes, factors = as_numpy(codes), as_numpy(factors)
    binned = [_discretise(codes[:, u], bins) for u in range(codes.shape[1])]
    gaps = []
    for f in range(factors.shape[1]):
        h = entropy(factors[:, f])
        if h == 0:
            continue
        mi = np.sort([mutual_information(c, factors[:, f]) for c in binned])[::-1]
        gaps.append((mi[0] - (mi[1] if len(mi) > 1 else 0.0)) / h)
    return float(np.mean(gaps)) if gaps else float("nan")
