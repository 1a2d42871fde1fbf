"""Render a stored (executed) notebook as a self-contained HTML page, open it in headless
Chromium and check that its outputs are drawn, as a reader's viewer shows them.

    apt-get install chromium
    python benchmarks/screenshot_notebook.py notebooks/04_patching.ipynb [--out /tmp/nb_shot]

Markdown and code cells are shown as text; outputs as stored: HTML tables, text, and plotly
figures (stored as plotly JSON) drawn with plotly.js inlined from the installed plotly package
(nothing is fetched). Exits non-zero unless every stored figure is drawn (a ``js-plotly-plot``).
"""

import argparse
import html
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from screenshot_report import chromium  # noqa: E402

PLOTLY = "application/vnd.plotly.v1+json"


def to_html(path: Path) -> tuple[str, int]:
    import nbformat
    from plotly.offline import get_plotlyjs

    nb = nbformat.read(path, as_version=4)
    parts, n_fig = [f"<h1>{html.escape(path.name)}</h1>"], 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(f"<div class='md'>{html.escape(cell.source)}</div>")
            continue
        parts.append(f"<pre class='code'>[{cell.get('execution_count')}] "
                     f"{html.escape(cell.source)}</pre>")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if out["output_type"] == "stream":
                parts.append(f"<pre class='out'>{html.escape(out['text'])}</pre>")
            elif PLOTLY in data:
                fig = data[PLOTLY]
                parts.append(f"<div id='fig{n_fig}'></div><script>Plotly.newPlot('fig{n_fig}', "
                             f"{json.dumps(fig.get('data', []))}, "
                             f"{json.dumps(fig.get('layout', {}))});</script>")
                n_fig += 1
            elif "text/html" in data:
                parts.append(f"<div class='out'>{data['text/html']}</div>")
            elif "text/plain" in data:
                parts.append(f"<pre class='out'>{html.escape(data['text/plain'])}</pre>")
            elif out["output_type"] == "error":
                parts.append(f"<pre class='err'>{html.escape(out['ename'])}: "
                             f"{html.escape(out['evalue'])}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto}"
             ".md{white-space:pre-wrap;margin:1em 0}.code{background:#f4f4f4;padding:6px}"
             ".out{margin:4px 0 12px 0}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>{''.join(parts)}</body></html>")
    return page, n_fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/nb_shot"))
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    page_html, n_fig = to_html(args.notebook)
    page = (args.out / f"{args.notebook.stem}.html").resolve()
    page.write_text(page_html, encoding="utf-8")
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=15000", f"--window-size=1200,{args.height}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         check=True).stdout
    shot = args.out / f"{args.notebook.stem}.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, check=True)
    rendered = len(re.findall(r'class="[^"]*js-plotly-plot', dom))
    print(f"{args.notebook.name}: {rendered} of {n_fig} figures drawn; screenshot {shot}")
    if rendered != n_fig or not shot.exists():
        sys.exit(1)


if __name__ == "__main__":
    main()
