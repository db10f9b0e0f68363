"""The Gradio demo: its logic without a browser, then the real page in Debian's chromium driven by Selenium."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="the app needs the optional extra: pip install 'cops-hf[app]'")

from PIL import Image  # noqa: E402

from cops_hf.app import AnomalyApp, launch_app, load_app_models, write_example_images, write_space  # noqa: E402

from .tiny_models import tiny_model  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def app_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app") / "calibrated-tiny"
    model = tiny_model()
    model.config.image_threshold, model.config.pixel_threshold = 0.3, 0.45
    model.save_pretrained(folder)
    return load_app_models([str(folder)], device="cpu")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return write_example_images(tmp_path_factory.mktemp("examples"))  # the same pictures as the app shows


def test_inspect_matches_the_pipeline_and_sliders_redraw(app_models, examples):
    logic = AnomalyApp(app_models)
    assert logic.initial_thresholds("calibrated-tiny") == (0.3, 0.45)  # sliders start at the calibrated values
    picture, score, label, state = logic.inspect(examples[0], "calibrated-tiny", 0.3, 0.45)
    expected = app_models[0].detector(examples[0])["score"]
    assert float(score) == pytest.approx(expected, abs=1e-4)
    assert label == ("anomalous" if expected >= 0.3 else "normal")
    lower, higher = (logic.redraw(state, threshold, 0.45)[2] for threshold in (expected - 0.01, expected + 0.01))
    assert (lower, higher) == ("anomalous", "normal")
    faint, strong = (logic.redraw(state, 0.3, 0.45, alpha)[0] for alpha in (0.1, 0.9))
    assert faint.size == strong.size == picture.size and faint.tobytes() != strong.tobytes()


def test_bad_uploads_give_readable_errors(app_models, examples, tmp_path):
    logic = AnomalyApp(app_models)
    fake = tmp_path / "photo.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="'photo.png' is not a readable image"):
        logic.inspect(str(fake), "calibrated-tiny", 0.3, 0.45)
    with pytest.raises(ValueError, match="Upload an image first"):
        logic.inspect(None, "calibrated-tiny", 0.3, 0.45)
    gallery, rows, csv_path = logic.score_batch([examples[0], str(fake), examples[1]], "calibrated-tiny", 0.3, 0.45,
                                                tmp_path / "batch")  # fmt: skip
    assert len(gallery) == 2 and [row[0] for row in rows] == [Path(examples[0]).name, "photo.png",
                                                              Path(examples[1]).name]  # fmt: skip
    assert "photo.png" in rows[1][3] and rows[1][1] is None
    saved = list(csv.DictReader(open(csv_path)))
    assert float(saved[2]["pred_score"]) == pytest.approx(app_models[0].detector(examples[1])["score"], abs=1e-5)


def test_space_folder(tmp_path):
    folder = write_space(tmp_path / "space", ["my-org/cops-visa"])
    card = (folder / "README.md").read_text()
    assert card.startswith("---\ntitle: ") and "sdk: gradio" in card and "- my-org/cops-visa" in card
    assert "launch_app(load_app_models(MODELS)" in (folder / "app.py").read_text()
    assert "gradio" in (folder / "requirements.txt").read_text()
    assert (folder / "cops_hf" / "app.py").is_file() and (folder / "cops_hf" / "assets").is_dir()
    with pytest.raises(ValueError, match="not empty"):
        write_space(folder, ["my-org/cops-visa"])


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="no chromium/chromedriver (apt-get install "
                    "chromium chromium-driver) on this machine")  # fmt: skip
def test_browser_upload_shows_the_pipelines_score(app_models, examples, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    blocks = launch_app(app_models, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    screenshot = Path(os.environ.get("COPS_APP_SCREENSHOT", tmp_path / "app.png"))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 180)

        def upload(path: Path) -> None:
            wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#cops-upload input[type=file]"))
            driver.find_element(By.CSS_SELECTOR, "#cops-upload input[type=file]").send_keys(str(path))

        def shown(element_id: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, f"#{element_id} textarea").get_attribute("value")

        Image.open(examples[0]).save(tmp_path / "part.png")
        upload(tmp_path / "part.png")
        wait.until(lambda page: shown("cops-score"))
        expected = app_models[0].detector(str(tmp_path / "part.png"))["score"]
        assert float(shown("cops-score")) == pytest.approx(expected, abs=1e-4)
        assert shown("cops-label") == ("anomalous" if expected >= 0.3 else "normal")
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#cops-overlay img"))
        time.sleep(1)  # let the overlay finish drawing before the picture is taken
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        print(f"app screenshot: {screenshot}")

        broken = tmp_path / "broken.png"
        broken.write_text("not an image")
        driver.find_element(By.CSS_SELECTOR, "#cops-upload button[aria-label='Clear']").click()
        upload(broken)
        wait.until(lambda page: "not a readable image" in page.find_element(By.ID, "cops-status").text)
        assert "'broken.png'" in driver.find_element(By.ID, "cops-status").text and not shown("cops-score")

        driver.find_elements(By.CSS_SELECTOR, "#cops-examples img")[1].click()  # the app kept serving
        wait.until(lambda page: shown("cops-score"))
        example_score = app_models[0].detector(examples[1])["score"]
        assert float(shown("cops-score")) == pytest.approx(example_score, abs=1e-4)
        assert not driver.find_element(By.ID, "cops-status").text.strip()
    finally:
        driver.quit()
        blocks.close()
