"""The staff page end to end in headless Chromium (Debian `chromium`, driven by Playwright):
pick a photo, see label + confidence (or that it is no pet at all), say what it really is,
and find the feedback in the database."""
import io
import os
import re
import sqlite3

import numpy as np
import pytest
from PIL import Image

import catdog

CHAMPION = os.environ.get("MODEL_PATH", os.path.join(catdog.MODELS_DIR, "model.onnx"))  # or a candidate
from service_helpers import served, synthetic_photo  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian chromium is not installed (make system-deps installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from served(tmp_path_factory)


@pytest.fixture(scope="module")
def champion_server(tmp_path_factory):
    """The real champion: only it has learnt what is not a pet (the tiny model knows red and blue)."""
    if not os.path.exists(CHAMPION):
        pytest.skip("no champion yet: models/model.onnx comes from `make train`")
    yield from served(tmp_path_factory, CHAMPION)


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page()
        browser.close()


def feedback_rows(db_path):
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT p.label, f.label FROM feedback f JOIN predictions p USING (request_id)").fetchall()


def test_staff_page_predicts_and_records_feedback(server, page, tmp_path):
    rng = np.random.default_rng(11)
    photo = tmp_path / "my-cat.jpg"
    photo.write_bytes(synthetic_photo(rng, "cat"))
    page.goto(server.url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#feedback", state="visible", timeout=15_000)
    result = page.text_content("#result")
    assert result.startswith("cat (") and "% sure" in result
    page.click("#cat")
    page.wait_for_selector("text=Thanks, saved: it is a cat.", timeout=10_000)
    assert feedback_rows(server.db_path) == [("cat", "cat")]

    # a second photo answered wrong: the staff's label is stored as the truth
    photo.write_bytes(synthetic_photo(rng, "dog"))
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.querySelector('#result').textContent.startsWith('dog (')", timeout=15_000)
    page.click("#cat")
    page.wait_for_selector("text=Thanks, saved: it is a cat.", timeout=10_000)
    assert sorted(feedback_rows(server.db_path)) == [("cat", "cat"), ("dog", "cat")]
    assert server.get("/stats").json()["live_accuracy"] == 0.5


def test_staff_page_explains_a_bad_upload(server, page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a photo")
    page.goto(server.url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#result.error", timeout=15_000)
    assert "Could not check this photo" in page.text_content("#result")
    assert not page.is_visible("#feedback")


def solid_png(path, colour, size=(400, 300)):
    """A plain coloured frame: what a covered lens or a blank upload looks like, and no pet."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def shown_pet_probability(text):
    """The pet probability in the page's "not a pet" sentence, as a fraction (None: not that sentence)."""
    found = re.fullmatch(r"This does not look like a cat or a dog \(pet probability (\d+\.\d)%\)", text)
    return float(found.group(1)) / 100 if found else None


def says_no_pet_and_records_neither(server, page, photo):
    """Upload a non-pet: the page says it is no cat or dog, with the service's pet probability;
    "Neither" stores "other" as the truth."""
    page.goto(server.url + "/")
    with page.expect_response("**/predict") as response:
        page.set_input_files("#file", str(photo))
    answer = response.value.json()
    assert answer["label"] == "other", answer
    page.wait_for_selector("#feedback", state="visible", timeout=15_000)
    assert shown_pet_probability(page.text_content("#result")) == pytest.approx(answer["pet_probability"], abs=6e-4)
    page.click("#other")
    page.wait_for_selector("text=Thanks, saved: it is neither a cat nor a dog.", timeout=10_000)
    assert ("other", "other") in feedback_rows(server.db_path)
    stats = server.get("/stats").json()
    assert stats["feedback_count"] == len(feedback_rows(server.db_path)) and stats["predictions_by_label"]["other"] >= 1


def test_staff_page_says_when_it_is_no_pet(server, page, tmp_path):
    """The tiny model's "other" is a very green image."""
    says_no_pet_and_records_neither(server, page, solid_png(tmp_path / "green.png", (20, 250, 30)))


def test_champion_says_a_blank_frame_is_no_pet(champion_server, page, tmp_path):
    says_no_pet_and_records_neither(champion_server, page, solid_png(tmp_path / "blank.png", (70, 130, 180)))
