"""Render a JSON report (`onnxopt optimize --report` or `onnxopt tune --report`) to its HTML page and
screenshot the page with headless Chromium.

Run (from the repo root; a venv with onnxopt importable and plotly installed, and a chromium binary):

    python tools/report_screenshot.py REPORT.json OUT.png [--html OUT.html] [--width 1280] [--height 1600]
        [--browser chromium]

The page type follows the report's "schema" (onnxopt.tune/1 or onnxopt.report/1). The screenshot is
the top `--height` pixels of the page at `--width`; the script prints the PNG's size and warns past
300 KB (keep PNGs committed under docs/ small).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxopt import html as html_report  # noqa: E402

MAX_PNG_BYTES = 300_000
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def render(report: dict, path: Path) -> Path:
    schema = str(report.get("schema", ""))
    if schema.startswith("onnxopt.tune/"):
        return html_report.write_tune_report(report, path)
    if schema.startswith("onnxopt.report/"):
        return html_report.write_optimize_report(report, path)
    raise SystemExit(f"{schema!r}: not an onnxopt optimize or tune report")


def screenshot(page: Path, png: Path, browser: str, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--hide-scrollbars", f"--window-size={width},{height}", "--virtual-time-budget=5000",
               f"--screenshot={png.resolve()}", page.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"{browser} failed ({done.returncode}): {done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--html", type=Path, help="keep the page here (default: a temporary file)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1600)
    parser.add_argument("--browser", default=None, help="the browser binary (default: the first of "
                        + ", ".join(BROWSERS) + " on PATH)")
    args = parser.parse_args()
    browser = args.browser or next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium); or pass --browser")
    html_report.require_plotly()
    report = json.loads(args.report.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        page = render(report, args.html or Path(tmp) / "report.html")
        screenshot(page, args.png, browser, args.width, args.height)
    size = args.png.stat().st_size
    print(f"{args.png}: {size:,} bytes ({args.width}x{args.height})" + (f"; page: {args.html}" if args.html else ""))
    if size > MAX_PNG_BYTES:
        print(f"warning: {args.png} is over {MAX_PNG_BYTES:,} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
