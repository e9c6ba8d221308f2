"""The web demo (examples/web_demo.py) in a real headless Chromium, driven by Playwright with the system browser, and
the Space layout (app.py + requirements.txt) beside it."""

import configparser
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppllava_hf.relevance import relevance_grid_size
from ppllava_hf.testing.embedded_default import (
    EMBEDDED_DEFAULT_NUM_FRAMES, SAMPLE_ANSWER, SAMPLE_QUESTION, write_sample_video,
)


ROOT = Path(__file__).resolve().parents[1]
HEATMAP_COLUMNS = 4  # examples/web_demo.py's grid layout
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
# The Matplotlib colours save_relevance_timeline draws with: the bars (tab:blue) and the shaded moments (tab:orange at
# alpha 0.25 over white).
BAR_BLUE, MOMENT_ORANGE = (31, 119, 180), (255, 223, 194)


def find_chromium() -> str | None:
    """The system Chromium (Debian's `chromium` package), or $PPLLAVA_CHROMIUM."""
    for candidate in (os.environ.get("PPLLAVA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def requirement_names(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_space_requirements_are_the_package_dependencies_and_the_demo_extra():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    expected = requirement_names(setup["options"]["install_requires"].splitlines())
    expected += requirement_names(setup["options.extras_require"]["demo"].splitlines())
    assert requirement_names((ROOT / "requirements.txt").read_text().splitlines()) == expected


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("No Chromium to drive: install Debian's `chromium` package (apt-get install chromium), as .ci/run "
                    "does.")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright drives the browser test: pip install -e '.[demo]' playwright")
    pytest.importorskip("gradio", reason="Gradio is the demo extra's: pip install -e '.[demo]' playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The demo served on 127.0.0.1 with the embedded default, as `python app.py` starts it (the Space's command)."""
    pytest.importorskip("gradio", reason="Gradio is the demo extra's: pip install -e '.[demo]' playwright")
    port = free_port()
    workdir = tmp_path_factory.mktemp("web-demo")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(workdir / "gradio")}
    log = (workdir / "server.log").open("w")
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port)],
                              cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"The web demo did not start: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield url
    server.terminate()
    server.wait(timeout=10)
    log.close()


def downloaded_image(page, selector: str) -> Image.Image:
    """The image an `<img>` of the page shows, fetched as the browser fetched it."""
    source = page.locator(f"{selector} img").first.get_attribute("src")
    response = page.request.get(source)
    assert response.ok, source
    return Image.open(io.BytesIO(response.body())).convert("RGB")


def colour_share(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 12) -> float:
    pixels = np.asarray(image, dtype=np.int16)
    return float((np.abs(pixels - np.array(colour)).max(-1) <= tolerance).mean())


def test_the_page_answers_shows_where_and_when_repools_and_reports_a_corrupt_file(browser, app_url, tmp_path):
    from playwright.sync_api import expect

    sample = write_sample_video(tmp_path / "sample.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(sample.read_bytes()[: 200])
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    page.goto(app_url)

    page.locator("#upload input[type=file]").set_input_files(str(sample))
    expect(page.locator("#status")).to_contain_text("Loaded", timeout=20_000)
    page.locator("#question textarea").fill(SAMPLE_QUESTION)
    page.locator("#ask").click()
    expect(page.locator("#chat")).to_contain_text(SAMPLE_ANSWER, timeout=30_000)
    expect(page.locator("#status")).to_contain_text("frames ×", timeout=10_000)
    expect(page.locator("#timeline img")).to_be_visible(timeout=10_000)
    page.screenshot(path=str(tmp_path / "after-answer.png"), full_page=True)

    # The heatmap: the grid of every sampled frame under its overlay, as save_relevance_grid sizes it.
    heatmap = downloaded_image(page, "#heatmap")
    assert heatmap.width == relevance_grid_size(EMBEDDED_DEFAULT_NUM_FRAMES, 1, 1, columns=HEATMAP_COLUMNS)[0]
    pixels = np.asarray(heatmap)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000 and pixels.std() > 20
    # The timeline: relevance bars and the top moment shaded.
    timeline = downloaded_image(page, "#timeline")
    assert timeline.size == (960, 320)
    assert colour_share(timeline, BAR_BLUE) > 0.005 and colour_share(timeline, MOMENT_ORANGE) > 0.01
    # A moment seeks the video to its start.
    first_moment = page.locator("#moments label").first
    start = float(re.match(r"#1 ([0-9.]+)-", first_moment.inner_text())[1])
    first_moment.click()
    page.wait_for_function(
        f"() => Math.abs(document.querySelector('#video video').currentTime - {start}) < 0.15", timeout=10_000
    )

    # A second question is pooled under itself and answered for itself.
    page.locator("#question textarea").fill("How many balls are there?")
    page.locator("#ask").click()
    expect(page.locator("#chat")).to_contain_text("One.", timeout=30_000)
    expect(page.locator("#status")).to_contain_text("re-pooled the video under this question", timeout=10_000)
    page.screenshot(path=str(tmp_path / "second-answer.png"), full_page=True)

    # A corrupt upload: the decoder's one-line error in the page, no traceback, and the app still answers afterwards.
    page.locator("#upload input[type=file]").set_input_files(str(corrupt))
    expect(page.locator("#error")).to_contain_text("VideoDecodingError", timeout=20_000)
    expect(page.locator("#error")).to_contain_text("corrupt")
    assert "Traceback" not in page.content()
    page.screenshot(path=str(tmp_path / "corrupt-upload.png"), full_page=True)
    page.locator("#examples label").first.click()
    expect(page.locator("#status")).to_contain_text("Loaded", timeout=20_000)
    expect(page.locator("#error")).not_to_contain_text("Error")
    page.close()


@pytest.fixture(scope="module")
def demo():
    """The demo's handlers in this process, on the embedded default (no server, no browser)."""
    pytest.importorskip("gradio", reason="Gradio is the demo extra's: pip install -e '.[demo]' playwright")
    sys.path.insert(0, str(ROOT / "examples"))
    import web_demo

    app, _ = web_demo.build_app(["--max-new-tokens", "8"])
    return app


def test_an_uploaded_image_is_an_image_turn_with_its_token_count(demo, tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(image)
    session, *_ = demo.load(str(image), 16)
    assert session.media["type"] == "image"
    *_, outputs = demo.respond("Is there a ball?", [], session, 16, 0)
    assert outputs[1][-1]["role"] == "assistant" and outputs[1][-1]["content"]
    assert outputs[6] == "" and re.search(r"image → \d+ tokens", outputs[7])


@pytest.mark.parametrize(("question", "has_media", "message"), [
    ("Where does the red ball go?", False, "Upload a video or an image, or pick an example clip, before asking."),
    ("   ", True, "Type a question first."),
])
def test_asking_without_media_or_question_says_what_is_missing(demo, question, has_media, message):
    session = demo.load_example("red ball, left to right", 16)[0] if has_media else None
    (outputs,) = demo.respond(question, [], session, 16, 0)
    assert outputs[6] == f"**Error** — {message}" and outputs[1] == []


@pytest.mark.parametrize(("num_frames", "budget", "names"), [(0, 0, "num_frames"), (16, 3, "max_visual_tokens=3")])
def test_a_bad_setting_reports_the_packages_error_and_keeps_the_conversation(demo, num_frames, budget, names):
    session = demo.load_example("red ball, left to right", 16)[0]
    *_, outputs = demo.respond("Where does the red ball go?", [], session, num_frames, budget)
    assert outputs[6].startswith(f"**Error** — ValueError: {names}") and "\n" not in outputs[6]
    assert outputs[1] == [] and outputs[2] is session
