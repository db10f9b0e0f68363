"""The Gradio demo: its logic without a browser, then the real page in Debian's chromium driven by Selenium."""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

gradio = pytest.importorskip("gradio", reason="the app needs the optional extra: pip install 'cops-hf[app]'")

from PIL import Image  # noqa: E402

from cops_hf.app import (  # noqa: E402
    MAX_UPLOAD_BYTES,
    NO_DECISION,
    AnomalyApp,
    build_app,
    launch_app,
    load_app_models,
    write_example_images,
    write_space,
)

from .tiny_models import tiny_model  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _distinct_colours(picture: np.ndarray) -> int:
    return len(np.unique(picture.reshape(-1, picture.shape[-1]), axis=0))


def _map_colours(picture: Image.Image) -> int:
    """Distinct colours in the middle of the anomaly map panel (left of the colour bar, between title and caption):
    over a uniform grey picture, they come from the heatmap only."""
    pixels = np.asarray(picture.convert("RGB"))
    height, width = pixels.shape[:2]
    return _distinct_colours(pixels[height // 4 : height // 2, width // 8 : width // 2])


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """An uncalibrated tiny model (as the demo's and every `convert --official` model) and a calibrated one."""
    root = tmp_path_factory.mktemp("app")
    tiny_model().save_pretrained(root / "uncalibrated-tiny")
    model = tiny_model()
    model.config.image_threshold, model.config.pixel_threshold = 0.3, 0.45
    model.save_pretrained(root / "calibrated-tiny")
    return root / "uncalibrated-tiny", root / "calibrated-tiny"


@pytest.fixture(scope="module")
def app_models(model_folders):
    return load_app_models([str(folder) for folder in model_folders], device="cpu")


@pytest.fixture(scope="module")
def grey_part(tmp_path_factory):
    """A uniform grey picture: every colour of its overlay comes from the heatmap."""
    path = tmp_path_factory.mktemp("grey") / "grey part.png"
    Image.new("RGB", (256, 192), (128, 128, 128)).save(path)
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return write_example_images(tmp_path_factory.mktemp("examples"))  # the same pictures as the app shows


def test_inspect_matches_the_pipeline_and_sliders_redraw(app_models, examples):
    logic = AnomalyApp(app_models)
    assert logic.initial_thresholds("calibrated-tiny") == (0.3, 0.45)  # sliders start at the calibrated values
    preview, picture, score, label, zero_shot, state = logic.inspect(examples[0], "calibrated-tiny", 0.3, 0.45)
    assert zero_shot is None  # no references: one map
    assert preview.size == Image.open(examples[0]).size  # the uploaded picture, shown beside the map
    expected = app_models[0].detector(examples[0])["pred_score"]
    assert float(score) == pytest.approx(expected, abs=1e-4)
    assert label == ("anomalous" if expected >= 0.3 else "normal")
    lower, higher = (logic.redraw(state, threshold, 0.45)[2] for threshold in (expected - 0.01, expected + 0.01))
    assert (lower, higher) == ("anomalous", "normal")
    faint, strong = (logic.redraw(state, 0.3, 0.45, alpha)[0] for alpha in (0.1, 0.9))
    assert faint.size == strong.size == picture.size and faint.tobytes() != strong.tobytes()


def test_uncalibrated_model_has_no_decision_and_colours_span_its_map(app_models, grey_part):
    """Issue 20: with thresholds at 0.5 the map of an uncalibrated model was one flat colour. The threshold boxes
    start empty: no decision, no outline, and the colours span the map's own range (the rule `predict` uses)."""
    logic = AnomalyApp(app_models)
    assert logic.initial_thresholds("uncalibrated-tiny") == (None, None)
    _, picture, score, label, _, state = logic.inspect(str(grey_part), "uncalibrated-tiny", None, None, alpha=1.0)
    assert label == NO_DECISION and float(score) == pytest.approx(
        app_models[0].detector(str(grey_part))["pred_score"], abs=1e-4
    )
    assert _map_colours(picture) > 40
    fixed_scale = logic.redraw(state, 0.5, 0.5, alpha=1.0)[0]  # the old start: a scale from 0 to 1
    assert _map_colours(fixed_scale) < _map_colours(picture) / 4
    about = logic.about("uncalibrated-tiny")
    assert "Not calibrated" in about and "cops-hf calibrate --model" in about and "2508.03447" in about
    assert "test preset" in about and str(app_models[0].source) in about
    assert "Calibrated**: image threshold 0.3, pixel threshold 0.45" in logic.about("calibrated-tiny")
    gallery, rows, _ = logic.score_batch([str(grey_part)], "uncalibrated-tiny", None, None, grey_part.parent / "b")
    assert rows[0][2] == "" and gallery[0][1] == "grey part.png"  # no label without a threshold; a short caption


def test_page_names_its_endpoints_shows_whole_thumbnails_and_caps_uploads(app_models, tmp_path):
    """Named API endpoints (they were /handle, /lambda with param_0..4), a gallery that fits whole overlays, and
    an upload cap (issue 23: the upload had no max_file_size)."""
    config = build_app(app_models, tmp_path / "examples").get_config_file()
    public = [dependency for dependency in config["dependencies"] if dependency["api_visibility"] == "public"]
    assert sorted(dependency["api_name"] for dependency in public) == ["about", "inspect", "redraw", "score_batch"]
    assert not {dependency["api_name"] for dependency in config["dependencies"]} & {"handle", "lambda"}
    by_id = {component["props"].get("elem_id"): component["props"] for component in config["components"]}
    assert by_id["cops-batch-gallery"]["object_fit"] == "contain"
    assert by_id["cops-decide"]["value"] is False and by_id["cops-outline"]["value"] is False  # unset: no decision
    assert "cops-preview" in by_id and "cops-about" in by_id

    port = _free_port()
    blocks = launch_app(app_models, port=port, block=False, max_file_size=2000)
    try:
        assert launch_app.__kwdefaults__["max_file_size"] == MAX_UPLOAD_BYTES
        import httpx

        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = httpx.post(url, files={"files": ("small.png", b"x" * 1000)})
        large = httpx.post(url, files={"files": ("large.png", b"x" * 5000)})
        assert small.status_code == 200 and large.status_code == 413
    finally:
        blocks.close()


def test_normal_references_redraw_the_map_with_and_without_them(app_models, examples, tmp_path):
    """Issue 18's upload box: the map and score use the uploaded good parts (the pipeline's `set_references`), the
    zero-shot map is drawn beside, and the served model is zero-shot again afterwards."""
    from cops_hf.data.synthetic import render_synthetic_sample

    references = []
    for index in range(2):
        path = tmp_path / f"good_{index}.png"
        Image.fromarray(render_synthetic_sample("ring", 10 + index, image_size=256, defect_type=None).image).save(path)
        references.append(str(path))
    detector = app_models[0].detector
    zero_shot_score = detector(examples[0])["pred_score"]
    detector.set_references(references)
    few_shot_score = detector(examples[0])["pred_score"]
    detector.model.clear_references()
    assert abs(few_shot_score - zero_shot_score) > 1e-4  # the references change the answer

    logic = AnomalyApp(app_models)
    _, picture, score, label, zero_shot, state = logic.inspect(
        examples[0], "uncalibrated-tiny", None, None, references=references
    )
    assert score == f"{few_shot_score:.4f} (zero-shot {zero_shot_score:.4f})" and label == NO_DECISION
    assert zero_shot is not None and zero_shot.tobytes() != picture.tobytes() and state.num_references == 2
    assert detector.model.num_references == 0  # other visitors keep the zero-shot model
    assert logic.redraw(state, 0.0, None)[3] is not None  # the sliders redraw both maps
    broken = tmp_path / "bad reference.png"
    broken.write_text("no image")
    with pytest.raises(ValueError, match="Normal reference 'bad reference.png' is not a readable image"):
        logic.inspect(examples[0], "uncalibrated-tiny", references=[references[0], str(broken)])
    assert detector.model.num_references == 0


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
    assert float(saved[2]["pred_score"]) == pytest.approx(app_models[0].detector(examples[1])["pred_score"], abs=1e-5)


def test_space_folder(tmp_path, model_folders):
    """A Space for a Hub id and a local model: the local one is saved into the Space (it linked to
    huggingface.co/cops-demo), requirements are the package's own (they said transformers>=5.0), the card names
    Hub models only."""
    import yaml

    folder = write_space(tmp_path / "space", ["my-org/cops-visa", str(model_folders[0])])
    app_py = (folder / "app.py").read_text()
    assert "MODELS = ['my-org/cops-visa', 'models/uncalibrated-tiny']" in app_py
    assert "load_app_models(MODELS)" in app_py
    assert (folder / "models" / "uncalibrated-tiny" / "model.safetensors").is_file()
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert "transformers>=5.24,<6" in requirements and any(line.startswith("gradio>=") for line in requirements)
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["models"] == ["my-org/cops-visa"] and front_matter["sdk"] == "gradio"
    assert str(tmp_path) not in card and "huggingface.co/uncalibrated-tiny" not in card and "2508.03447" in card
    assert (folder / "cops_hf" / "app.py").is_file() and (folder / "cops_hf" / "assets").is_dir()
    with pytest.raises(ValueError, match="not empty; choose a new folder or pass --overwrite"):
        write_space(folder, ["my-org/cops-visa"])
    write_space(folder, ["my-org/other"], overwrite=True)
    assert not (folder / "models").exists() and "'my-org/other'" in (folder / "app.py").read_text()
    from cops_hf.cli import build_parser

    assert build_parser().parse_args(["app", "--write-space", str(folder), "--overwrite"]).overwrite


def test_space_refuses_ids_that_would_inject_card_keys(tmp_path):
    """Issue 23: a newline in the Hub id wrote new keys into the card's YAML front matter."""
    import yaml

    with pytest.raises(ValueError, match="neither a model folder on this machine nor a Hub id"):
        write_space(tmp_path / "bad", ["my-org/cops\nlicense: other\nsdk: docker"])
    with pytest.raises(ValueError, match="push it first: cops-hf push FOLDER namespace/name"):
        write_space(tmp_path / "bad", [str(tmp_path / "no-such-folder")])
    folder = write_space(tmp_path / "titled", ["my-org/cops"], title="Parts\nsdk: docker")
    front_matter = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert front_matter["sdk"] == "gradio" and front_matter["title"] == "Parts\nsdk: docker"


def test_written_space_starts_and_answers(model_folders, grey_part, tmp_path):
    """The Space folder runs on its own: `python app.py` with its copy of the package and of the model, served on
    127.0.0.1, answers `/inspect` with the pipeline's score."""
    from gradio_client import Client, handle_file

    folder = write_space(tmp_path / "space", [str(model_folders[0])])
    port = _free_port()
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        client = None
        for _ in range(600):
            if server.poll() is not None:
                pytest.fail(f"the Space exited with {server.returncode}: {server.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    if page.status == 200:
                        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                        break
            except OSError:
                time.sleep(0.5)
        assert client is not None, "the Space did not answer within 5 minutes"
        _, _, score, label, _, _ = client.predict(
            handle_file(str(grey_part)), "uncalibrated-tiny", False, 0.5, False, 0.5, 0.5, api_name="/inspect"
        )
        expected = tiny_model_detector(model_folders[0])(str(grey_part))["pred_score"]
        assert float(score) == pytest.approx(expected, abs=1e-4) and label == NO_DECISION
        # The README's gradio_client example, run as written against this Space (its URL, picture and model).
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        blocks = readme.split("```python\n")
        example = next(block for block in blocks if block.startswith("from gradio_client")).split("```")[0]
        example = example.replace("http://127.0.0.1:7860/", f"http://127.0.0.1:{port}/")
        namespace: dict = {}
        exec(example.replace('"part.png"', repr(str(grey_part))).replace('"cops"', '"uncalibrated-tiny"'), namespace)
        assert float(namespace["score"]) == pytest.approx(expected, abs=1e-4)
        assert namespace["decision"] == ("anomalous" if expected >= 0.3 else "normal")
        assert Image.open(namespace["overlay"]).width > 320
        assert "models/uncalibrated-tiny" in client.predict("uncalibrated-tiny", api_name="/about")
    finally:
        server.terminate()
        server.wait(timeout=30)


def tiny_model_detector(folder: Path):
    return load_app_models([str(folder)], device="cpu")[0].detector


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="no chromium/chromedriver (apt-get install "
                    "chromium chromium-driver) on this machine")  # fmt: skip
def test_browser_upload_shows_the_picture_its_map_and_the_api_answers(app_models, examples, grey_part, tmp_path):
    """The real page in chromium, serving an uncalibrated model (selected first) and a calibrated one: the upload's
    preview, a heatmap with many colours, no decision; errors in the page; then `/inspect` through
    `gradio_client` with the calibrated model's thresholds."""
    from gradio_client import Client, handle_file
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
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

        wait.until(lambda page: any("Not calibrated" in box.text for box in page.find_elements(By.ID, "cops-about")))
        part = tmp_path / "part.png"
        shutil.copy(grey_part, part)
        upload(part)
        wait.until(lambda page: shown("cops-score"))
        expected = app_models[0].detector(str(part))["pred_score"]
        assert float(shown("cops-score")) == pytest.approx(expected, abs=1e-4)
        assert shown("cops-label") == NO_DECISION
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#cops-overlay img"))
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#cops-preview img"))
        natural_size = "const image = document.querySelector('#cops-preview img'); " \
                       "return image.complete ? [image.naturalWidth, image.naturalHeight] : null;"  # fmt: skip
        wait.until(lambda page: page.execute_script(natural_size))
        assert driver.execute_script(natural_size) == [256, 192]  # the uploaded picture itself
        overlay_url = driver.find_element(By.CSS_SELECTOR, "#cops-overlay img").get_attribute("src")
        with urllib.request.urlopen(overlay_url) as response:
            overlay = Image.open(io.BytesIO(response.read()))
        assert _map_colours(overlay) > 40  # the map's own range, not one flat colour
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
        example_score = app_models[0].detector(examples[1])["pred_score"]
        assert float(shown("cops-score")) == pytest.approx(example_score, abs=1e-4)
        assert not driver.find_element(By.ID, "cops-status").text.strip()

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, _, score, label, _, message = client.predict(
            handle_file(examples[0]), "calibrated-tiny", True, 0.3, True, 0.45, 0.5, api_name="/inspect"
        )
        calibrated_score = app_models[1].detector(examples[0])["pred_score"]
        assert float(score) == pytest.approx(calibrated_score, abs=1e-4) and not message
        assert label == ("anomalous" if calibrated_score >= 0.3 else "normal")
    finally:
        driver.quit()
        blocks.close()
