"""The report's plot helpers: a named PNG (:class:`Plot`), matplotlib-safe text, a readable
log-seconds axis.  matplotlib is imported by the callers, inside the functions that draw."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Plot:
    name: str  # file stem, e.g. "robust_vs_eps"
    title: str
    png: bytes


def plot_text(text: str) -> str:
    """``text`` for a matplotlib label: ``$`` escaped, so a name is never parsed as math text."""
    return str(text).replace("$", r"\$")


def seconds_axis(ax, seconds: Sequence[float]) -> None:
    """A log-scale x axis for ``seconds`` with readable ticks: whole decades only, at most
    :data:`MAX_TICKS` of them, labelled as plain numbers (``0.01``, ``1``, ``100``), no labels on
    minor ticks (matplotlib labels those when the data span less than a decade, and the long
    ``2×10⁻¹``-style labels then run into each other); the limits cover whole decades, so at least
    two ticks are labelled.  Linear when no value is positive."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in seconds if v > 0 and math.isfinite(v)]
    if not positive:
        return
    low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    high = max(high, low + 1)
    ax.set_xscale("log")
    ax.set_xlim(10.0**low, 10.0**high)
    step = max(1, math.ceil((high - low) / (MAX_TICKS - 1)))
    ax.xaxis.set_major_locator(FixedLocator([10.0**e for e in range(low, high + 1, step)]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10)), numticks=100))
    ax.xaxis.set_minor_formatter(NullFormatter())


MAX_TICKS = 6  # labelled decades on the seconds axis


def to_png(fig, plt) -> bytes:
    """``fig`` as PNG bytes (laid out tight, 100 dpi); the figure is closed."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
