#!/usr/bin/env python3
"""Draws docs/performance.svg from the peer tables of docs/performance.md (standard library only).

Usage: python3 docs/plot_performance.py [OUTPUT.svg]   (default: performance.svg beside this file)

The figures below are copied from docs/performance.md ("Against the peers", one table per machine
kind); update both together. Times are medians in milliseconds, float32, 2 threads.
"""
import math
import sys
from pathlib import Path

JOBS = ["4096x4096 r=16", "4096x4096 r=64", "4096x4096 r=128",
        "11008x4096 r=16", "11008x4096 r=128", "4096x4096 r=16 niter=16"]

# (series name, colour); every panel has a value per job for each series.
SERIES = [("pissa (reused object)", "#1f77b4"),
          ("pissa (fused option)", "#6baed6"),
          ("torch.svd_lowrank", "#d62728"),
          ("sklearn randomized_svd", "#ff9896")]

PANELS = [
    ("AMD EPYC Zen 5 VM, 2 cores (peers' OpenBLAS kernel not recorded)", [
        [39.9, 102.7, 196.4, 98.7, 520.9, 120.5],
        [38.7, 113.6, 211.7, 156.7, 576.9, 92.3],
        [94.1, 211.9, 424.7, 244.7, 1023.2, 347.3],
        [97.4, 226.6, 394.9, 254.1, 1066.5, 401.7],
    ]),
    ("Intel Xeon Emerald Rapids VM, 2 cores (peers on OpenBLAS SkylakeX)", [
        [63.2, 175.4, 351.1, 172.0, 875.4, 232.2],
        [47.5, 156.7, 326.3, 133.4, 773.3, 185.2],
        [124.1, 222.1, 386.4, 352.9, 1001.4, 383.8],
        [116.5, 192.6, 377.4, 363.2, 999.8, 352.4],
    ]),
]

LO, HI = 20.0, 2000.0          # log-scale axis range, ms
TICKS = [20, 50, 100, 200, 500, 1000, 2000]
LEFT, RIGHT, BAR, GAP, TOP = 175, 30, 7, 10, 40
PLOT_W = 480
WIDTH = LEFT + PLOT_W + RIGHT


def x_of(ms):
    return LEFT + PLOT_W * (math.log10(ms) - math.log10(LO)) / (math.log10(HI) - math.log10(LO))


def esc(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def panel(y0, title, values):
    out = [f'<text x="10" y="{y0}" font-weight="bold">{esc(title)}</text>']
    group_h = len(SERIES) * BAR + GAP
    top = y0 + 10
    bottom = top + len(JOBS) * group_h
    for t in TICKS:
        x = x_of(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" fill="#555">{t}</text>')
    for j, job in enumerate(JOBS):
        gy = top + j * group_h
        out.append(f'<text x="{LEFT - 6}" y="{gy + 2 * BAR + 3}" text-anchor="end">{esc(job)}</text>')
        for s, (_, colour) in enumerate(SERIES):
            v = values[s][j]
            y = gy + s * BAR
            out.append(f'<rect x="{LEFT}" y="{y}" width="{x_of(v) - LEFT:.1f}" height="{BAR - 1}" fill="{colour}">'
                       f'<title>{esc(SERIES[s][0])}: {v} ms</title></rect>')
    out.append(f'<text x="{LEFT + PLOT_W / 2}" y="{bottom + 30}" text-anchor="middle" fill="#555">'
               'time per decomposition, ms (log scale; niter 4 unless noted)</text>')
    return out, bottom + 50


def main():
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("performance.svg")
    body = [f'<text x="10" y="20" font-size="14" font-weight="bold">'
            'Randomized truncated SVD, float32: pissa against torch and sklearn</text>']
    y = TOP + 10
    for title, values in PANELS:
        part, y = panel(y, title, values)
        body += part
    for s, (name, colour) in enumerate(SERIES):
        lx = LEFT + (s % 2) * 240
        ly = y + (s // 2) * 16
        body.append(f'<rect x="{lx}" y="{ly - 9}" width="12" height="9" fill="{colour}"/>')
        body.append(f'<text x="{lx + 18}" y="{ly}">{esc(name)}</text>')
    height = y + 30
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>'] + body + ["</svg>"]
    target.write_text("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
