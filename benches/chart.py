#!/usr/bin/env python3
"""Draws the requests/s of one load.sh run as an SVG bar chart, one group per path.

    bash benches/load.sh > run.txt
    python3 benches/chart.py run.txt > benches/load.svg

Reads the summary tables load.sh prints ("### /path" headings, then one "| target |
req/s | ..." row per target) and writes the chart to standard output. Standard
library only, so it runs wherever the load script does.
"""

import re
import sys
from html import escape

# Targets in the order the chart shows them, with their bar colours; others are
# drawn in grey after these.
TARGETS = [
    ("nginx", "#7f8c8d"),
    ("haproxy", "#95a5a6"),
    ("nginx-lua", "#b07aa1"),
    ("caddy", "#e8a33d"),
    ("caddy-auth", "#d35400"),
    ("gw-empty", "#4e79a7"),
    ("gw-chain", "#1f4e79"),
    ("gw-css", "#76b7b2"),
    ("gw-empty-shard", "#59a14f"),
    ("gw-chain-shard", "#2e6b30"),
    ("gw-empty-pgo", "#9c755f"),
    ("gw-chain-pgo", "#6b4c3b"),
]
LABELS = {
    "nginx-lua": "nginx + Lua key check",
    "caddy-auth": "Caddy + forward_auth",
    "gw-empty": "Gatewarden, no plugins",
    "gw-chain": "Gatewarden, full chain",
    "gw-css": "Gatewarden, css_inject",
    "gw-empty-shard": "Gatewarden shards, no plugins",
    "gw-chain-shard": "Gatewarden shards, full chain",
    "gw-empty-pgo": "Gatewarden PGO, no plugins",
    "gw-chain-pgo": "Gatewarden PGO, full chain",
}


def read_tables(text):
    """{path: {target: req/s}} from load.sh's summary."""
    tables, path = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            # A path's table, or a workload's, which is not drawn.
            heading = re.match(r"^### (/\S+)", line)
            path = heading.group(1) if heading else None
            if path:
                tables[path] = {}
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if path and len(cells) > 2 and cells[1].isdigit():
            tables[path][cells[0]] = int(cells[1])
    return {p: t for p, t in tables.items() if t}


def chart(tables):
    colours = dict(TARGETS)
    order = [t for t, _ in TARGETS]
    seen = {t for table in tables.values() for t in table if t != "direct"}
    targets = [t for t in order if t in seen] + sorted(seen - set(order))
    top = max(v for table in tables.values() for t, v in table.items() if t in seen)
    step = 10 ** (len(str(top)) - 1)
    top = (top // step + 1) * step
    bar, gap, left, height = 14, 28, 70, 300
    group = bar * len(targets) + gap
    width = left + group * len(tables) + 240
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 80}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="{left}" y="18" font-size="14">Requests per second, one run of '
        "benches/load.sh (higher is better)</text>",
    ]
    base = height + 30
    for i in range(6):
        value = top * i // 5
        y = base - height * i / 5
        out.append(f'<line x1="{left}" x2="{left + group * len(tables)}" y1="{y}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{value:,}</text>')
    for g, (path, table) in enumerate(tables.items()):
        x0 = left + g * group + gap / 2
        for i, target in enumerate(targets):
            if target not in table:
                continue
            h = height * table[target] / top
            out.append(
                f'<rect x="{x0 + i * bar}" y="{base - h:.1f}" width="{bar - 2}" height="{h:.1f}" '
                f'fill="{colours.get(target, "#bbb")}"><title>{escape(target)} {path}: '
                f"{table[target]:,} req/s</title></rect>"
            )
        out.append(f'<text x="{x0 + bar * len(targets) / 2}" y="{base + 18}" text-anchor="middle">{escape(path)}</text>')
    legend_x = left + group * len(tables) + 20
    for i, target in enumerate(targets):
        y = 40 + i * 20
        out.append(f'<rect x="{legend_x}" y="{y}" width="12" height="12" fill="{colours.get(target, "#bbb")}"/>')
        out.append(f'<text x="{legend_x + 18}" y="{y + 10}">{escape(LABELS.get(target, target))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        tables = read_tables(f.read())
    if not tables:
        sys.exit(f"{sys.argv[1]}: no load.sh summary tables found")
    sys.stdout.write(chart(tables))


if __name__ == "__main__":
    main()
