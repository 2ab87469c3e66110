"""SPEC §1, §2, §4: the schedule, the forward process, the loss weights, DDIM and ancestral sampling."""
import math

import torch

import diffusion as D


def test_schedule_reference_values():
    s = D.linear_schedule()
    assert s.T == 1000 and s.abar.dtype == torch.float32
    assert math.isclose(s.betas[0].item(), 1e-4, rel_tol=1e-6) and math.isclose(s.betas[-1].item(), 0.02, rel_tol=1e-6)
    assert math.isclose(s.abar[0].item(), 0.9999, rel_tol=1e-6)
    assert math.isclose(s.abar[999].item(), 4.04e-5, rel_tol=5e-3)
    assert s.abar_prev[0].item() == 1.0


def test_abar_closed_form_equals_iterative_product():
    s = D.linear_schedule()
    prod, abar = 1.0, []
    for t in range(1000):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * t / 999)
        abar.append(prod)
    assert torch.allclose(s.abar.double(), torch.tensor(abar, dtype=torch.float64), rtol=1e-5, atol=1e-9)


def test_snr_landmarks_of_spec():
    snr = D.linear_schedule().snr
    for t, want in [(100, 8.5), (200, 1.9), (300, 0.65), (500, 0.084), (700, 0.0069)]:
        assert math.isclose(snr[t].item(), want, rel_tol=0.03), (t, snr[t].item())


def test_pdae_weight_and_shift_coefficient_reference_values():
    s = D.linear_schedule()
    t = torch.tensor([100, 475, 500, 999])
    w = D.pdae_weight(s, t)
    assert torch.allclose(w, torch.tensor([0.130, 0.7225, 0.720, 0.364]), atol=2e-3)
    assert D.pdae_weight(s, torch.arange(1000)).argmax().item() == 475
    t = torch.arange(1000)
    assert torch.allclose(D.pdae_weight(s, t, gamma=1.0), s.abar.float(), atol=1e-6)      # SNR / (1 + SNR) = abar
    assert torch.allclose(D.pdae_weight(s, t, gamma=0.0), 1 - s.abar.float(), atol=1e-6)  # 1 / (1 + SNR)
    assert D.pdae_weight(s, t, gamma=0.5).argmax().item() < 475 < D.pdae_weight(s, t, gamma=0.0).argmax().item()
    c = D.shift_coef(s, torch.tensor([0, 100, 999]))
    assert torch.allclose(c, torch.tensor([0.0, -0.318, -0.990]), atol=2e-3)


def test_q_sample_statistics():
    s = D.linear_schedule()
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for t in (0, 250, 999):
        tt = torch.full((20000,), t)
        xt = D.q_sample(s, x0, tt, torch.randn_like(x0))
        mean, var = 0.7 * s.abar[t].sqrt().item(), 1 - s.abar[t].item()
        assert abs(xt.mean().item() - mean) < 0.02 and abs(xt.var().item() - var) < 0.02 + 0.05 * var


def point_mass_eps(s, x_star):
    """The exact noise predictor when the data is the single image x_star: eps = (x - sqrt(abar) x*) / sqrt(1-abar)."""
    def eps_fn(x, t):
        a = D.at(s.abar, t, x)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt(), None
    return eps_fn


def test_ddim_inversion_then_sampling_returns_the_input_with_an_exact_predictor():
    s = D.linear_schedule()
    x0 = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    eps_fn = point_mass_eps(s, x0)
    xT = D.ddim_invert(eps_fn, s, x0, steps=20)
    assert (xT - x0).abs().max() > 0.1                 # it went somewhere
    assert torch.allclose(D.ddim_sample(eps_fn, s, xT, steps=20), x0, atol=1e-4)


def gaussian_eps(s, mu, sigma):
    """Exact eps for data N(mu, sigma^2 I): eps = sqrt(1-a) (x - sqrt(a) mu) / (a sigma^2 + 1 - a)."""
    def eps_fn(x, t):
        a = D.at(s.abar, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sigma ** 2 + 1 - a), None
    return eps_fn


def test_ddim_round_trip_on_gaussian_data_converges_with_the_number_of_steps():
    s = D.linear_schedule()
    eps_fn = gaussian_eps(s, 0.1, 0.3)
    x0 = (0.1 + 0.3 * torch.randn(4, 3, 4, 4)).clamp(-0.95, 0.95)   # DDIM clips x0_hat to [-1, 1]
    err = {n: (D.ddim_sample(eps_fn, s, D.ddim_invert(eps_fn, s, x0, n), n) - x0).abs().max().item() for n in (50, 1000)}
    assert err[1000] < 0.03 and err[1000] < err[50] / 4


def test_ddim_step_shift_enters_with_minus_sqrt_one_minus_abar():
    s = D.linear_schedule()
    x, eps, G = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t, tn = torch.tensor([400]), torch.tensor([300])
    a = s.abar[400]
    assert torch.allclose(D.ddim_step(s, x, t, tn, eps, shift=G), D.ddim_step(s, x, t, tn, eps - (1 - a).sqrt() * G))


def test_ancestral_sampling_with_exact_predictor_matches_data_distribution():
    s = D.linear_schedule()
    eps_fn = gaussian_eps(s, 0.2, 0.3)
    x = D.ancestral_sample(lambda x, t: eps_fn(x, t)[0], s, (4000, 1, 1, 1))
    assert abs(x.mean().item() - 0.2) < 0.03 and abs(x.std().item() - 0.3) < 0.03


def test_ddpm_loss_of_the_exact_predictor_is_zero():
    s = D.linear_schedule()
    x0 = torch.full((8, 3, 4, 4), 0.5)
    exact = lambda xt, t: point_mass_eps(s, x0)(xt, t)[0]
    assert D.ddpm_loss(exact, s, x0).item() < 1e-8


def test_linear_schedule_snr_and_abar_prev_follow_from_abar():
    s = D.linear_schedule()
    assert torch.allclose(s.alphas, 1 - s.betas)
    assert torch.allclose(s.abar_prev[1:], s.abar[:-1])                   # abar_{t-1}, abar_{-1} := 1
    abar = s.abar.double()                                                 # 1 - abar in float32 is coarse near 1
    assert torch.allclose(s.snr.double(), abar / (1 - abar), rtol=2e-3)   # SNR_t = abar_t / (1 - abar_t)
    assert (s.snr[1:] < s.snr[:-1]).all()                                  # the signal only ever fades
