"""Pictures with pillow alone: image grids, line plots, bar charts, heat maps and the TV_t curves of the built-in
data's factors, each written as a PNG."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def save_grid(images, path, nrow=8, pad=2):
    """images: uint8 (N, H, W, 3) -> one PNG with nrow images per row."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    Image.fromarray(canvas).save(path)
    return path


def _frame(title, xlabel, ylabel, size=(640, 420), margin=(60, 30, 20, 45)):
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = margin
    box = (left, top, size[0] - right, size[1] - bottom)
    draw.rectangle(box, outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text(((box[0] + box[2]) // 2 - 3 * len(xlabel), size[1] - 18), xlabel, fill="black")
    draw.text((4, top - 14), ylabel, fill="black")
    return img, draw, box


def line_plot(xs, series, labels, path, title="", xlabel="", ylabel="", ylim=None):
    """series: list of 1-D arrays over xs, one line each, with a legend."""
    xs = np.asarray(xs, float)
    ys = [np.asarray(s, float) for s in series]
    lo, hi = ylim or (min(np.nanmin(y) for y in ys), max(np.nanmax(y) for y in ys))
    hi = hi if hi > lo else lo + 1
    img, draw, (x0, y0, x1, y1) = _frame(title, xlabel, ylabel, size=(760, 420), margin=(60, 30, 200, 45))
    px = lambda x: x0 + (x - xs[0]) / max(xs[-1] - xs[0], 1e-12) * (x1 - x0)
    py = lambda y: y1 - (y - lo) / (hi - lo) * (y1 - y0)
    for frac in (0, 0.5, 1):
        draw.text((4, py(lo + frac * (hi - lo)) - 6), f"{lo + frac * (hi - lo):.3g}", fill="black")
        draw.text((px(xs[0] + frac * (xs[-1] - xs[0])) - 10, y1 + 4), f"{xs[0] + frac * (xs[-1] - xs[0]):.0f}",
                  fill="black")
    for i, (y, label) in enumerate(zip(ys, labels)):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(v)) for x, v in zip(xs, y) if np.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        draw.line([(x1 + 10, y0 + 8 + 16 * i), (x1 + 30, y0 + 8 + 16 * i)], fill=colour, width=3)
        draw.text((x1 + 35, y0 + 2 + 16 * i), str(label), fill="black")
    img.save(path)
    return path


def bar_plot(values, labels, path, title="", xlabel="", ylabel=""):
    """One bar per value; labels under the bars (thinned when many)."""
    values = np.nan_to_num(np.asarray(values, float))
    img, draw, (x0, y0, x1, y1) = _frame(title, xlabel, ylabel)
    hi = max(values.max(), 1e-12)
    w = (x1 - x0) / len(values)
    every = max(1, len(values) // 10)
    for i, v in enumerate(values):
        draw.rectangle((x0 + i * w + 1, y1 - v / hi * (y1 - y0), x0 + (i + 1) * w - 1, y1), fill=PALETTE[0])
        if i % every == 0:
            draw.text((x0 + i * w, y1 + 4), str(labels[i]), fill="black")
    draw.text((4, y0 - 2), f"{hi:.3g}", fill="black")
    draw.text((4, y1 - 10), "0", fill="black")
    img.save(path)
    return path


def heatmap(matrix, row_labels, col_labels, path, title="", vmin=0.0, vmax=1.0, cell=36):
    """A (rows x cols) matrix as coloured cells (white = vmin, dark blue = vmax) with the values written in."""
    m = np.asarray(matrix, float)
    left, top = 10 + 7 * max(len(str(r)) for r in row_labels), 40
    img = Image.new("RGB", (left + cell * m.shape[1] + 10, top + cell * m.shape[0] + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 6), title, fill="black")
    for j, c in enumerate(col_labels):
        draw.text((left + j * cell + 4, top - 14), str(c), fill="black")
    for i, r in enumerate(row_labels):
        draw.text((4, top + i * cell + cell // 2 - 6), str(r), fill="black")
        for j in range(m.shape[1]):
            v = m[i, j]
            f = 0.0 if not np.isfinite(v) else float(np.clip((v - vmin) / max(vmax - vmin, 1e-12), 0, 1))
            colour = tuple(int(255 - f * (255 - c)) for c in (8, 48, 107))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour)
            text = "nan" if not np.isfinite(v) else f"{v:.2f}"
            draw.text((box[0] + 3, box[1] + cell // 2 - 6), text, fill="white" if f > 0.5 else "black")
    img.save(path)
    return path


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # pillow without FreeType sizes
        return ImageFont.load_default()


def plot_tv_curves(curves, names, path, loss_times=None):
    """Write a PNG of TV_t (y, 0..1) against t (x, 0..999), one line per factor, legend with t_f."""
    curves = np.asarray(curves)
    if loss_times is None:
        loss_times = [int(np.argmax(c < 0.5)) if (c < 0.5).any() else len(c) for c in curves]
    W, H, left, right, top, bottom = 960, 560, 70, 250, 40, 60
    img = Image.new("RGB", (W, H), "white")
    draw, font = ImageDraw.Draw(img), _font(14)
    pw, ph, T = W - left - right, H - top - bottom, curves.shape[1]

    def xy(t, v):
        return left + pw * t / (T - 1), top + ph * (1 - v)

    for t in [*range(0, T - 50, 100), T - 1]:          # x grid and ticks: 0, 100, ..., 900, 999
        x, _ = xy(t, 0)
        draw.line([(x, top), (x, top + ph)], fill=(230, 230, 230))
        draw.text((x, top + ph + 6), str(t), fill="black", font=font, anchor="mt")
    for v in (0, 0.25, 0.5, 0.75, 1.0):               # y grid and ticks
        _, y = xy(0, v)
        draw.line([(left, y), (left + pw, y)], fill=(200, 200, 200) if v == 0.5 else (230, 230, 230))
        draw.text((left - 8, y), f"{v:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text((left + pw / 2, H - 18), "t", fill="black", font=font, anchor="mm")
    draw.text((left, top - 14), "median TV(q(x_t|x0), q(x_t|x0')) for pairs differing in one factor",
              fill="black", font=font, anchor="lm")
    order = np.argsort(loss_times, kind="stable")
    for rank, f in enumerate(order):
        colour = PALETTE[rank % len(PALETTE)]
        draw.line([xy(t, curves[f, t]) for t in range(T)], fill=colour, width=2)
        ly = top + 10 + 22 * rank
        draw.line([(left + pw + 15, ly), (left + pw + 40, ly)], fill=colour, width=3)
        draw.text((left + pw + 48, ly), f"{names[f]} (t_f={loss_times[f]})", fill="black", font=font, anchor="lm")
    img.save(path)
    return path
