"""Tests for metrics.py and probes.py: hand-worked values for the scores, synthetic codes with a known answer
for the probes, DCI, MIG and few-shot."""
import math

import numpy as np
import pytest
import torch

import metrics
import probes


def one_hot_code(y, rng, noise=0.1):
    """The integer array y as a one-hot code of 2s (one dim per class) plus Gaussian noise: separable."""
    n_classes = int(y.max()) + 1
    return 2.0 * np.eye(n_classes)[y] + noise * rng.normal(size=(len(y), n_classes))


def random_factors(n, n_values, rng):
    return np.stack([rng.integers(0, v, n) for v in n_values], axis=1)


# ----------------------------------------------------------------------------- ranking and correlation

def test_average_precision_hand_worked():
    # ranked labels 1, 0, 1, 0: precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.833333, abs=1e-6)


def test_average_precision_perfect_ranking_is_one():
    assert metrics.average_precision([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == pytest.approx(1.0)


def test_average_precision_ties_keep_input_order():
    # tied scores: stable sort keeps order 0, 1 -> ranked labels 0, 1 -> AP = 1/2
    assert metrics.average_precision([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_mean_average_precision_two_attributes():
    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.1, 0.1]])
    labels = np.array([[1, 1], [0, 1], [1, 0], [0, 0]])
    mean, per_attribute = metrics.mean_average_precision(scores, labels)
    np.testing.assert_allclose(per_attribute, [5 / 6, 1.0])
    assert mean == pytest.approx((5 / 6 + 1.0) / 2)


def test_pearson_of_linear_relations_is_plus_minus_one():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_is_nan_for_too_few_values_or_constant_input():
    assert math.isnan(metrics.pearson([1, 2], [1, 2]))
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))


def test_spearman_of_monotone_nonlinear_is_one():
    x = np.array([0.1, 0.5, 1.0, 2.0, 3.0])
    assert metrics.spearman(x, np.exp(x) ** 3) == pytest.approx(1.0)


def test_spearman_with_ties_hand_worked():
    # ranks(a) = 1, 2.5, 2.5, 4; ranks(b) = 1, 2, 3, 4; centred: (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5)
    # rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    np.testing.assert_allclose(metrics.ranks([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))


def test_rescaled_accuracy_chance_is_zero_perfect_is_one():
    assert metrics.rescaled_accuracy(0.25, 4) == pytest.approx(0.0)
    assert metrics.rescaled_accuracy(1.0, 4) == pytest.approx(1.0)
    assert metrics.rescaled_accuracy(0.75, 2) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- probes

def test_multiclass_probe_on_separable_toy_is_near_perfect():
    rng = np.random.default_rng(0)
    y = random_factors(3000, [3, 4, 2], rng)
    x = np.concatenate([one_hot_code(y[:, f], rng) for f in range(3)], axis=1)
    result = probes.fit_probe(x[:2000], y[:2000], None, None, x[2000:], y[2000:], "multiclass")
    assert result["rescaled"].shape == (3,)
    assert result["rescaled"].min() > 0.95
    assert [w.shape for w in result["weights"]] == [(3, 9), (4, 9), (2, 9)]   # (n_classes, D) per factor


def test_multiclass_probe_on_noise_is_at_chance():
    rng = np.random.default_rng(1)
    y = random_factors(4000, [4, 2], rng)
    x = rng.normal(size=(4000, 8))
    result = probes.fit_probe(x[:2000], y[:2000], None, None, x[2000:], y[2000:], "multiclass", epochs=5)
    assert np.abs(result["rescaled"]).max() < 0.1


def test_probe_is_deterministic_for_a_seed():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(500, 4)), rng.integers(0, 3, (500, 2))
    first, second = (probes.fit_probe(x, y, None, None, None, None, "multiclass", epochs=2, seed=7)
                     for _ in range(2))
    np.testing.assert_array_equal(first["weights"][0], second["weights"][0])


def test_binary_probe_returns_per_attribute_ap():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 5))
    y = (x[:, :3] > 0).astype(int)
    result = probes.fit_probe(x[:2000], y[:2000], x[2000:2500], y[2000:2500], x[2500:], y[2500:], "binary",
                               epochs=5)
    assert result["ap"].shape == (3,)
    assert result["mean_ap"] > 0.95


def test_regression_probe_recovers_a_linear_target():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 6))
    y = x @ rng.normal(size=(6, 2)) + 5.0
    result = probes.fit_probe(x[:2000], y[:2000], None, None, x[2000:], y[2000:], "regression", lr=1e-2)
    assert result["pearson"].shape == (2,)
    assert result["mean_pearson"] > 0.99
    assert result["mse"] < 0.05 * y.var(0).mean()


@pytest.fixture(scope="module")
def code_with_known_homes():
    """4 factors (3 values each), 4 units of 3 dims: unit f holds factor f (one-hot), nothing else."""
    rng = np.random.default_rng(4)
    y = random_factors(3000, [3, 3, 3, 3], rng)
    code = np.concatenate([one_hot_code(y[:, f], rng, noise=0.5) for f in range(4)], axis=1)
    return code, y, [slice(3 * u, 3 * u + 3) for u in range(4)]


def test_probe_per_unit_map_is_diagonal_and_homes_are_in_order(code_with_known_homes):
    code, y, units = code_with_known_homes
    matrix = probes.probe_per_unit(code[:2000], y[:2000], None, None, code[2000:], y[2000:], units)
    assert matrix.shape == (4, 4)
    assert np.diag(matrix).min() > 0.8
    assert (matrix - np.diag(np.diag(matrix))).max() < 0.1
    np.testing.assert_array_equal(np.round(metrics.home(matrix)), [0, 1, 2, 3])


def test_sparse_probe_puts_most_weight_on_the_right_unit(code_with_known_homes):
    code, y, units = code_with_known_homes
    share = probes.sparse_probe_importance(code[:2000], y[:2000], units)
    np.testing.assert_allclose(share.sum(1), 1.0)
    assert np.diag(share).min() > 0.8


def test_home_hand_worked():
    # row 0: (0*1 + 1*1 + 2*2) / 4 = 1.25; row 1 sums to 0 -> nan
    h = metrics.home([[1, 1, 2], [0, 0, 0]])
    assert h[0] == pytest.approx(1.25)
    assert math.isnan(h[1])


# ----------------------------------------------------------------------------- DCI

def test_dci_of_a_permutation_matrix_is_one():
    R = np.eye(4)[[2, 0, 3, 1]]
    result = metrics.dci(R)
    assert result["disentanglement"] == pytest.approx(1.0)
    assert result["completeness"] == pytest.approx(1.0)


def test_dci_of_a_uniform_matrix_is_zero():
    result = metrics.dci(np.ones((5, 4)))
    assert result["disentanglement"] == pytest.approx(0.0, abs=1e-9)
    assert result["completeness"] == pytest.approx(0.0, abs=1e-9)


def test_dci_ignores_zero_units():
    # unit 2 is dead: rho = 0, so D stays 1; C is unchanged because the factors' columns never reach it
    R = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    result = metrics.dci(R)
    assert result["disentanglement"] == pytest.approx(1.0)
    assert result["completeness"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def permuted_factor_code():
    """5 factors (4 values), code = factors in the order 3, 0, 4, 1, 2 plus tiny noise; one dim per unit."""
    rng = np.random.default_rng(5)
    y = random_factors(3000, [4] * 5, rng)
    code = y[:, [3, 0, 4, 1, 2]] + 0.01 * rng.normal(size=y.shape)
    return code, y


def test_dci_from_probes_on_a_permuted_copy_is_disentangled(permuted_factor_code):
    code, y = permuted_factor_code
    result = probes.dci_from_probes(code[:2000], y[:2000], code[2000:], y[2000:], [[u] for u in range(5)])
    assert result["importance"].shape == (5, 5)
    assert result["disentanglement"] > 0.9
    assert result["completeness"] > 0.9
    assert result["informativeness"] > 0.9


def test_dci_from_probes_on_a_rotated_copy_is_entangled(permuted_factor_code):
    code, y = permuted_factor_code
    rotation = np.linalg.qr(np.random.default_rng(6).normal(size=(5, 5)))[0]
    mixed = (code - code.mean(0)) / code.std(0) @ rotation
    result = probes.dci_from_probes(mixed[:2000], y[:2000], mixed[2000:], y[2000:], [[u] for u in range(5)])
    assert result["disentanglement"] < 0.5


# ----------------------------------------------------------------------------- MIG

def test_mutual_information_of_a_fair_coin_with_itself_is_log_two():
    a = np.array([0, 1] * 50)
    assert metrics.entropy(a) == pytest.approx(math.log(2))
    assert metrics.mutual_information(a, a) == pytest.approx(math.log(2))
    assert metrics.mutual_information(a, np.array([0, 0, 1, 1] * 25)) == pytest.approx(0.0, abs=1e-12)


def test_mig_of_a_one_to_one_copy_is_near_one():
    rng = np.random.default_rng(7)
    y = random_factors(5000, [2, 3, 4, 6], rng)
    assert metrics.mig(y[:, [1, 3, 0, 2]].astype(float), y) > 0.9


def test_mig_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(8)
    y = random_factors(5000, [2, 3, 4, 6], rng)
    assert metrics.mig(rng.normal(size=(5000, 4)), y) < 0.05


def test_first_principal_components_projects_each_unit_on_its_main_axis():
    rng = np.random.default_rng(9)
    s = rng.normal(size=500)
    code = np.stack([s, 2 * s, rng.normal(size=500)], axis=1)
    pcs = metrics.first_principal_components(code, [slice(0, 2), [2]])
    assert pcs.shape == (500, 2)
    np.testing.assert_allclose(pcs[:, 0], math.sqrt(5) * (s - s.mean()), atol=1e-9)   # axis (1, 2)/sqrt(5)
    np.testing.assert_array_equal(pcs[:, 1], code[:, 2])


def test_dci_pca_on_a_copied_code_is_disentangled(permuted_factor_code):
    code, y = permuted_factor_code
    result = probes.dci_pca(code[:2000], y[:2000], code[2000:], y[2000:])
    assert result["disentanglement"] > 0.9


# ----------------------------------------------------------------------------- few-shot

def test_few_shot_informative_dims_beat_noise_dims():
    rng = np.random.default_rng(10)
    y = random_factors(2000, [3, 2], rng)
    x = np.concatenate([one_hot_code(y[:, 0], rng, noise=1.0), rng.normal(size=(2000, 4))], axis=1)
    informative = probes.few_shot(x[:1000], y[:1000], x[1000:], y[1000:], factor=0, runs=3, dims=[0, 1, 2])
    noise = probes.few_shot(x[:1000], y[:1000], x[1000:], y[1000:], factor=0, runs=3, dims=slice(3, 7))
    assert sorted(informative) == [5, 10, 20, 50]
    for n, (mean, std) in {**informative, **noise}.items():
        assert 0.0 <= mean <= 1.0 and std >= 0.0
    assert informative[50][0] > noise[50][0] + 0.2


def test_few_shot_sample_holds_every_class_once_n_reaches_the_class_count():
    labels = np.array([0] * 50 + [1] * 50 + [2] * 5)
    idx = probes._few_shot_indices(labels, 5, np.random.default_rng(0))
    assert len(idx) == 5 and len(set(idx)) == 5
    assert set(labels[idx]) == {0, 1, 2}


def test_probe_fit_restores_the_torch_thread_count():
    n_threads = torch.get_num_threads()
    rng = np.random.default_rng(12)
    probes.fit_probe(rng.normal(size=(100, 2)), rng.integers(0, 2, (100, 1)), None, None, None, None,
                      "multiclass", epochs=1)
    assert torch.get_num_threads() == n_threads


def test_probes_accept_torch_tensors():
    rng = np.random.default_rng(11)
    y = random_factors(600, [3], rng)
    x, y = torch.from_numpy(one_hot_code(y[:, 0], rng)), torch.from_numpy(y)
    result = probes.fit_probe(x[:400], y[:400], None, None, x[400:], y[400:], "multiclass")
    assert result["rescaled"][0] > 0.9
