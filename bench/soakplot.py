"""The soak's samples as one SVG (three panels: fds, threads, RSS; a line per daemon), drawn by
hand: a few polylines need no plotting library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WIDTH, PANEL_HEIGHT, MARGIN = 720, 170, 56
COLOURS = {"a": "#1f77b4", "b": "#d62728"}
PANELS = (("fds", "open fds", 1.0), ("threads", "threads (without idle pool)", 1.0), ("rss_kib", "RSS MiB", 1 / 1024))


def _panel(samples: list[dict[str, Any]], key: str, title: str, scale: float, top: int) -> list[str]:
    values = {d: [s[d][key] * scale for s in samples] for d in COLOURS}
    everything = [v for series in values.values() for v in series]
    low, high = min(everything), max(everything)
    if high - low < 1e-9:
        low, high = low - 1, high + 1
    pad = (high - low) * 0.1
    low, high = low - pad, high + pad
    plot_w, plot_h = WIDTH - 2 * MARGIN, PANEL_HEIGHT - 50
    count = max(len(samples) - 1, 1)

    def x(i: int) -> float:
        return MARGIN + plot_w * i / count

    def y(v: float) -> float:
        return top + 25 + plot_h * (1 - (v - low) / (high - low))

    out = [
        f'<text x="{MARGIN}" y="{top + 16}" font-size="13">{title}</text>',
        f'<rect x="{MARGIN}" y="{top + 25}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
        f'<text x="{MARGIN - 6}" y="{y(high - pad) + 4:.1f}" font-size="10" text-anchor="end">{high - pad:.0f}</text>',
        f'<text x="{MARGIN - 6}" y="{y(low + pad) + 4:.1f}" font-size="10" text-anchor="end">{low + pad:.0f}</text>',
    ]
    for daemon, series in values.items():
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(series))
        out.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS[daemon]}" stroke-width="1.5"/>')
    return out


def write_svg(path: Path, samples: list[dict[str, Any]]) -> None:
    if not samples:
        raise ValueError("no samples to plot")
    height = PANEL_HEIGHT * len(PANELS) + 40
    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
    ]
    for n, (key, title, scale) in enumerate(PANELS):
        body += _panel(samples, key, title, scale, n * PANEL_HEIGHT)
    legend_y = height - 14
    body.append(
        f'<text x="{MARGIN}" y="{legend_y}" font-size="11">after each of {len(samples)} migrations: '
        f'<tspan fill="{COLOURS["a"]}">daemon a</tspan>, <tspan fill="{COLOURS["b"]}">daemon b</tspan></text>'
    )
    body.append("</svg>")
    path.write_text("\n".join(body) + "\n")
