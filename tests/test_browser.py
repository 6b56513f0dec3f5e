"""The staff page end to end in headless Chromium (Debian `chromium`, driven by Playwright):
pick a photo, see label + confidence, mark the answer, and find the feedback in the database."""
import os
import sqlite3

import numpy as np
import pytest

from service_helpers import served, synthetic_photo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian chromium is not installed (make system-deps installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from served(tmp_path_factory)


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
    page.click("#right")
    page.wait_for_selector("text=Thanks, saved: it is a cat.", timeout=10_000)
    assert feedback_rows(server.db_path) == [("cat", "cat")]

    # a second photo marked wrong stores the other label as the truth
    photo.write_bytes(synthetic_photo(rng, "dog"))
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.querySelector('#result').textContent.startsWith('dog (')", timeout=15_000)
    page.click("#wrong")
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
