"""Take the README's screenshot: the studio with a bundle, a painted lake layout, one result.

    .venv/bin/python docs/screenshot.py [--checkpoints checkpoints] [--out docs/screenshot.png]

Starts `app.py` on a free local port, uploads `docs/examples/lake_layout.png` as the layout,
generates at the chosen size and photographs the page once the status reads "done". Needs
Debian's Chromium (/usr/bin/chromium) and Playwright, as the browser tests do.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, app: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise SystemExit(f"the app exited with code {app.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the app did not answer at {url} within {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    parser.add_argument("--layout", default=str(ROOT / "docs" / "examples" / "lake_layout.png"))
    parser.add_argument("--size", default="1280x832", help="WxH of the generated image")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port)]
    app = subprocess.Popen([*command, "--checkpoints", args.checkpoints], cwd=ROOT)
    try:
        wait_until_up(url, app)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1500, "height": 1150})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("#layout-editor canvas")
            upload = "input[data-testid='Upload label map…-upload-button']"
            page.set_input_files(upload, args.layout)
            page.wait_for_function("document.querySelector('#status').innerText.includes('Loaded')")
            page.fill("input[aria-label='Width (px)']", str(width))
            page.fill("input[aria-label='Height (px)']", str(height))
            page.fill("input[aria-label='Seed']", str(args.seed))
            page.keyboard.press("Tab")
            page.click("#generate")
            page.wait_for_function(
                "document.querySelector('#status').innerText.includes('done')", timeout=900_000
            )
            time.sleep(2)  # the gallery's thumbnails load after the status
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(args.out)
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
