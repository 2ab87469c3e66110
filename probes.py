"""Linear probes on a code z and the scores read from them (SPEC §5, §7, §7.1, §8): the multiclass, multilabel
and regression probe on all of z or on one unit, the L1 (sparse) probe whose weights say which units a factor
is read from, DCI with that probe as the regressor, and few-shot classification.

Inputs may be numpy arrays or torch tensors (N rows = samples); outputs are numpy arrays or floats; units as in
metrics.py. Probes run on the CPU with torch and are deterministic for a given seed.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from metrics import as_numpy, dci, mean_average_precision, pearson, rescaled_accuracy, unit_dims


def _one_torch_thread(fit):
    """Run a probe fit with one torch thread, then restore the caller's count. These matrices are tiny: on a
    busy 2-core machine two threads made a 15-epoch probe 50x slower (118 s against 2.5 s), never faster."""
    @functools.wraps(fit)
    def wrapped(*args, **kwargs):
        n_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fit(*args, **kwargs)
        finally:
            torch.set_num_threads(n_threads)
    return wrapped


# ----------------------------------------------------------------------------- linear probes

def _standardise(x_train, *others):
    """z-score every split with the train mean and std; returns float32 torch tensors."""
    x_train = as_numpy(x_train).astype(np.float64)
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    return [None if x is None else torch.from_numpy(((as_numpy(x) - mean) / std).astype(np.float32))
            for x in (x_train, *others)]


def _carve_validation(x, y, seed):
    """Deterministic 90/10 split of (x, y): returns x_train, y_train, x_val, y_val."""
    x, y = as_numpy(x), as_numpy(y)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, len(x) // 10)
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def _train_linear(x, targets, x_val, loss_fn, val_score, out_dim, epochs, lr, batch_size, seed,
                  weight_decay, l1):
    """Adam on logits = x W^T + b (W zero-initialised), minibatches over a seeded permutation; loss =
    loss_fn(logits, targets) + l1 * sum |W|. Returns (W, b, epoch) of the epoch with the highest
    val_score(logits on x_val)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(out_dim, x.shape[1], requires_grad=True)
    bias = torch.zeros(out_dim, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    best = (-math.inf, weight.detach().clone(), bias.detach().clone(), -1)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(torch.addmm(bias, x[idx], weight.t()), targets[idx])
            if l1 > 0:
                loss = loss + l1 * weight.abs().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = val_score(torch.addmm(bias, x_val, weight.t()))
        if score > best[0]:                                   # a nan score never wins
            best = (score, weight.detach().clone(), bias.detach().clone(), epoch)
    return best[1], best[2], best[3]


def _class_counts(num_values, *ys):
    """Classes per factor: num_values (int or per-factor list), else max label over all splits + 1."""
    ys = [as_numpy(y).reshape(len(y), -1) for y in ys if y is not None]
    if num_values is not None:
        return np.broadcast_to(np.asarray(num_values, dtype=int), (ys[0].shape[1],)).copy()
    return np.max([y.max(0) for y in ys], axis=0).astype(int) + 1


def _class_mask(n_classes):
    """(F, Cmax) additive mask: 0 for a factor's classes, -1e9 for the classes it lacks."""
    mask = torch.zeros(len(n_classes), int(max(n_classes)))
    for f, n in enumerate(n_classes):
        mask[f, n:] = -1e9
    return mask


def _factor_logits(logits, class_mask):
    """(B, F * Cmax) -> (B, F, Cmax): one softmax head per factor."""
    return logits.view(len(logits), *class_mask.shape) + class_mask


def _multiclass_loss(logits, y, class_mask):
    """sum_f mean_i CE(head_f(x_i), y_if)."""
    logits = _factor_logits(logits, class_mask)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum") / len(y)


def _multiclass_accuracy(logits, y, class_mask):
    """Per-factor accuracy (F,) of the argmax of each factor's head."""
    return (_factor_logits(logits, class_mask).argmax(-1) == y).float().mean(0).numpy()


def _factor_weights(weight, n_classes):
    """(F * Cmax, D) -> [W_f (n_f, D)] per factor."""
    per_factor = weight.view(len(n_classes), int(max(n_classes)), -1).numpy()
    return [per_factor[f, :n] for f, n in enumerate(n_classes)]


@_one_torch_thread
def fit_probe(x_train, y_train, x_val, y_val, x_test, y_test, kind, epochs=15, lr=1e-3, batch_size=128,
              seed=0, weight_decay=0.0, l1=0.0, num_values=None):
    """One linear layer on standardised x (train mean/std), Adam, best epoch on validation, scored on test.

    kind 'multiclass': y (N, F) ints; one softmax head per factor, loss = sum_f CE_f. Validation: mean
        accuracy. Returns {'accuracy' (F,), 'rescaled' (F,), 'n_classes' (F,), 'weights': [W_f (n_f, D)]}
        (weights act on the standardised x).
    kind 'binary': y (N, A) in {0, 1}; BCE on all attributes (SPEC §5, CelebA). Validation: mean AP.
        Returns {'ap' (A,), 'mean_ap'}.
    kind 'regression': y (N, A) floats; MSE on y standardised with its train mean/std (predictions are mapped
        back). Validation: mean Pearson r. Returns {'pearson' (A,), 'mean_pearson', 'mse'} (mse in y's units).
    Without x_val (None), a seeded 10% of train is held out for validation. Without x_test, the scores are
    those on validation. Every result also has 'best_epoch'.
    """
    if x_val is None:
        x_train, y_train, x_val, y_val = _carve_validation(x_train, y_train, seed)
    if x_test is None:
        x_test, y_test = x_val, y_val
    x_train, x_val, x_test = _standardise(x_train, x_val, x_test)
    y_train, y_val, y_test = (as_numpy(y).reshape(len(y), -1) for y in (y_train, y_val, y_test))  # (N,) -> (N, 1)
    train = dict(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay, l1=l1)

    if kind == "multiclass":
        n_classes = _class_counts(num_values, y_train, y_val, y_test)
        mask = _class_mask(n_classes)
        y_tr, y_va, y_te = (torch.as_tensor(y, dtype=torch.long) for y in (y_train, y_val, y_test))
        weight, bias, epoch = _train_linear(
            x_train, y_tr, x_val, lambda lg, y: _multiclass_loss(lg, y, mask),
            lambda lg: _multiclass_accuracy(lg, y_va, mask).mean(), mask.numel(), **train)
        acc = _multiclass_accuracy(torch.addmm(bias, x_test, weight.t()), y_te, mask)
        return {"accuracy": acc, "rescaled": rescaled_accuracy(acc, n_classes), "n_classes": n_classes,
                "weights": _factor_weights(weight, n_classes), "best_epoch": epoch}

    if kind == "binary":
        targets = torch.as_tensor(y_train, dtype=torch.float32)
        weight, bias, epoch = _train_linear(
            x_train, targets, x_val, F.binary_cross_entropy_with_logits,
            lambda lg: mean_average_precision(lg.numpy(), y_val)[0], y_train.shape[1], **train)
        mean_ap, ap = mean_average_precision(torch.addmm(bias, x_test, weight.t()).numpy(), y_test)
        return {"ap": ap, "mean_ap": mean_ap, "best_epoch": epoch}

    if kind == "regression":
        y_mean, y_std = y_train.mean(0), np.where(y_train.std(0) > 1e-8, y_train.std(0), 1.0)
        targets = torch.as_tensor((y_train - y_mean) / y_std, dtype=torch.float32)

        def mean_r(pred, y):
            return float(np.nanmean([pearson(pred[:, a], y[:, a]) for a in range(y.shape[1])]))

        weight, bias, epoch = _train_linear(x_train, targets, x_val, F.mse_loss,
                                            lambda lg: mean_r(lg.numpy(), y_val), y_train.shape[1], **train)
        pred = torch.addmm(bias, x_test, weight.t()).numpy() * y_std + y_mean
        r = np.array([pearson(pred[:, a], y_test[:, a]) for a in range(y_test.shape[1])])
        return {"pearson": r, "mean_pearson": float(np.nanmean(r)),
                "mse": float(((pred - y_test) ** 2).mean()), "best_epoch": epoch}

    raise ValueError(f"unknown probe kind {kind!r}")


def probe_per_unit(x_train, y_train, x_val, y_val, x_test, y_test, units, epochs=5, lr=1e-2, batch_size=256,
                   seed=0, num_values=None):
    """SPEC §7 unit x factor map: a multiclass probe (fit_probe) on each unit alone -> (F, U) rescaled test
    accuracy, clipped at 0 (chance = 0, perfect = 1). Defaults are shorter than fit_probe's (5 epochs at
    lr 1e-2, batch 256) because the map fits one probe per unit."""
    x_train, x_val, x_test = (None if x is None else as_numpy(x) for x in (x_train, x_val, x_test))
    num_values = _class_counts(num_values, y_train, y_val, y_test)
    columns = []
    for unit in units:
        dims = unit_dims(unit, x_train.shape[1])
        result = fit_probe(x_train[:, dims], y_train, None if x_val is None else x_val[:, dims], y_val,
                           None if x_test is None else x_test[:, dims], y_test, "multiclass", epochs=epochs,
                           lr=lr, batch_size=batch_size, seed=seed, num_values=num_values)
        columns.append(np.clip(result["rescaled"], 0.0, None))
    return np.stack(columns, axis=1)


@_one_torch_thread
def fit_sparse_probe(x_train, y_train, x_test=None, y_test=None, l1=0.01, steps=200, num_values=None):
    """L1 multinomial logistic regression on standardised x, one softmax head per factor, full batch:
    min_{W,b} sum_f mean_i CE_f + l1 sum |W|, by FISTA (proximal gradient with Nesterov momentum; the prox
    of the L1 term is soft-thresholding, so unused weights are exactly 0). Step 1 / L with
    L = lambda_max([x 1]^T [x 1] / N) / 2, a bound on the loss's curvature. Deterministic (no seed).
    Returns {'weights': [W_f (n_f, D)], 'n_classes' (F,), 'accuracy' (F,) on test (if given)}."""
    x_train, x_test = _standardise(x_train, x_test)
    n_classes = _class_counts(num_values, y_train, y_test)
    mask = _class_mask(n_classes)
    y = torch.as_tensor(as_numpy(y_train), dtype=torch.long)
    curvature = max(torch.linalg.eigvalsh(x_train.T @ x_train / len(x_train)).max().item(), 1.0) / 2
    step = 1.0 / curvature
    weight, bias = torch.zeros(mask.numel(), x_train.shape[1]), torch.zeros(mask.numel())
    prev_weight, prev_bias, momentum = weight, bias, 1.0
    for _ in range(steps):
        next_momentum = (1 + math.sqrt(1 + 4 * momentum ** 2)) / 2
        beta = (momentum - 1) / next_momentum
        w = (weight + beta * (weight - prev_weight)).requires_grad_()
        b = (bias + beta * (bias - prev_bias)).requires_grad_()
        loss = _multiclass_loss(torch.addmm(b, x_train, w.t()), y, mask)
        grad_w, grad_b = torch.autograd.grad(loss, (w, b))
        prev_weight, prev_bias, momentum = weight, bias, next_momentum
        w = w.detach() - step * grad_w
        weight = w.sign() * (w.abs() - step * l1).clamp(min=0)     # prox of step * l1 * |w|
        bias = b.detach() - step * grad_b
    result = {"weights": _factor_weights(weight, n_classes), "n_classes": n_classes}
    if x_test is not None:
        y_te = torch.as_tensor(as_numpy(y_test), dtype=torch.long)
        result["accuracy"] = _multiclass_accuracy(torch.addmm(bias, x_test, weight.t()), y_te, mask)
    return result


def unit_importance(weights, units, n_dims):
    """R[u, f] = sum of |W_f| over unit u's dims and factor f's classes -> (U, F)."""
    return np.array([[np.abs(w[:, unit_dims(unit, n_dims)]).sum() for w in weights] for unit in units])


def sparse_probe_importance(x_train, y_train, units, l1=0.01, steps=200, num_values=None):
    """SPEC §7.1 importance: one L1 probe (fit_sparse_probe) on all of z; row f = each unit's share of factor
    f's summed |weights| -> (F, U), rows sum to 1 (a row of zeros if l1 removed every weight)."""
    result = fit_sparse_probe(x_train, y_train, l1=l1, steps=steps, num_values=num_values)
    share = unit_importance(result["weights"], units, as_numpy(x_train).shape[1]).T            # (F, U)
    return share / np.maximum(share.sum(1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- DCI from an L1 probe (SPEC §7.1, §8)

def dci_from_probes(code_train, y_train, code_test, y_test, units, l1=0.01, steps=200, num_values=None):
    """DCI with an L1 linear probe as the regressor (fit_sparse_probe, standardised code, as Eastwood &
    Williams' lasso): R[u, f] = sum of |W| over unit u's dims and factor f's classes. Informativeness = that
    probe's mean test accuracy. (disentanglement_lib uses boosted trees; not available here.)"""
    result = fit_sparse_probe(code_train, y_train, code_test, y_test, l1, steps, num_values)
    R = unit_importance(result["weights"], units, as_numpy(code_train).shape[1])
    return {**dci(R), "informativeness": float(result["accuracy"].mean()), "importance": R}


def dci_pca(codes_pc_train, y_train, codes_pc_test, y_test, **probe_args):
    """SPEC §8: DCI on the U first-principal-component numbers, each its own unit."""
    n_units = as_numpy(codes_pc_train).shape[1]
    return dci_from_probes(codes_pc_train, y_train, codes_pc_test, y_test, [[u] for u in range(n_units)],
                           **probe_args)


# ----------------------------------------------------------------------------- few-shot (SPEC §5)

def _few_shot_indices(labels, n, rng):
    """n indices: one random example of each class first when n >= #classes, the rest uniform without
    replacement from the remainder; with n < #classes simply n uniform draws (some classes missing)."""
    classes = np.unique(labels)
    if n < len(classes):
        return rng.choice(len(labels), n, replace=False)
    first = np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])
    rest = np.setdiff1d(np.arange(len(labels)), first)
    return np.concatenate([first, rng.choice(rest, n - len(classes), replace=False)])


def _logistic_regression(x, y, n_classes, l2, steps):
    """Full-batch multinomial logistic regression by L-BFGS: min CE(x W^T + b, y) + l2 ||W||^2."""
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(bias, x, weight.t()), y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


@_one_torch_thread
def few_shot(x_train, y_train, x_test, y_test, factor=None, shots=(5, 10, 20, 50), runs=10, dims=None,
             seed=0, l2=1e-2, steps=200):
    """SPEC §5 few-shot: for each n in shots and each of `runs` draws, n labelled training examples in total
    (every class at least once when n >= #classes), a logistic-regression probe on x[:, dims] (all dims when
    None), accuracy on the whole test set. Features are standardised with the mean/std of all of x_train
    (unlabelled statistics). y may be (N, F) with `factor` the column, or (N,). Returns {n: (mean, std)}."""
    y_train, y_test = as_numpy(y_train), as_numpy(y_test)
    if y_train.ndim == 2:
        y_train, y_test = y_train[:, factor], y_test[:, factor]
    x_train, x_test = as_numpy(x_train), as_numpy(x_test)
    if dims is not None:
        dims = unit_dims(dims, x_train.shape[1])
        x_train, x_test = x_train[:, dims], x_test[:, dims]
    x_train, x_test = _standardise(x_train, x_test)
    y_train_t, y_test_t = (torch.as_tensor(y, dtype=torch.long) for y in (y_train, y_test))
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    results = {}
    for n in shots:
        accuracies = []
        for run in range(runs):
            idx = torch.as_tensor(_few_shot_indices(y_train, n, np.random.default_rng([seed, n, run])))
            weight, bias = _logistic_regression(x_train[idx], y_train_t[idx], n_classes, l2, steps)
            pred = torch.addmm(bias, x_test, weight.t()).argmax(1)
            accuracies.append((pred == y_test_t).float().mean().item())
        results[n] = (float(np.mean(accuracies)), float(np.std(accuracies)))
    return results
