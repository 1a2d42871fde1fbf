"""Open the HTML report in headless Chromium and check that every figure rendered.

    apt-get install chromium                              # Debian's package
    python benchmarks/screenshot_report.py [--out /tmp/report_shot]

Builds the report of the ``longtail`` organism on 32 of its evaluation pairs with the
``tl-reward report`` command, then asks Chromium (no network: the page is self-contained) for
the page's DOM after its scripts ran and for a full-page screenshot. Exits non-zero unless the
DOM holds one drawn plotly figure (a ``js-plotly-plot`` div) per figure of the report.
"""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no Chromium found: apt-get install chromium")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/report_shot"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from tl_reward import organisms

    pairs = args.out / "pairs.jsonl"
    organisms.dataset("longtail").sample(32, seed=0).to_jsonl(pairs)
    subprocess.run([sys.executable, "-m", "tl_reward.cli", "report", "longtail", "--pairs",
                    str(pairs), "--out", str(args.out)], check=True)
    page = (args.out / "report.html").resolve()
    n_figures = page.read_text().count("Plotly.newPlot")

    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=15000", "--window-size=1200,3800"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         check=True).stdout
    shot = args.out / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, check=True)
    # plotly adds js-plotly-plot to a figure's div once it has drawn it
    rendered = len(re.findall(r'class="[^"]*js-plotly-plot', dom))
    print(f"{rendered} of {n_figures} figures rendered; screenshot {shot}")
    if rendered != n_figures or not shot.exists():
        sys.exit(1)


if __name__ == "__main__":
    main()
