"""Tests for data.py and synthetic.py: one test per claim of SPEC §6 and §7."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import diffusion  # noqa: E402
import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def gen():
    return data.Synthetic(size=32, seed=0)


# ---- the synthetic dataset (SPEC §7) ----------------------------------------------------------------------
def test_synthetic_is_deterministic_per_seed_and_cached(tmp_path):
    a = data.load_synthetic(seed=3, n_train=64, n_test=16, cache_dir=tmp_path)
    b = data.load_synthetic(seed=3, n_train=64, n_test=16, cache_dir=tmp_path / "other")
    again = data.load_synthetic(seed=3, n_train=64, n_test=16, cache_dir=tmp_path)   # from the cache
    c = data.load_synthetic(seed=4, n_train=64, n_test=16, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    stronger = data.load_synthetic(seed=3, n_train=64, n_test=16, cache_dir=tmp_path, strength=2.0)
    assert len(list(tmp_path.glob("*.npz"))) == 3 and not np.array_equal(stronger["train"].images, a["train"].images)
    for split in ("train", "test"):
        assert np.array_equal(a[split].images, b[split].images)
        assert np.array_equal(a[split].labels, again[split].labels)
        assert np.array_equal(a[split].images, again[split].images)
        assert not np.array_equal(a[split].labels, c[split].labels)
    assert a["train"].images.shape == (64, 32, 32, 3) and a["train"].images.dtype == np.uint8
    assert a["train"].labels.shape == (64, len(a["generator"].factor_names))
    assert a["train"].kind == "multiclass" and len(a["train"]) == 64


def test_synthetic_has_at_least_8_factors_of_2_to_6_values(gen):
    assert len(gen.factor_names) >= 8
    assert all(2 <= k <= 6 for k in gen.num_values)
    labels = gen.sample_labels(2000, np.random.default_rng(0))
    assert labels.dtype == np.int64
    for f, k in enumerate(gen.num_values):
        assert set(np.unique(labels[:, f])) == set(range(k))


def test_render_is_a_function_of_the_labels(gen):
    labels = gen.sample_labels(8, np.random.default_rng(1))
    assert np.array_equal(gen.render(labels), gen.render(labels))
    assert np.array_equal(gen.render(labels)[3:5], gen.render(labels[3:5]))


def test_counterfactual_changes_only_the_factors_pixels(gen):
    labels = gen.sample_labels(6, np.random.default_rng(2))
    base = gen.render(labels)
    for f, name in enumerate(gen.factor_names):
        for value in range(gen.num_values[f]):
            cf = gen.counterfactual(labels, name, value)
            assert np.array_equal(cf, gen.render(gen.with_value(labels, f, value)))
            changed = (cf != base).any(-1)                                  # (n, H, W)
            same = labels[:, f] == value
            assert not changed[same].any(), f"{name}: same value changed the image"
            assert changed[~same].reshape((~same).sum(), -1).any(1).all(), f"{name}: value {value} had no effect"
            region = gen.affected_pixels(labels, f, value)
            assert not (changed & ~region).any(), f"{name}: pixels outside its region changed"


def test_changed_pairs_differ_only_in_the_factor(gen):
    rng = np.random.default_rng(3)
    for f in range(len(gen.factor_names)):
        a, b = gen.changed_pairs(f, 32, rng)
        assert (a[:, f] != b[:, f]).all()
        assert np.array_equal(np.delete(a, f, 1), np.delete(b, f, 1))


def test_render_24k_images_is_fast_enough(gen):
    import time
    labels = gen.sample_labels(2000, np.random.default_rng(4))
    start = time.perf_counter()
    gen.render(labels)
    assert (time.perf_counter() - start) * 12 < 30   # 24k images in under ~30 s


# ---- attribute loss (SPEC §7) -------------------------------------------------------------------------------
def test_tv_distance_matches_monte_carlo_between_two_gaussians():
    # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for two x0 at distance d; TV = P_p(A) - P_q(A), A = closer to x0.
    sched = diffusion.linear_schedule()
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    x1[:3] = torch.tensor([0.3, -0.4, 0.2])                               # d = ||x0 - x1|| = 0.539
    for t in (50, 150, 300):
        abar = sched.abar[t].double()
        m0, m1 = abar.sqrt() * x0, abar.sqrt() * x1
        noise = (1 - abar).sqrt() * torch.randn(2, 200_000, 8, generator=gen, dtype=torch.float64)
        p, q = m0 + noise[0], m1 + noise[1]
        closer = lambda x: (x - m0).norm(dim=1) < (x - m1).norm(dim=1)   # noqa: E731
        mc = closer(p).double().mean() - closer(q).double().mean()
        exact = data.tv_distance(sched.snr[t], (x0 - x1).norm())
        assert abs(float(mc) - float(exact)) < 0.01


def test_tv_distance_closed_form_values():
    # 2 Phi(z) - 1 at z = sqrt(4) * 1 / 2 = 1 is 0.6827; at d = 0 it is 0.
    tv = data.tv_distance(torch.tensor([[4.0], [1.0]]), torch.tensor([[1.0, 0.0]]))
    assert tv.shape == (2, 2)
    assert tv[0, 0].item() == pytest.approx(math.erf(1 / math.sqrt(2)), abs=1e-9)
    assert tv[:, 1].abs().max().item() == 0


def test_loss_times_span_the_schedule(gen):
    curves, loss_times = data.attribute_loss_curves(gen, n_pairs=256, seed=0)
    assert curves.shape == (len(gen.factor_names), 1000) and loss_times.shape == (len(gen.factor_names),)
    assert (np.diff(curves, axis=1) <= 1e-12).all()                       # TV falls with t
    assert (loss_times < 150).sum() >= 2
    assert ((loss_times >= 150) & (loss_times < 400)).sum() >= 2
    assert (loss_times >= 400).sum() >= 2
    assert np.diff(np.sort(loss_times)).min() >= 40                       # spread, no ties


@pytest.mark.parametrize("size", [16, 64])
def test_every_factor_is_visible_at_other_sizes_with_its_fine_ones_fine(size):
    """At 16 px no row centre falls in the 1-px stripe of the 32-px design: it must still be drawn, with the
    pixel distance it has at 32 px, and the fine factors must stay the first ones lost."""
    names = data.Synthetic(size=32).factor_names
    dist32 = synthetic.factor_distances(data.Synthetic(size=32), n_pairs=64)
    dist = synthetic.factor_distances(data.Synthetic(size=size), n_pairs=64)
    _, loss_times = synthetic.loss_curves(dist)
    assert (np.median(dist, axis=1) > 0.2).all()                          # no factor vanishes
    stripe = names.index("stripe")
    assert np.median(dist[stripe]) == pytest.approx(np.median(dist32[stripe]), rel=0.1)
    fine = [names.index("corner_mark"), names.index("texture")]
    assert sorted(np.argsort(loss_times)[:2]) == sorted(fine) and loss_times[fine].max() < 150


def test_factor_table_and_plot(gen, tmp_path):
    table = data.factor_table(gen, n_pairs=16)
    assert all(name in table for name in gen.factor_names) and "gain g=0.1" in table
    curves, loss_times = data.attribute_loss_curves(gen, n_pairs=8)
    path = data.plot_tv_curves(curves, gen.factor_names, tmp_path / "tv.png")
    assert Image.open(path).size[0] > 500


def test_loss_gain_shares_closed_form():
    """One factor holds the whole gain; a bigger change at the same time holds more; gamma 1 moves the gain to the
    factors lost first. Against the sum over t written out for two factors."""
    snr = diffusion.linear_schedule().snr.double()
    assert np.allclose(data.loss_gain_shares(np.full((1, 3), 2.0)), [1.0])
    d = np.array([[0.3, 0.3], [8.0, 8.0]])                       # a fine factor (lost early) and a coarse one
    expect = []
    for row in d:
        lost = 1 - torch.erf(snr.sqrt() * row[0] / (2 * np.sqrt(2)))
        expect.append(float((snr ** 0.1 / (1 + snr) * snr * row[0] ** 2 / 4 * lost).sum()))
    assert np.allclose(data.loss_gain_shares(d), np.array(expect) / sum(expect))
    paper, small_t = data.loss_gain_shares(d, 0.1), data.loss_gain_shares(d, 1.0)
    assert paper[0] < paper[1] and small_t[0] > paper[0]
    _, loss_times = data.loss_curves(d)
    assert loss_times[0] < loss_times[1]


# ---- tensors and batches -----------------------------------------------------------------------------------
def test_exact_denoiser_is_the_posterior_mean_summed_over_every_image():
    """ExactDenoiser (DiTi --exact-eps) sums apart the marks' pixels; it must equal E[eps | x_t] summed over all
    N images in float64, and at small t, where nothing is lost yet, give back the true noise."""
    gen = synthetic.Synthetic(8, 0)
    denoiser = synthetic.ExactDenoiser(torch.nn.Identity(), gen)
    labels = synthetic.all_labels(gen)
    assert len(labels) == math.prod(gen.num_values) and len(np.unique(labels, axis=0)) == len(labels)
    X = torch.from_numpy(gen.render(labels).transpose(0, 3, 1, 2).reshape(len(labels), -1)).double() / 127.5 - 1
    x0, sched = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:12]], diffusion.linear_schedule()
    for t in (3, 100, 300, 900):
        abar, eps = sched.abar[t].double(), torch.randn(x0.shape, generator=torch.Generator().manual_seed(t)).double()
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        sq_dist = x_t.pow(2).sum(1, keepdim=True) - 2 * abar.sqrt() * x_t @ X.T + abar * X.pow(2).sum(1)  # (12, N)
        posterior = (-sq_dist / (2 * (1 - abar))).softmax(1)
        expected = (x_t - abar.sqrt() * posterior @ X) / (1 - abar).sqrt()
        got = denoiser(x_t.float().view(12, 3, 8, 8), torch.full((12,), t)).flatten(1).double()
        assert torch.allclose(got, expected, atol=1e-3), t
        if t == 3:
            assert torch.allclose(got, eps, atol=1e-3)


def test_exact_denoiser_refuses_a_mark_whose_pixels_other_factors_touch(monkeypatch):
    monkeypatch.setattr(synthetic, "SEPARATE", ("stripe", "texture"))     # the texture lies on the object
    with pytest.raises(ValueError, match="texture's pixels are touched by more than the background"):
        synthetic.ExactDenoiser(torch.nn.Identity(), synthetic.Synthetic(8, 0))


def test_to_tensor_and_back():
    u = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    x = data.to_tensor(u)
    assert x.shape == (2, 3, 5, 4) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(data.to_uint8(x), u)
    assert data.to_uint8(torch.full((1, 3, 1, 1), 5.0)).max() == 255


def small_dataset(n=10):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 3), np.uint8)
    images[:, :, 0] += 100                                                 # left column marks the flip
    return data.Dataset(images)


def test_batch_stream_visits_every_image_once_per_epoch():
    stream = data.batches(small_dataset(10), batch_size=5, seed=0)
    seen = [int(b[i, 0, 0, 1].add(1).mul(127.5).round()) for b in (next(stream), next(stream)) for i in range(5)]
    assert sorted(seen) == list(range(10))
    assert stream.state_dict()["epoch"] == 1


def test_batch_stream_resumes_exactly_from_its_state():
    a = data.BatchStream(small_dataset(10), batch_size=4, seed=1, flip=True)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    b = data.BatchStream(small_dataset(10), batch_size=4, seed=1, flip=True)
    b.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(next(a), next(b))


def test_batch_stream_flips_horizontally_about_half_the_images():
    stream = data.BatchStream(small_dataset(10), batch_size=10, seed=0, flip=True)
    flipped = [(batch[:, 0, 0, 0] < batch[:, 0, 0, 2]).float().mean() for batch in [next(stream) for _ in range(20)]]
    assert 0.35 < float(torch.stack(flipped).mean()) < 0.65


def test_shards_of_two_ranks_make_the_global_batch():
    full = data.BatchStream(small_dataset(10), batch_size=4, seed=2, flip=True)
    ranks = [full.shard(r, 2) for r in range(2)]
    for _ in range(5):
        parts = [next(r) for r in ranks]
        assert all(p.shape[0] == 2 for p in parts)
        glob = next(full)
        assert torch.equal(glob[0::2], parts[0]) and torch.equal(glob[1::2], parts[1])


# ---- CelebA (SPEC §6) ---------------------------------------------------------------------------------------
NAMES = [f"Attr_{i}" for i in range(40)]


def make_celeba(root, n=6, partition=True, bad_line=None, truncate=None):
    """A tiny CelebA folder in the official format: 178 x 218 JPEGs, attributes with runs of spaces."""
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [str(n), " ".join(NAMES)]
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(np.full((218, 178, 3), 20 * i, np.uint8)).save(img_dir / name, quality=95)
        values = rng.choice(["-1", " 1"], size=40)
        values[0] = " 1" if i % 2 else "-1"
        lines.append(name + "  " + " ".join(values))
    if bad_line is not None:
        lines[bad_line - 1] = lines[bad_line - 1].rsplit(" ", 1)[0]        # drop a value
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    if partition:
        splits = [0, 0, 0, 1, 2, 2][:n]
        (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {s}\n" for i, s in enumerate(splits)))
    if truncate is not None:
        path = img_dir / f"{truncate:06d}.jpg"
        path.write_bytes(path.read_bytes()[:400])
    return root


def test_celeba_reader_shapes_labels_and_splits(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    out = data.load_celeba(root, size=64, cache_dir=tmp_path / "cache", workers=1)
    assert [len(out[s]) for s in ("train", "valid", "test")] == [3, 1, 2]
    train = out["train"]
    assert train.images.shape == (3, 64, 64, 3) and train.images.dtype == np.uint8
    assert isinstance(train.images, np.memmap)
    assert train.labels.shape == (3, 40) and set(np.unique(train.labels)) <= {0, 1}
    assert list(train.labels[:, 0]) == [0, 1, 0] and list(out["test"].labels[:, 0]) == [0, 1]
    assert train.factor_names == NAMES and train.num_values == [2] * 40 and train.kind == "binary"
    assert abs(int(out["valid"].images[0].mean()) - 60) <= 2                 # image 4 has grey level 60
    again = data.load_celeba(root, size=64, cache_dir=tmp_path / "cache")    # from the cache
    assert np.array_equal(again["test"].images, out["test"].images)


def test_celeba_without_partition_file_splits_by_index(tmp_path):
    out = data.load_celeba(make_celeba(tmp_path / "c", partition=False), size=32, cache_dir=tmp_path / "cache")
    assert [len(out[s]) for s in ("train", "valid", "test")] == [6, 0, 0]


def test_celeba_missing_files_are_data_errors(tmp_path):
    root = make_celeba(tmp_path / "c")
    (root / "list_attr_celeba.txt").unlink()
    with pytest.raises(data.DataError, match="list_attr_celeba.txt"):
        data.load_celeba(root, cache_dir=tmp_path / "cache")
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_celeba(tmp_path / "nowhere")
    (root / "img_align_celeba").rename(root / "images")
    with pytest.raises(data.DataError, match="img_align_celeba"):
        data.load_celeba(root, cache_dir=tmp_path / "cache")


def test_celeba_malformed_line_names_the_line(tmp_path):
    root = make_celeba(tmp_path / "c", bad_line=5)
    with pytest.raises(data.DataError, match="line 5"):
        data.load_celeba(root, cache_dir=tmp_path / "cache")


def test_celeba_truncated_jpeg_is_skipped_with_a_warning(tmp_path):
    root = make_celeba(tmp_path / "c", truncate=2)
    with pytest.warns(UserWarning, match="skipped 1"):
        out = data.load_celeba(root, size=32, cache_dir=tmp_path / "cache", workers=2)   # a process pool
    assert [len(out[s]) for s in ("train", "valid", "test")] == [2, 1, 2]
    assert list(out["train"].labels[:, 0]) == [0, 0]                         # images 1 and 3 remain


# ---- image folders --------------------------------------------------------------------------------------
def test_image_folder_reader_crops_resizes_and_recurses(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (30, 50), (0, 0, 255)).save(tmp_path / "imgs" / "sub" / "b.JPG")
    out = data.load_image_folder(tmp_path / "imgs", 16, cache_dir=tmp_path / "cache")
    assert out["train"].images.shape == (2, 16, 16, 3) and out["train"].labels is None
    assert out["train"].images[0, ..., 0].min() > 240 and out["train"].images[1, ..., 2].min() > 240


def test_empty_image_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty"):
        data.load_image_folder(tmp_path / "empty", 32)


def test_load_data_dispatches_and_rejects_unknown_names(tmp_path):
    out = data.load_data("synthetic", size=32, seed=0, n_train=8, n_test=4, cache_dir=tmp_path)
    assert len(out["train"]) == 8
    with pytest.raises(data.DataError, match="synthetic, celeba, folder"):
        data.load_data("mnist")


def test_loss_curves_cross_one_half_where_the_closed_form_says():
    # TV_t = 0.5 where sqrt(SNR_t) d / 2 = Phi^-1(0.75) = 0.6745: d = 1 is lost at t = 205, d = 2 at t = 336.
    # The curve of a factor is the median over its pairs, so the second factor's is that of d = 2.
    curves, loss_times = data.loss_curves(np.array([[1.0, 1.0, 1.0], [0.5, 2.0, 4.0]]))
    assert curves.shape == (2, 1000) and loss_times.tolist() == [205, 336]
    assert curves[0, 204] >= 0.5 > curves[0, 205]
    assert curves[1, 100] == pytest.approx(math.erf(math.sqrt(diffusion.linear_schedule().snr[100].item()) * 2
                                                    / (2 * math.sqrt(2))), abs=1e-6)
    assert data.loss_curves(np.zeros((1, 3)))[1].tolist() == [0]          # identical images: lost at once


@pytest.mark.parametrize("size", [16, 32])
def test_fine_loss_time_makes_the_fine_factors_stronger_and_lost_where_asked(size):
    """Beyond the paper (--fine-loss-time): the fine factors' contrast rises so each is lost at about the asked
    t, still below 150; no other factor's loss time moves by more than one step."""
    base, strong = data.Synthetic(size=size), data.Synthetic(size=size, fine_loss_time=140)
    _, t_base = synthetic.attribute_loss_curves(base)
    _, t_strong = synthetic.attribute_loss_curves(strong)
    fine = [base.factor_names.index(name) for name in synthetic.FINE]
    assert all(abs(int(t_strong[f]) - 140) <= 6 for f in fine), t_strong[fine]
    assert (t_strong[fine] >= t_base[fine]).all() and t_strong[fine].max() < 150
    others = [f for f in range(len(base.factor_names)) if f not in fine]
    assert np.abs(t_strong[others] - t_base[others]).max() <= 1
    snr_140 = float(diffusion.linear_schedule().snr[140])                 # closed form: median ||dx|| = 1.349 / sqrt(SNR)
    dist = synthetic.factor_distances(strong, n_pairs=128)
    assert np.median(dist[fine], axis=1) == pytest.approx([synthetic.TV_HALF / snr_140 ** 0.5] * 2, rel=0.05)
    assert strong.fingerprint() != base.fingerprint()                     # its own cache file
    with pytest.raises(ValueError, match="fine_loss_time"):
        data.Synthetic(size=size, fine_loss_time=1000)


def test_texture_cell_draws_the_checker_in_larger_cells_with_the_same_energy():
    """Beyond the paper (--texture-cell): the texture's checker in 2 x 2 cells (hand-worked corner below); its
    pixel energy, and so its loss time, is that of the 1-pixel checker; nothing else changes."""
    base, coarse = data.Synthetic(size=16), data.Synthetic(size=16, texture_cell=2)
    assert coarse._checker[:4, :4].tolist() == [[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]]
    labels = base.sample_labels(64, np.random.default_rng(0))
    plain, textured = base.with_value(labels, "texture", 0), base.with_value(labels, "texture", 1)
    assert np.array_equal(coarse.render_float(plain), base.render_float(plain))
    diff = coarse.render_float(textured) - coarse.render_float(plain)
    cov = coarse.coverage(textured)[..., None]
    assert np.allclose(diff, coarse.amp["texture"] * coarse._checker[None, :, :, None] * cov)
    t = base.factor_names.index("texture")
    assert abs(int(synthetic.attribute_loss_curves(coarse)[1][t]) - int(synthetic.attribute_loss_curves(base)[1][t])) <= 3
    assert coarse.fingerprint() != base.fingerprint() == data.Synthetic(size=16, texture_cell=1).fingerprint()


def test_texture_region_image_draws_the_checker_everywhere_with_the_object_checkers_energy():
    """Beyond the paper (--texture-region image): the checker over the whole image, the same +-amplitude on every
    pixel whatever the other factors; its median ||x0 - x0'|| (so its t_f) is the object checker's; nothing
    else changes, and the default data keeps its cache."""
    base, spread = data.Synthetic(size=16), data.Synthetic(size=16, texture_region="image")
    labels = base.sample_labels(64, np.random.default_rng(0))
    plain, textured = base.with_value(labels, "texture", 0), base.with_value(labels, "texture", 1)
    assert np.array_equal(spread.render_float(plain), base.render_float(plain))
    diff = spread.render_float(textured) - spread.render_float(plain)
    assert np.allclose(diff, spread.amp["texture"] * spread._checker[None, :, :, None])      # fixed, everywhere
    assert diff[0, 0, 0, 0] == pytest.approx(spread.amp["texture"]) and diff[0, 0, 1, 0] == pytest.approx(-spread.amp["texture"])
    norm = np.sqrt(16 * 16 * 3) * spread.amp["texture"]                   # every pair changes by the same amount
    assert norm == pytest.approx(base.median_change("texture", np.random.default_rng([0, 8])))
    assert spread.amp["texture"] < base.amp["texture"] / 2               # spread over ~10 x the object's area
    t = base.factor_names.index("texture")
    assert abs(int(synthetic.attribute_loss_curves(spread)[1][t]) - int(synthetic.attribute_loss_curves(base)[1][t])) <= 3
    assert spread.affected_pixels(labels, "texture", 1).all()
    assert spread.fingerprint() != base.fingerprint() == data.Synthetic(size=16, texture_region="object").fingerprint()
    strong = data.Synthetic(size=16, fine_loss_time=140, texture_region="image")      # then strengthened as asked
    assert np.sqrt(16 * 16 * 3) * strong.amp["texture"] == pytest.approx(synthetic.TV_HALF / float(diffusion.linear_schedule().snr[140]) ** 0.5)
    with pytest.raises(ValueError, match="texture_region"):
        data.Synthetic(size=16, texture_region="background")
