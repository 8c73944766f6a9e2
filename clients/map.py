"""`shmheap map`: the segment drawn page by page, in the manner of Sysinternals VMMap.

Each cell stands for N pages (the scale, chosen to fit the width, or `--pages-per-cell`) and
shows what most of them are, committed before reserved before free: a letter per type,
upper case committed, lower case reserved, "." free. In colour on a terminal, plain text
when piped; `--output map.svg` draws the same cells as an SVG file. The legend counts pages
exactly, whatever the scale. The map spans the segment from its first usable page to the end
of its last region; the free space beyond is counted, not drawn.
"""

import argparse
import math
import sys
from xml.sax.saxutils import escape

import shmheap

from .cli import SOCKET_HELP, positive

# region kind -> letter; a file section's pages are the file's ("F"), never tmpfs's
TYPES = {"private": "P", "heap": "H", "global": "G", "section": "S", "file": "F"}
COLOURS = {"P": (46, 134, 193), "H": (39, 174, 96), "G": (211, 84, 0), "S": (142, 68, 173), "F": (192, 57, 43)}
FREE = "."


def tally(page_map, pages_per_cell=None, cells=2048):
    """(cells, scale, counts): one letter per cell; the pages each stands for; the exact
    page count of every (type, state), and of free pages drawn and beyond."""
    page = page_map["page_size"]
    start, end = page_map["start"], page_map["end"]
    regions = page_map["regions"]
    span_end = max((base + size for base, size, *_ in regions), default=start)
    span_pages = max(1, -(-(span_end - start) // page))
    scale = pages_per_cell or max(1, math.ceil(span_pages / cells))
    weights = [dict() for _ in range(-(-span_pages // scale))]  # cell -> {letter: pages}
    counts = {}
    used = 0
    for base, size, owner, kind, runs in regions:
        letter = TYPES.get(kind, "P")
        first_page = (base - start) // page
        for first, stop, committed in runs:
            symbol = letter if committed else letter.lower()
            counts[symbol] = counts.get(symbol, 0) + (stop - first)
            used += stop - first
            page_no = first_page + first
            while page_no < first_page + stop:
                cell = page_no // scale
                take = min(first_page + stop, (cell + 1) * scale) - page_no
                weights[cell][symbol] = weights[cell].get(symbol, 0) + take
                page_no += take
    counts[FREE] = (end - start) // page - used
    drawn = []
    for weight in weights:
        committed = {s: n for s, n in weight.items() if s.isupper()}
        pick = committed or weight
        drawn.append(max(pick, key=pick.get) if pick else FREE)
    return drawn, scale, counts


def legend(counts, page):
    lines = []
    for letter, kind in ((v, k) for k, v in TYPES.items()):
        for symbol, state in ((letter, "committed"), (letter.lower(), "reserved")):
            if counts.get(symbol):
                lines.append((symbol, f"{kind} {state}", counts[symbol], counts[symbol] * page))
    lines.append((FREE, "free", counts[FREE], counts[FREE] * page))
    return lines


def _ansi(symbol):
    if symbol == FREE:
        return "\033[90m.\033[0m"
    r, g, b = COLOURS[symbol.upper()]
    if symbol.islower():  # reserved: the colour, faded
        r, g, b = (255 + r) // 2, (255 + g) // 2, (255 + b) // 2
    return f"\033[48;2;{r};{g};{b}m\033[30m{symbol}\033[0m"


def render_text(drawn, scale, counts, page, width=64, colour=False):
    lines = [f"shmheap map: one cell = {scale} pages ({scale * page:,} bytes); {width} cells a row"]
    for row in range(0, len(drawn), width):
        cells = drawn[row:row + width]
        lines.append("".join(_ansi(c) if colour else c for c in cells))
    lines.append("")
    for symbol, label, pages, size in legend(counts, page):
        lines.append(f"  {_ansi(symbol) if colour else symbol}  {label:<20} {pages:>12,} pages {size:>16,} bytes")
    return lines


def render_svg(drawn, scale, counts, page, width=64, cell=10):
    rows = -(-len(drawn) // width)
    entries = legend(counts, page)
    height = rows * cell + 30 + 18 * len(entries)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * cell + 20}" height="{height + 20}"'
             f' font-family="monospace" font-size="12">',
             f'<title>shmheap map: one cell = {scale} pages</title>']
    for i, symbol in enumerate(drawn):
        x, y = 10 + (i % width) * cell, 10 + (i // width) * cell
        if symbol == FREE:
            fill, opacity = "#eeeeee", "1"
        else:
            r, g, b = COLOURS[symbol.upper()]
            fill, opacity = f"rgb({r},{g},{b})", "1" if symbol.isupper() else "0.4"
        parts.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{fill}"'
                     f' fill-opacity="{opacity}" data-symbol="{escape(symbol)}"/>')
    y = 10 + rows * cell + 20
    parts.append(f'<text x="10" y="{y}">one cell = {scale} pages ({scale * page:,} bytes)</text>')
    for symbol, label, pages, size in entries:
        y += 18
        parts.append(f'<text x="10" y="{y}" data-symbol="{escape(symbol)}" data-pages="{pages}">'
                     f'{escape(symbol)}  {escape(label)}: {pages:,} pages, {size:,} bytes</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap map", description=__doc__.splitlines()[0])
    parser.add_argument("--pages-per-cell", type=positive(int), help="the scale (default: fit about 2048 cells)")
    parser.add_argument("--width", type=positive(int), default=64, help="cells a row")
    parser.add_argument("--output", metavar="PATH", help="also draw it as an SVG file")
    parser.add_argument("--socket", help=SOCKET_HELP)
    args = parser.parse_args(argv)
    try:
        with shmheap.connect(args.socket, autostart=False) as client:
            page_map = client.page_map()
        drawn, scale, counts = tally(page_map, args.pages_per_cell)
        page = page_map["page_size"]
        print("\n".join(render_text(drawn, scale, counts, page, args.width, colour=sys.stdout.isatty())))
        if args.output:
            with open(args.output, "w") as f:
                f.write(render_svg(drawn, scale, counts, page, args.width))
    except shmheap.ShmheapError as exc:
        print(f"shmheap map: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"shmheap map: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
