"""bench.png: steady images/s per engine as bars, the ceiling drawn across them."""

from __future__ import annotations


def chart(result: dict, path: str) -> None:
    """bench.png: steady images/s per engine as horizontal bars, the ceiling drawn as a line across.

    decode is left out of the bars (it is ~20× faster than any forward pass and would flatten them) and
    named in the title instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = result["engines"]
    names = [n for n in eng if n != "decode"][::-1]  # barh draws bottom-up: keep the bench's order top-down
    rates = [eng[n]["steady_img_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, rates, color=["#999999" if n.startswith("ceiling") else "#3b75af" for n in names])
    ax.bar_label(bars, fmt="%.1f", padding=3)
    if "ceiling" in eng:
        ax.axvline(eng["ceiling"]["steady_img_per_s"], color="#c44e52", linestyle="--", linewidth=1, label="ceiling")
        ax.legend(loc="center right")
    ax.set_xlim(0, max(rates, default=1) * 1.35)  # room for the labels and the legend
    ax.set_xlabel("steady images / s")
    title = f"m9 bench: {result['images']} images, {result['machine']['cores']} cores"
    if "decode" in eng:
        title += f" (decode alone: {eng['decode']['steady_img_per_s']:.0f} images/s)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
