"""The report's figures, drawn with matplotlib (no display) into PNG bytes: the scree plot, PC1 x PC2, query
images beside their nearest neighbours, kNN accuracy and recall, and the largest duplicate groups."""

from __future__ import annotations

import io

import numpy as np

from m9.stages import contract

#: Side in pixels of each thumbnail in the neighbours and duplicates figures.
THUMB_PX = 96

#: Labels given their own legend entry in the scatter; past this a legend hides the points.
LEGEND_MAX_LABELS = 20


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)  # pyplot keeps every figure it made until closed
    return buf.getvalue()


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")  # no display: the figures only become PNGs
    import matplotlib.pyplot as plt

    return plt.figure(*args, **kwargs)


def scree(variance: dict) -> bytes:
    """Explained variance per component (bars) and its running sum (line) with the 90/95/99 % marks."""
    ratios = np.asarray(variance["explained_variance_ratio"])
    cumulative = np.asarray(variance["cumulative"])
    ks = np.arange(1, len(ratios) + 1)
    fig = _figure(figsize=(8, 4))
    ax = fig.add_subplot()
    ax.bar(ks, ratios, color="#4c72b0", label="explained by each component")
    ax.set_xlabel("component")
    ax.set_ylabel("share of the variance")
    ax2 = ax.twinx()
    ax2.plot(ks, cumulative, color="#dd8452", marker=".", label="cumulative")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative share")
    for label, k in variance.get("smallest_k_reaching", {}).items():
        share = float(label.rstrip("%")) / 100
        ax2.axhline(share, color="grey", linestyle=":", linewidth=1)
        text = f"{label} at k={k}" if k else f"{label} not reached by k={len(ratios)}"
        ax2.annotate(text, (1, share), xytext=(2, 2), textcoords="offset points", fontsize=8, color="dimgrey")
        if k:
            ax2.axvline(k, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"PCA: {len(ratios)} components explain {100 * cumulative[-1]:.1f} % of the variance")
    return _png(fig)


def scatter(xy: np.ndarray, point_labels: np.ndarray, sampled: bool) -> bytes:
    """PC1 x PC2 of (a sample of) the images, one colour per label."""
    import matplotlib

    point_labels = np.array(["(none)" if v is None else str(v) for v in point_labels], dtype=object)
    labels = sorted(set(point_labels))
    colours = matplotlib.colormaps["tab20"]
    fig = _figure(figsize=(8, 6))
    ax = fig.add_subplot()
    for i, label in enumerate(labels):
        mask = point_labels == label
        ax.scatter(xy[mask, 0], xy[mask, 1], s=8, color=colours(i % 20), label=label, alpha=0.8)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    title = f"PC1 x PC2, coloured by label ({len(xy)} images"
    ax.set_title(title + (", a random sample)" if sampled else ")"))
    if len(labels) <= LEGEND_MAX_LABELS:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    return _png(fig)


def thumbnail(content: bytes) -> np.ndarray:
    """An image's bytes as an RGB array of at most THUMB_PX on each side, upright."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(content)) as opened:
        im = ImageOps.exif_transpose(opened).convert("RGB")
        im.thumbnail((THUMB_PX, THUMB_PX))
        return np.asarray(im)


def _mosaic(rows: list[list[tuple]], cols: int) -> bytes:
    """Rows of (thumbnail or None, caption, frame colour, caption colour; colours as 0–255 RGB) cells as one
    image drawn once: 36 separate axes would cost seconds of matplotlib layout."""
    cell, pad, top = THUMB_PX + 8, 4, 18
    mosaic = np.full((len(rows) * (cell + top), cols * cell, 3), 255, np.uint8)
    captions = []
    for r, row in enumerate(rows):
        for c, (image, caption, colour, text_colour) in enumerate(row):
            y, x = r * (cell + top) + top, c * cell
            mosaic[y : y + cell - pad, x : x + cell - pad] = colour  # the frame
            if image is not None:
                h, w = image.shape[:2]
                oy, ox = y + (cell - pad - h) // 2, x + (cell - pad - w) // 2
                mosaic[oy : oy + h, ox : ox + w] = image[..., :3]
            captions.append((x + (cell - pad) / 2, y - 3, caption, np.array(text_colour) / 255))
    fig = _figure(figsize=(mosaic.shape[1] / 100, mosaic.shape[0] / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest")
    for cx, cy, text, rgb in captions:
        ax.text(cx, cy, text, ha="center", va="bottom", fontsize=6, color=rgb)
    ax.set_axis_off()
    return _png(fig)


def neighbours(rows: list[dict], cols: int) -> bytes:
    """Each query image (left, black) beside its nearest neighbours in the PCA space: green the same label,
    red another; rows' "images" are (thumbnail, label, distance)."""
    cells = []
    for row in rows:
        query = row["images"][0][1]
        line = []
        for c, (image, label, distance) in enumerate(row["images"]):
            colour = (0, 0, 0) if c == 0 else ((0, 150, 0) if label == query else (210, 0, 0))
            name = str(label) if len(str(label)) <= 16 else str(label)[:15] + "…"
            line.append((image, ("query: " if c == 0 else f"{distance:.1f}: ") + name, colour, colour))
        cells.append(line)
    return _mosaic(cells, cols)


def groups(rows: list[dict], per_row: int) -> bytes:
    """One duplicate group per row, its representative first (black frame), the others grey; rows' "images"
    are (thumbnail, caption, 0.0 for the representative else 1.0). Captions in black."""
    return _mosaic(
        [
            [
                (image, caption, (120, 120, 120) if other else (0, 0, 0), (0, 0, 0))
                for image, caption, other in row["images"]
            ]
            for row in rows
        ],
        per_row,
    )


def evaluation(result: dict) -> bytes:
    """kNN accuracy per space, and recall per label in the PCA (else full) space."""
    pca, full, raw = contract.SPACES
    names = {pca: f"PCA-{result['dims'].get(pca)}", full: f"full {result['dims'][full]}-d", raw: "raw 28x28"}
    space = pca if pca in result["spaces"] else full
    recall = result["spaces"][space]["recall"]
    fig = _figure(figsize=(10, min(12, max(3.5, 0.13 * len(recall)))))
    ax = fig.add_subplot(1, 3, 1)
    spaces = [s for s in contract.SPACES if s in result["accuracy"]]
    bars = ax.bar([names[s] for s in spaces], [result["accuracy"][s] for s in spaces], color="#55a868")
    ax.bar_label(bars, labels=[f"{100 * result['accuracy'][s]:.1f} %" for s in spaces], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{result['neighbors']}-NN accuracy", fontsize=9)
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    ax = fig.add_subplot(1, 3, (2, 3))
    order = sorted(recall, key=lambda label: recall[label])
    ax.barh(order, [recall[label] for label in order], color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_title(f"recall per label ({names[space]})", fontsize=9)
    fig.subplots_adjust(wspace=0.9)  # room for the label names between the two charts
    return _png(fig)
