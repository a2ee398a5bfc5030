"""Headless-browser screenshots of a run report (Chromium), to look at what the biologist sees.

    python bench/screenshot_report.py [--demo-dir DIR] [--out docs/images]

Runs the demo (unless ``--demo-dir`` holds one already), builds its report
with ``cellmonitor report``, and has Chromium render the page twice: the top
(summary and time courses) and the gallery and overlays. Prints the timings
and writes ``report_top.png`` and ``report_gallery.png``. Exits 0 without
screenshots (saying so) when no Chromium is installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH (or /usr/bin/chromium)."""
    for name in CHROMIUMS:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def screenshot(browser: str, url: str, out: Path, width: int, height: int) -> None:
    """One headless screenshot of ``url`` at ``width`` x ``height`` CSS pixels."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
           f"--window-size={width},{height}", f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", type=Path, default=None, help="a finished demo folder (default: run a new demo, 6 timepoints, 4 wells)")
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--report-dir", type=Path, default=None, help="an already built report folder (skips the demo and the report)")
    args = ap.parse_args()
    browser = find_chromium()
    if browser is None:
        print("no Chromium found: no screenshots taken")
        return 0
    work = Path(tempfile.mkdtemp(prefix="cellmonitor-shot-"))
    demo = args.demo_dir
    t0 = time.perf_counter()
    if demo is None and args.report_dir is None:
        from monitor.demo.run import run_demo

        demo = work / "demo"
        run_demo(demo, n_timepoints=6, wells=("A1", "A2", "B1", "B2"), cells_per_field=14, per_state=20, metrics_port=None, say=lambda m: None)
    t_demo = time.perf_counter() - t0
    from monitor.cli.main import main as cli

    t1 = time.perf_counter()
    rep = args.report_dir or work / "report"
    if args.report_dir is None and cli(["report", str(demo / "demo.toml"), "--out", str(rep), "--per-state", "6"]) != 0:
        return 1
    t_report = time.perf_counter() - t1
    page = rep / "demo.html"
    args.out.mkdir(parents=True, exist_ok=True)
    top, gallery = args.out / "report_top.png", args.out / "report_gallery.png"
    t2 = time.perf_counter()
    screenshot(browser, page.as_uri(), top, args.width, 1500)
    # headless Chromium draws a blank page when asked to scroll to #gallery: shoot a copy of the page
    # that starts at the gallery instead (same header, same styles, same section markup)
    html = page.read_text(encoding="utf-8")
    part = page.with_name("gallery_view.html")
    part.write_text(html[: html.index("<main>") + 6] + html[html.index("<section id='gallery'>") :], encoding="utf-8")
    screenshot(browser, part.as_uri(), gallery, args.width, 1500)
    t_shot = time.perf_counter() - t2
    size_mb = page.stat().st_size / 1e6
    print("| step | seconds |\n|---|---|")
    print(f"| demo run | {t_demo:.1f} |\n| cellmonitor report | {t_report:.1f} |\n| two screenshots | {t_shot:.1f} |")
    print(f"\npage {page} ({size_mb:.1f} MB); screenshots {top}, {gallery}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
