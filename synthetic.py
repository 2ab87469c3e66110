"""The built-in dataset (SPEC §7): procedural images whose factors have known granularity, and their
attribute loss in closed form (the paper's Figure 1 made exact).

An image is a pure function of its label vector (no hidden noise), so a counterfactual is just a render of
the edited labels. Geometry is written in 32-pixel units and scaled to the image size; colours live in
[-1, 1]. Granularity = contrast x area: each factor's contrast is one constant below, so it can be tuned.
"""
import argparse
import hashlib
import math

import numpy as np
import torch

import diffusion

# ---- factors: name -> values (index = label). Geometry in 32-px units, colours in [-1, 1] ----------------
BACKGROUNDS = [(-0.80, -0.55, 0.25), (0.25, -0.70, -0.70), (-0.70, 0.25, -0.55), (-0.20, -0.20, -0.20)]
X_CENTRES = [9.5, 12.75, 16.0, 19.25, 22.5]
Y_CENTRES = [14.0, 15.0, 16.0, 17.0, 18.0]
HALF_SIZES = [5.05, 5.35, 5.65]
SHAPES = ["square", "circle", "diamond", "hexagon"]
NUM_HUES = 6
OBJECT_LEVEL = 0.45          # grey level of the object before its hue offset
STRIPE_ROW = 30.0            # a 1-px horizontal line at this row, below every object
CORNER_BOX = 3.0             # the corner mark is the top-left CORNER_BOX x CORNER_BOX square
RING_WIDTH = 1.0             # the outline is a ring this wide just outside the object
RENDER_VERSION = 2           # bump when the rendering changes, so caches are rebuilt
SUPERSAMPLE = 2              # anti-aliasing: coverage is the mean over SUPERSAMPLE^2 sub-pixels

# Contrast of each non-geometric factor at 32 px, tuned so the fine ones (corner mark, texture) are lost just
# before t = 100 and t = 150 with as much pixel energy as that allows. Synthetic multiplies them by `strength`
# and by 32 / size, so these factors keep their ||x0 - x0'|| (and t_f) at 64 px; geometric ones grow with area.
AMPLITUDES = dict(
    hue=0.115,                # saturation of the object's hue offset
    outline=0.15,            # brightening of the ring around the object
    stripe=0.10,             # brightening of the 1-px line
    texture=0.038,           # +-amplitude of the 1-px checker on the object
    corner_mark=0.08,        # brightening of the corner square
)
FACTORS = [
    ("background", [f"colour{i}" for i in range(len(BACKGROUNDS))]),
    ("x_position", [f"x{c:g}" for c in X_CENTRES]),
    ("y_position", [f"y{c:g}" for c in Y_CENTRES]),
    ("size", [f"r{r:g}" for r in HALF_SIZES]),
    ("shape", SHAPES),
    ("hue", [f"hue{360 * i // NUM_HUES}" for i in range(NUM_HUES)]),
    ("outline", ["none", "ring"]),
    ("stripe", ["none", "line"]),
    ("texture", ["plain", "checker"]),
    ("corner_mark", ["none", "mark"]),
]
GEOMETRY = ("x_position", "y_position", "size", "shape")
FINE = ("texture", "corner_mark")   # the factors lost before t = 150; what --fine-loss-time strengthens
TEXTURE_REGIONS = ("object", "image")   # where the texture's checker is drawn (SPEC: on the object; --texture-region)
TV_HALF = 1.3489795003921634        # 2 Phi^-1(0.75): TV_t = 0.5 where sqrt(SNR_t) ||x0 - x0'|| equals this


def shape_inside(shape, dx, dy, r):
    """Boolean inside-test of a shape of half-size r at offsets (dx, dy) from its centre."""
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= r
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= (1.08 * r) ** 2
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.3 * r
    # hexagon with pointy sides left and right, circumradius 1.1 r
    R = 1.1 * r
    return (np.abs(dy) <= math.sqrt(3) / 2 * R) & (math.sqrt(3) * np.abs(dx) + np.abs(dy) <= math.sqrt(3) * R)


class Synthetic:
    """Renders 32x32 (or size x size) RGB images from label vectors of the FACTORS above."""

    def __init__(self, size=32, seed=0, strength=1.0, amplitudes=None, fine_loss_time=0, texture_cell=1,
                 texture_region="object"):
        """fine_loss_time > 0 (beyond the paper, off by default) raises the contrast of the FINE factors so
        that each is lost at about that t instead (keep it below 150 so they stay fine; see strengthen_fine).
        texture_cell > 1 (beyond the paper) draws the texture's checker in cells of that many pixels: the same
        pixel energy (so about the same t_f), a lower spatial frequency than SPEC's 1-pixel one.
        texture_region "image" (beyond the paper; SPEC's is "object") draws the checker over the whole image,
        fixed in place and independent of every other factor, at the contrast that keeps the object checker's
        median ||x0 - x0'|| (so about the same t_f)."""
        if texture_region not in TEXTURE_REGIONS:
            raise ValueError(f"texture_region must be one of {TEXTURE_REGIONS}, got {texture_region!r}")
        self.size, self.seed, self.unit, self.texture_cell = size, seed, size / 32, texture_cell
        self.texture_region = "object"     # until the object checker's energy is measured (below)
        self.amp = {k: strength * v / self.unit for k, v in {**AMPLITUDES, **(amplitudes or {})}.items()}
        self.factor_names = [name for name, _ in FACTORS]
        self.value_names = [values for _, values in FACTORS]
        self.num_values = [len(values) for values in self.value_names]
        sub = (np.arange(size * SUPERSAMPLE) + 0.5) / (SUPERSAMPLE * self.unit)  # sub-pixel centres, 32-px units
        self._sub_y, self._sub_x = sub[:, None], sub[None, :]
        pix = (np.arange(size) + 0.5) / self.unit
        self._stripe = ((pix >= STRIPE_ROW) & (pix < STRIPE_ROW + 1)).astype(np.float64)  # (S,) row weights
        if not self._stripe.any():      # below 32 px no row centre falls in the line: its row, dimmed so
            self._stripe[int(STRIPE_ROW * self.unit)] = math.sqrt(self.unit)   # that ||x0 - x0'|| is kept
        self._corner = (pix[:, None] < CORNER_BOX) & (pix[None, :] < CORNER_BOX)      # (S, S)
        cell = np.arange(size) // texture_cell
        self._checker = np.where((cell[:, None] + cell) % 2 == 0, 1.0, -1.0)
        angles = 2 * np.pi * np.arange(NUM_HUES) / NUM_HUES
        self._hues = np.stack([np.cos(angles - k * 2 * np.pi / 3) for k in range(3)], 1)  # (K, 3)
        if texture_region != "object":
            on_object = self.median_change("texture", np.random.default_rng([seed, 8]))
            self.texture_region = texture_region
            self.scale_to_change("texture", on_object, np.random.default_rng([seed, 8]))
        if fine_loss_time:
            self.strengthen_fine(fine_loss_time)

    def median_change(self, name, rng, n_pairs=255):
        """The median ||x0 - x0'|| (float renders) over n_pairs pairs drawn from rng that differ only in `name`."""
        a, b = self.changed_pairs(name, n_pairs, rng)
        return float(np.median(np.sqrt(((self.render_float(a) - self.render_float(b)) ** 2).reshape(n_pairs, -1).sum(1))))

    def scale_to_change(self, name, target, rng):
        """Scale a non-geometric factor's contrast so that its median ||x0 - x0'|| is target (it is linear in it)."""
        self.amp[name] = float(self.amp[name] * target / self.median_change(name, rng))

    def strengthen_fine(self, loss_time):
        """Scale each FINE factor's contrast so that its median TV_t crosses 0.5 at t = loss_time: that needs
        a median ||x0 - x0'|| of TV_HALF / sqrt(SNR_t) (SPEC §7)."""
        if not 0 < loss_time < 1000:
            raise ValueError(f"fine_loss_time must lie in (0, 1000), got {loss_time}")
        target = TV_HALF / math.sqrt(float(diffusion.linear_schedule().snr[int(loss_time)]))
        rng = np.random.default_rng([self.seed, 7])
        for name in FINE:
            self.scale_to_change(name, target, rng)

    def fingerprint(self):
        """A short hash of every rendering constant, so caches follow any change of them."""
        consts = (RENDER_VERSION, FACTORS, BACKGROUNDS, X_CENTRES, Y_CENTRES, HALF_SIZES, OBJECT_LEVEL, STRIPE_ROW, CORNER_BOX,
                  RING_WIDTH, SUPERSAMPLE, sorted(self.amp.items()))
        if self.texture_cell > 1:                                     # (so the default data keeps its caches)
            consts += (self.texture_cell,)
        if self.texture_region != "object":
            consts += (self.texture_region,)
        return hashlib.sha1(repr(consts).encode()).hexdigest()[:10]

    def factor_index(self, factor):
        return self.factor_names.index(factor) if isinstance(factor, str) else int(factor)

    def sample_labels(self, n, rng):
        """n independent label vectors, each factor uniform over its values. Returns (n, F) int64."""
        return rng.integers(0, self.num_values, size=(n, len(self.num_values))).astype(np.int64)

    def coverage(self, labels, grow=0.0):
        """Anti-aliased object coverage in [0, 1], (n, S, S); grow widens the shape (for the outline)."""
        f = {name: labels[:, i] for i, name in enumerate(self.factor_names)}
        cx = np.asarray(X_CENTRES)[f["x_position"]][:, None, None]
        cy = np.asarray(Y_CENTRES)[f["y_position"]][:, None, None]
        r = np.asarray(HALF_SIZES)[f["size"]][:, None, None] + grow
        inside = np.zeros((len(labels), *np.broadcast_shapes(self._sub_y.shape, self._sub_x.shape)), bool)
        for s, shape in enumerate(SHAPES):
            k = f["shape"] == s
            inside[k] = shape_inside(shape, self._sub_x - cx[k], self._sub_y - cy[k], r[k])
        n, S = len(labels), self.size
        return inside.reshape(n, S, SUPERSAMPLE, S, SUPERSAMPLE).mean(axis=(2, 4))

    def render_float(self, labels):
        """Images in [-1, 1] before quantisation, (n, S, S, 3) float64."""
        f = {name: labels[:, i] for i, name in enumerate(self.factor_names)}
        a, n, S = self.amp, len(labels), self.size
        cov = self.coverage(labels)[..., None]                                     # (n, S, S, 1)
        ring = self.coverage(labels, RING_WIDTH)[..., None] - cov
        img = np.broadcast_to(np.asarray(BACKGROUNDS)[f["background"]][:, None, None], (n, S, S, 3)).copy()
        img += a["stripe"] * (f["stripe"][:, None, None, None] * self._stripe[None, :, None, None])
        obj = OBJECT_LEVEL + a["hue"] * self._hues[f["hue"]]                       # (n, 3)
        img = img * (1 - cov) + obj[:, None, None] * cov
        texture_area = cov if self.texture_region == "object" else 1.0
        img += a["texture"] * f["texture"][:, None, None, None] * self._checker[None, :, :, None] * texture_area
        img += a["outline"] * f["outline"][:, None, None, None] * ring
        img += a["corner_mark"] * f["corner_mark"][:, None, None, None] * self._corner[None, :, :, None]
        return img

    def render(self, labels, chunk=2048):
        """Label vectors (n, F) -> uint8 images (n, S, S, 3), rendered in chunks to bound memory."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1, len(self.factor_names))
        out = np.empty((len(labels), self.size, self.size, 3), np.uint8)
        for i in range(0, len(labels), chunk):
            x = self.render_float(labels[i:i + chunk])
            out[i:i + chunk] = np.clip(np.round((x + 1) * 127.5), 0, 255)
        return out

    def with_value(self, labels, factor, value):
        """A copy of labels (n, F) with one factor set to value (an int or an array of n ints)."""
        edited = np.array(labels, dtype=np.int64, copy=True)
        edited[:, self.factor_index(factor)] = value
        return edited

    def counterfactual(self, labels, factor, value):
        """The same samples with `factor` (name or index) set to `value`, as uint8 images. Only the pixels
        in `affected_pixels` can differ from render(labels)."""
        return self.render(self.with_value(labels, factor, value))

    def affected_pixels(self, labels, factor, value):
        """Pixels that setting `factor` to `value` may change, by construction: (n, S, S) bool."""
        name = self.factor_names[self.factor_index(factor)]
        edited = self.with_value(labels, factor, value)
        if name in GEOMETRY:
            return (self.coverage(labels, RING_WIDTH) > 0) | (self.coverage(edited, RING_WIDTH) > 0)
        if name == "texture" and self.texture_region == "image":
            return np.ones((len(labels), self.size, self.size), bool)
        if name in ("hue", "texture"):
            return self.coverage(labels) > 0
        if name == "outline":
            return self.coverage(labels, RING_WIDTH) - self.coverage(labels) > 0
        if name == "background":
            return self.coverage(labels) < 1
        region = self._corner if name == "corner_mark" else np.broadcast_to(self._stripe[:, None] > 0, self._corner.shape)
        return np.broadcast_to(region, (len(labels), self.size, self.size))

    def changed_pairs(self, factor, n, rng):
        """n label pairs that differ only in `factor`; the other factors are random. Returns (a, b), each (n, F)."""
        f = self.factor_index(factor)
        a = self.sample_labels(n, rng)
        shift = rng.integers(1, self.num_values[f], size=n)   # any other value, uniformly
        return a, self.with_value(a, f, (a[:, f] + shift) % self.num_values[f])


# ---- attribute loss (SPEC §7) -----------------------------------------------------------------------------
def tv_distance(snr, dist):
    """SPEC §7: TV(q(x_t|x0), q(x_t|x0')) = 2 Phi(sqrt(SNR_t) ||x0 - x0'|| / 2) - 1 = erf(sqrt(SNR_t) d / (2 sqrt 2)).
    snr and dist broadcast against each other (e.g. (T, 1) and (1, P)); returns float64 torch."""
    snr, dist = torch.as_tensor(snr, dtype=torch.float64), torch.as_tensor(dist, dtype=torch.float64)
    return torch.erf(snr.sqrt() * dist / (2 * math.sqrt(2)))


def pixel_distance(images_a, images_b):
    """||x0 - x0'|| per pair in [-1, 1] units, from uint8 images (n, H, W, 3). Returns (n,) float64."""
    diff = (images_a.astype(np.float64) - images_b.astype(np.float64)) / 127.5
    return np.sqrt((diff ** 2).reshape(len(diff), -1).sum(1))


def factor_distances(generator, n_pairs=256, seed=0):
    """||x0 - x0'|| for n_pairs random pairs differing only in each factor. Returns (F, n_pairs) float64."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(len(generator.factor_names)):
        a, b = generator.changed_pairs(f, n_pairs, rng)
        rows.append(pixel_distance(generator.render(a), generator.render(b)))
    return np.stack(rows)


def loss_curves(distances, snr=None):
    """Median TV_t over pairs (F, T) and loss times t_f = first t with median TV_t < 0.5 (T if never)."""
    snr = diffusion.linear_schedule().snr.double() if snr is None else snr
    tv = tv_distance(snr[None, :, None], torch.as_tensor(distances)[:, None, :])   # (F, T, P)
    curves = tv.median(dim=2).values.numpy() if tv.shape[2] % 2 else np.median(tv.numpy(), axis=2)
    below = curves < 0.5
    loss_times = np.where(below.any(1), below.argmax(1), curves.shape[1]).astype(np.int64)
    return curves.astype(np.float64), loss_times


def loss_gain_shares(distances, gamma=0.1, snr=None):
    """Each factor's share of the stage-2 loss gain that z can earn (an estimate, beyond the paper; it reads the
    claims grid). Where a factor is lost (weight 1 - TV_t), the DDPM's x0 estimate sits between the pair's two
    images, so knowing the factor lowers the eps error by about SNR_t ||x0 - x0'||^2 / 4; weighted by PDAE's
    weight_t (SPEC §2, gamma) and summed over t. distances: (F, P). Returns (F,) shares summing to 1."""
    snr = diffusion.linear_schedule().snr.double() if snr is None else torch.as_tensor(snr, dtype=torch.float64)
    d = torch.as_tensor(distances, dtype=torch.float64)[:, None, :]                # (F, 1, P)
    lost = 1 - tv_distance(snr[None, :, None], d)                                  # (F, T, P)
    weight = (snr ** gamma / (1 + snr))[None, :, None]
    gain = (weight * snr[None, :, None] * d ** 2 / 4 * lost).mean(2).sum(1)       # (F,)
    return (gain / gain.sum()).numpy()


def attribute_loss_curves(generator, n_pairs=256, seed=0):
    """SPEC §7 attribute loss: (curves (F, T) median TV over pairs, loss_times (F,) int)."""
    return loss_curves(factor_distances(generator, n_pairs, seed))


def factor_table(generator, n_pairs=256, seed=0, gammas=(0.1, 1.0)):
    """A text table: each factor, its loss time t_f, median ||x0 - x0'||, its share of z's loss gain for each
    gamma (loss_gain_shares) and its values, sorted by t_f."""
    dist = factor_distances(generator, n_pairs, seed)
    _, loss_times = loss_curves(dist)
    shares = [loss_gain_shares(dist, g) for g in gammas]
    gains = " ".join(f"{f'gain g={g}':>10}" for g in gammas)
    lines = [f"{'factor':<12} {'t_f':>5} {'||dx||':>7} {gains}  values"]
    for f in np.argsort(loss_times, kind="stable"):
        values = ", ".join(generator.value_names[f])
        lines.append(f"{generator.factor_names[f]:<12} {loss_times[f]:>5d} {np.median(dist[f]):>7.3f} "
                     + " ".join(f"{s[f]:>10.3f}" for s in shares) + f"  {values}")
    return "\n".join(lines)


# ---- the exact denoiser: the limit of a perfectly trained DDPM on this data (beyond the paper) --------------
SEPARATE = ("stripe", "corner_mark")   # drawn where only the background also acts: ExactDenoiser sums them apart


def all_labels(generator):
    """Every label vector of the data, the product of the factors' values, the last factor fastest: (N, F)."""
    grids = np.meshgrid(*[np.arange(n) for n in generator.num_values], indexing="ij")
    return np.stack([g.ravel() for g in grids], 1).astype(np.int64)


def all_images(generator):
    """Every image of the data and its labels: ((N, F) labels as all_labels, (N, D) uint8 flattened C, H, W)."""
    labels = all_labels(generator)
    return labels, generator.render(labels).transpose(0, 3, 1, 2).reshape(len(labels), -1)


def pixels_of(grid, axis):
    """Which of the D pixel values (grid (..., D), one axis per factor) change with the factor on `axis`."""
    return np.any(grid != np.take(grid, [0], axis=axis), axis=tuple(range(grid.ndim - 1)))


class ExactDenoiser(torch.nn.Module):
    """eps = E[eps | x_t] under the built-in data (every label vector equally likely, images as stored, uint8),
    in place of the frozen eps_theta (DiTi --exact-eps). A trained DDPM errs most at small t, where z then
    earns more by mending those errors than by restoring what the forward process destroyed; with this one
    z can earn only the latter (SPEC §7). `unet` still gives G its features (unet.eps_and_shift).

    Over the images x0_i, p(i | x_t) ~ exp(-||x_t - sqrt(abar_t) x0_i||^2 / (2 (1 - abar_t))) and
    eps = (x_t - sqrt(abar_t) E[x0 | x_t]) / sqrt(1 - abar_t). The stripe and the corner mark own pixels that
    only the background shares (checked here on every image), so the sum over the N images runs over the
    N / 4 others and the marks' values per background apart: the same posterior, four times cheaper."""

    def __init__(self, unet, generator, rows=256):
        super().__init__()
        self.unet, self.rows = unet, rows
        n, names = generator.num_values, generator.factor_names
        labels, images = all_images(generator)                                             # (N, D) uint8
        grid = images.reshape(*n, -1)                                                      # an axis per factor
        bg, marks = names.index("background"), [names.index(f) for f in SEPARATE]
        own = [pixels_of(grid, f) for f in marks]                                          # (D,) bool each
        for f, pix in zip(marks, own):
            region = grid[..., pix]
            if (own[0] & own[1]).any() or any((region != np.take(region, [0], axis=a)).any()
                                              for a in range(len(n)) if a not in (bg, f)):
                raise ValueError(f"{names[f]}'s pixels are touched by more than the background: no ExactDenoiser")
        to_float = lambda u: torch.from_numpy(np.ascontiguousarray(u)).float() / 127.5 - 1
        rest = ~(own[0] | own[1])
        plain = (labels[:, marks] == 0).all(1)                                  # the images without either mark
        self.register_buffer("rest", to_float(images[plain][:, rest]), persistent=False)         # (N / 4, Dr)
        self.register_buffer("rest_sq", self.rest.pow(2).sum(1), persistent=False)               # ||x0_i||^2
        self.register_buffer("rest_bg", torch.from_numpy(labels[plain, bg]), persistent=False)  # (N / 4,)
        for i, (f, pix) in enumerate(zip(marks, own)):        # (backgrounds, values, Df): the mark's pixels
            index = tuple(slice(None) if a in (bg, f) else 0 for a in range(len(n)))
            self.register_buffer(f"mark{i}", to_float(grid[index][..., pix]), persistent=False)
        self.pixels = [torch.from_numpy(np.flatnonzero(p)) for p in (rest, *own)]
        self.register_buffer("abar", diffusion.linear_schedule().abar.float(), persistent=False)

    def encode(self, x, t):
        return self.unet.encode(x, t)

    def eps_from(self, feats, x, t):
        return self(x, t)

    @torch.no_grad()
    def forward(self, x, t):
        with torch.autocast(x.device.type, enabled=False):
            return torch.cat([self.exact_eps(x[i:i + self.rows].float(), t[i:i + self.rows])
                              for i in range(0, len(x), self.rows)]).to(x.dtype)

    def exact_eps(self, x, t):
        abar = self.abar[t][:, None]                                                       # (B, 1)
        flat = x.flatten(1)                                                                # (B, D)

        def log_lik(pixels, images, sq_norms):   # log q(x_t | x0_i) on some pixels, up to a constant per row: (B, M)
            return (abar.sqrt() * flat[:, pixels] @ images.T - abar / 2 * sq_norms) / (1 - abar)

        rest_px, *mark_px = self.pixels
        tables = [self.mark0, self.mark1]
        marks = [log_lik(px, m.flatten(0, 1), m.flatten(0, 1).pow(2).sum(1)).view(len(x), *m.shape[:2])
                 for px, m in zip(mark_px, tables)]
        # p(the rest of the image | x_t): its own likelihood times each mark's, summed over the mark's values
        rest = log_lik(rest_px, self.rest, self.rest_sq)
        p_rest = (rest + sum(m.logsumexp(2)[:, self.rest_bg] for m in marks)).softmax(1)
        p_bg = torch.zeros(len(x), tables[0].shape[0], device=x.device).index_add_(1, self.rest_bg, p_rest)
        x0 = torch.empty_like(flat)                                                        # E[x0 | x_t]
        x0[:, rest_px] = p_rest @ self.rest
        for px, m, table in zip(mark_px, marks, tables):     # p(background, mark value | x_t) = p(bg) p(value | bg)
            x0[:, px] = (p_bg[:, :, None] * m.softmax(2)).flatten(1) @ table.flatten(0, 1)
        return ((flat - abar.sqrt() * x0) / (1 - abar).sqrt()).view_as(x)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="The built-in data's factor table (16 px: the quick and claims presets).")
    p.add_argument("size", type=int, nargs="?", default=32)
    p.add_argument("fine_loss_time", type=int, nargs="?", default=0, help="train.py dm --fine-loss-time (0 = off)")
    a = p.parse_args()
    print(factor_table(Synthetic(a.size, 0, fine_loss_time=a.fine_loss_time)))
