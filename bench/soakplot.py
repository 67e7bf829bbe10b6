"""The soak's samples as one SVG, drawn by hand (a few polylines need no plotting library): three
panels (fds, threads, RSS), and in each two lines per daemon: its samples while it hosts the VM
(solid) and while it does not (dashed). Each daemon alternates between the two after every
migration, so flat means each of its two lines is flat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WIDTH, PANEL_HEIGHT, MARGIN = 720, 170, 56
COLOURS = {"a": "#1f77b4", "b": "#d62728"}
PANELS = (("fds", "open fds", 1.0), ("threads", "threads (without idle pool)", 1.0), ("rss_kib", "RSS MiB", 1 / 1024))


def hosts(sample: dict[str, Any], daemon: str) -> bool:
    """After an odd migration b hosts the VM (the first goes a -> b), after an even one a."""
    return (sample["migration"] % 2 == 1) == (daemon == "b")


def _panel(samples: list[dict[str, Any]], key: str, title: str, scale: float, top: int) -> list[str]:
    series = {
        (daemon, hosting): [(i, s[daemon][key] * scale) for i, s in enumerate(samples) if hosts(s, daemon) == hosting]
        for daemon in COLOURS
        for hosting in (True, False)
    }
    everything = [v for points in series.values() for _, v in points]
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
    for (daemon, hosting), points in series.items():
        if not points:
            continue
        line = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in points)
        dash = "" if hosting else ' stroke-dasharray="5,3"'
        out.append(f'<polyline points="{line}" fill="none" stroke="{COLOURS[daemon]}" stroke-width="1.5"{dash}/>')
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
        f'<tspan fill="{COLOURS["a"]}">daemon a</tspan>, <tspan fill="{COLOURS["b"]}">daemon b</tspan>; '
        "solid: hosting the VM, dashed: not</text>"
    )
    body.append("</svg>")
    path.write_text("\n".join(body) + "\n")
