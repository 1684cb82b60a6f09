"""The studio in a real browser: paint two classes, generate, watch, stop, generate again.

Drives Debian's Chromium (/usr/bin/chromium) through Playwright's sync API against
`python app.py --tiny`. Skipped when that Chromium is not installed.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parent.parent
SKY, TREE = (135, 206, 235), (34, 139, 34)
TIMEOUT_MS = 120_000
GUIDANCE_INPUT = "input[aria-label='number input for Guidance (layout, sketch, scene; 1 = off)']"

if not CHROMIUM.exists():
    pytest.skip(
        "Debian's Chromium is not installed (/usr/bin/chromium); "
        "apt-get install chromium to run the browser tests",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture
def page(studio_url: str):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(studio_url)
            page.wait_for_selector("#layout-editor canvas")
            yield page
        finally:
            browser.close()


def pick_swatch(page, rgb: tuple[int, int, int]) -> None:
    """Choose a brush colour from the editor's fixed swatches, then back to the brush."""
    page.locator("#layout-editor button[aria-label='Color']").click()
    red, green, blue = rgb
    swatch = page.locator(f"#layout-editor button.color[style*='rgb({red}, {green}, {blue})']")
    swatch.click()
    # The swatch panel stays open over the canvas until another tool is chosen.
    page.locator("#layout-editor button[aria-label='Brush']").click()
    swatch.wait_for(state="hidden")


def drag(page, box: dict, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through points given as fractions of the canvas box."""
    to_page = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*to_page[0])
    page.mouse.down()
    for x, y in to_page[1:]:
        page.mouse.move(x, y, steps=12)
    page.mouse.up()


SIZE_MENU_READS = (
    "(name) => document.querySelector(\"input[aria-label='Canvas size']\").value === name"
)


def set_size(page, width: int, height: int) -> None:
    page.fill("input[aria-label='Width (px)']", str(width))
    page.fill("input[aria-label='Height (px)']", str(height))
    page.keyboard.press("Tab")


# Records, inside the page, each new preview image shown while the status reads as running,
# so a test loop slowed down by a busy machine misses none; with stopAfter it also presses Stop
# once that many previews were shown.
WATCH_PREVIEWS = """(stopAfter) => {
  window.studioPreviews = [];
  const before = document.querySelector('#preview img')?.src;
  const seen = new Set(before ? [before] : []);
  window.studioWatcher?.disconnect();
  window.studioWatcher = new MutationObserver(() => {
    const source = document.querySelector('#preview img')?.src;
    const status = document.querySelector('#status')?.innerText || '';
    if (source && !seen.has(source) && /row [0-9]+ [/] [0-9]+/.test(status)) {
      seen.add(source);
      window.studioPreviews.push(source);
      if (window.studioPreviews.length === stopAfter) {
        document.querySelector('#stop').click();
      }
    }
  });
  window.studioWatcher.observe(document.body, {subtree: true, childList: true,
                                               attributes: true, characterData: true});
}"""


def wait_for_status(page, text: str) -> None:
    page.wait_for_function(
        f"document.querySelector('#status').innerText.includes({text!r})", timeout=TIMEOUT_MS
    )


def previews_seen(page) -> int:
    return page.evaluate("window.studioPreviews.length")


def condition_ids(page, base_url: str) -> set[int]:
    """The palette ids in the condition PNG offered for download."""
    link = page.locator("#downloads a[href*='condition']").first
    link.wait_for()
    href = link.get_attribute("href")
    url = href if href.startswith("http") else base_url.rstrip("/") + href
    image = Image.open(io.BytesIO(httpx.get(url, timeout=30).content))
    return set(np.unique(np.asarray(image)).tolist())


def test_paint_generate_stop_and_generate_again(page, studio_url: str):
    canvas_box = page.locator("#layout-editor canvas").first.bounding_box()
    # The drawing sits in the middle of the canvas element; stay inside its central part.
    pick_swatch(page, SKY)
    drag(page, canvas_box, [(0.35, 0.32), (0.65, 0.32), (0.65, 0.38), (0.35, 0.38)])
    pick_swatch(page, TREE)
    drag(page, canvas_box, [(0.35, 0.62), (0.65, 0.62), (0.65, 0.68), (0.35, 0.68)])

    # Choosing a preset scales the painting to it; the menu follows a typed size, which leaves
    # the painting alone. The condition checked at the end shows the painting survived both.
    page.click("input[aria-label='Canvas size']")
    page.click("ul[role='listbox'] li:has-text('1280 × 832')")
    wait_for_status(page, "Canvases scaled to 1280 × 832")
    set_size(page, 700, 500)
    page.wait_for_function(SIZE_MENU_READS, arg="custom", timeout=TIMEOUT_MS)

    # A long run (64×64 tokens): the preview must change while it runs; Stop after 3 previews.
    set_size(page, 1024, 1024)
    page.wait_for_function(SIZE_MENU_READS, arg="1024 × 1024", timeout=TIMEOUT_MS)
    page.evaluate(WATCH_PREVIEWS, 3)
    page.click("#generate")
    wait_for_status(page, "stopped early")
    assert previews_seen(page) >= 3

    # The app is ready again: a shorter run goes to the end.
    set_size(page, 512, 512)
    page.evaluate(WATCH_PREVIEWS, 0)
    page.click("#generate")
    wait_for_status(page, "done")
    assert previews_seen(page) >= 2, "the preview did not change while sampling"
    assert {1, 2} <= condition_ids(page, studio_url)  # sky and tree reached the model
    assert page.locator("#gallery img").count() >= 2  # the stopped run and the finished one


def test_a_photo_that_is_no_image_is_refused_on_upload(page, tmp_path: Path):
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image")
    guidance = page.locator(GUIDANCE_INPUT)
    assert guidance.is_visible()
    page.get_by_role("tab", name="Superres").click()
    guidance.wait_for(state="hidden")  # guidance does nothing for a photo
    photo_input = page.locator("#photo input[type='file']")
    photo_input.set_input_files(str(fake))
    wait_for_status(page, "holiday.png is not an image I can read")
    # the refused file is gone, so Generate asks for a photo instead of failing inside Gradio
    page.click("#generate")
    page.get_by_text("Upload a small photo to enlarge first").first.wait_for()


def test_guidance_shows_for_a_scene_but_not_for_any_scene(page):
    guidance = page.locator(GUIDANCE_INPUT)
    page.get_by_role("tab", name="Free").click()
    guidance.wait_for(state="hidden")  # nothing to steer toward
    page.locator("#status", has_text="Ready. Choose a scene").wait_for()  # the tab's first step
    page.get_by_label("Scene").click()
    page.get_by_role("option", name="forest").click()
    guidance.wait_for(state="visible")  # steered from any scene toward forests
