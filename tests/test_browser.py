"""The staff page end to end in headless Chromium (Debian `chromium`, driven by Playwright):
pick or drop several photos, see each with its label and honestly rounded probability (or that
it is no pet at all), say what each really is, and find the feedback in the database; at phone
and desktop size, by keyboard alone, under the service's Content-Security-Policy, with axe-core,
and with every failure explained in words."""
import base64
import collections
import contextlib
import io
import os
import re
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

import catdog

CHAMPION = os.environ.get("MODEL_PATH", os.path.join(catdog.MODELS_DIR, "model.onnx"))  # or a candidate
from service_helpers import served, synthetic_photo, tiny_model  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
AXE = os.path.join(catdog.ROOT, "node_modules", "axe-core", "axe.min.js")  # `make test` installs it (npm)
SHOTS = os.path.join(catdog.ROOT, "reports", "browser")
PHONE, DESKTOP = (390, 844), (1280, 800)
SIZES = pytest.mark.parametrize("size", [PHONE, DESKTOP], ids=["390x844", "1280x800"])
GREEN = (20, 250, 30)  # the tiny model's "other"
CARD = "# catdog model card: tiny-1\n\nReddish photos are cats, bluish ones dogs, very green ones neither.\n"
WAIT = 15_000

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
def card_server(tmp_path_factory):
    """The tiny model with a model card beside it, as training writes one beside the champion."""
    models = tmp_path_factory.mktemp("carded") / "models"
    shutil.copytree(os.path.dirname(tiny_model()), models)
    (models / "MODEL_CARD.md").write_text(CARD, encoding="utf-8")
    yield from served(tmp_path_factory, str(models / "model.onnx"))


@pytest.fixture(scope="module")
def keeping_server(tmp_path_factory):
    """KEEP_PHOTOS=corrected: the page must say that photos are kept, and how to have one removed."""
    yield from served(tmp_path_factory, KEEP_PHOTOS="corrected")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def new_page(browser, size=DESKTOP, **options):
    """A page in a fresh context (no cookies, cache or routes of another test) at size (width, height)."""
    context = browser.new_context(viewport={"width": size[0], "height": size[1]}, **options)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def page(browser):
    with new_page(browser) as p:
        yield p


def solid_png(path, colour, size=(400, 300)):
    """A plain coloured frame: what a covered lens or a blank upload looks like, and no pet."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def write_photos(folder, kinds, seed=0):
    """One file per kind: 'cat' reddish and 'dog' bluish JPEGs, 'other' a green PNG, 'text' no image."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, kind in enumerate(kinds, 1):
        path = folder / f"{i}-{kind}.{'png' if kind == 'other' else 'jpg'}"
        if kind == "other":
            solid_png(path, GREEN)
        elif kind == "text":
            path.write_text("this is not a photo")
        else:
            path.write_bytes(synthetic_photo(rng, kind))
        paths.append(path)
    return paths


def text(locator):
    return locator.inner_text().replace("\xa0", " ").strip()


def check_photos(page, server, paths):
    """Open the page, pick the photos, wait until every answer is shown; the batch answer."""
    page.goto(server.url + "/")
    with page.expect_response("**/predict/batch") as response:
        page.set_input_files("#file", [str(p) for p in paths])
    wait_checked(page)
    return response.value.json()


def wait_checked(page):
    # a locator, not wait_for_function("..."): the page's CSP refuses the eval that polls a string
    page.locator("#status", has_text="checked:").wait_for(timeout=WAIT)


def cards(page):
    return page.locator("#list .card")


def say(card, name):
    """Press the card's feedback button `name`, wait until the page says it is saved; the
    service's answer (request id, predicted, truth)."""
    with card.page.expect_response("**/feedback") as response:
        card.get_by_role("button", name=name, exact=True).click()
    card.locator(".saved", has_text="Thanks, saved").wait_for(timeout=WAIT)
    return verdict(response.value)


def verdict(response):
    answer = response.json()
    assert response.status == 200, answer
    return answer["request_id"], answer["predicted"], answer["label"]


def stored_truths(db_path):
    """{truth: count} of the staff feedback in the service's database."""
    with sqlite3.connect(db_path) as conn:
        return collections.Counter(label for (label,) in conn.execute("SELECT label FROM feedback"))


def describe(result):
    """What the page must say for one answer of the service (its honest rounding, for a real answer)."""
    return re.compile(r"This does not look like a cat or a dog \(pet probability (< 0\.1|> 99\.9|\d+\.\d) %\)"
                      if result["label"] == "other" else rf"{result['label'].title()} \((> 99\.9|\d+\.\d) % sure\)")


def shows(shown, p):
    """Whether the page's rounded percentage (the number part, "< 0.1" or "> 99.9") is honest for p."""
    if shown == "< 0.1":
        return p < 0.001
    if shown == "> 99.9":
        return p > 0.999
    return 0.001 <= p <= 0.999 and float(shown) == pytest.approx(p * 100, abs=0.05 + 1e-9)


# ---------------------------------------------------------------- answers and feedback
def test_the_page_says_when_photos_are_kept_and_how_to_have_one_removed(keeping_server, server, page, tmp_path):
    for service, photo in ((keeping_server, "cat"), (server, "dog")):  # KEEP_PHOTOS=corrected, then off
        with page.expect_response("**/health"):
            page.goto(service.url + "/")
        with page.expect_response("**/predict/batch") as response:
            page.set_input_files("#file", [str(p) for p in write_photos(tmp_path, [photo])])
        wait_checked(page)
        notice, reference = page.locator("#kept"), response.value.json()["results"][0]["prediction_id"]
        if service is keeping_server:
            assert notice.is_visible() and "kept to improve the model" in text(notice), text(notice)
            assert "Photos you correct" in text(notice) and "To have a photo removed" in text(notice)
            assert "Every photo sent here is stored until it gets a verdict" in text(notice)  # pending ones too
            assert f"Reference: {reference}" in text(cards(page).first)
        else:
            assert not notice.is_visible() and "Reference" not in text(cards(page).first)


def test_one_photo_answer_and_feedback(server, page, tmp_path):
    answer = check_photos(page, server, write_photos(tmp_path, ["cat"]))
    (result,) = answer["results"]
    assert result["label"] == "cat"
    shown = text(cards(page).first.locator(".answer"))
    found = describe(result).fullmatch(shown)
    assert found, shown
    assert shows(found.group(1), result["confidence"]), (shown, result)
    assert text(page.locator("#model")).startswith(f"Model version {answer['model_version']}")
    before = stored_truths(server.db_path)
    assert say(cards(page).first, "Cat") == (result["request_id"], "cat", "cat")

    # a second photo answered wrong: the staff's label is stored as the truth
    answer = check_photos(page, server, write_photos(tmp_path, ["dog"], seed=1))
    assert text(cards(page).first.locator(".answer")).startswith("Dog (")
    assert say(cards(page).first, "Cat") == (answer["results"][0]["request_id"], "dog", "cat")
    assert stored_truths(server.db_path) - before == {"cat": 2}


def test_several_photos_in_one_request_each_with_its_own_feedback(server, page, tmp_path):
    posts = []
    page.on("request", lambda r: posts.append(r.url.split("/", 3)[3]) if r.method == "POST" else None)
    answer = check_photos(page, server, write_photos(tmp_path, ["cat", "dog", "other"]))
    assert posts == ["predict/batch"] and answer["count"] == 3
    assert [r["label"] for r in answer["results"]] == ["cat", "dog", "other"]
    assert [text(c.locator("figcaption")) for c in cards(page).all()] == ["1. 1-cat.jpg", "2. 2-dog.jpg", "3. 3-other.png"]
    for card, result in zip(cards(page).all(), answer["results"]):
        assert describe(result).fullmatch(text(card.locator(".answer")))
        assert card.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth > 0")
    assert text(page.locator("#status")).startswith("3 photos checked: 1 cat, 1 dog, 1 neither cat nor dog.")
    before = stored_truths(server.db_path)
    said = [say(card, name) for card, name in zip(cards(page).all(), ["Dog", "Dog", "Neither"])]
    assert said == [(r["request_id"], r["label"], truth) for r, truth in zip(answer["results"], ["dog", "dog", "other"])]
    assert len({r["request_id"] for r in answer["results"]}) == 3
    assert stored_truths(server.db_path) - before == {"dog": 2, "other": 1}


def test_dropped_photos_are_checked_together(server, page, tmp_path):
    page.goto(server.url + "/")
    files = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()}
             for p in write_photos(tmp_path, ["dog", "cat"])]
    with page.expect_response("**/predict/batch"):
        page.evaluate("""files => {
            const dt = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], f.name, { type: "image/jpeg" }));
            }
            document.querySelector("#drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""", files)
    wait_checked(page)
    assert [text(c.locator(".answer")).split(" ")[0] for c in cards(page).all()] == ["Dog", "Cat"]


def test_a_photo_it_cannot_read_is_explained_beside_the_others(server, page, tmp_path):
    answer = check_photos(page, server, write_photos(tmp_path, ["text", "cat"]))
    bad, good = cards(page).all()
    assert answer["results"][0]["status"] in (415, 422)
    assert re.fullmatch(r"Could not check this photo: This is not a photo the service can read \(HTTP 4\d\d\)\."
                        r" The service said: .+\.", text(bad.locator(".answer")))
    assert bad.locator("img").count() == 0 and text(bad.locator(".noimg")) == "Not checked"
    assert bad.get_by_role("button").count() == 0
    assert text(good.locator(".answer")).startswith("Cat (") and good.get_by_role("button").count() == 3


def says_no_pet_and_records_neither(server, page, photo):
    """Upload a non-pet: the page says it is no cat or dog, with the service's pet probability;
    "Neither" stores "other" as the truth."""
    answer = check_photos(page, server, [photo])
    (result,) = answer["results"]
    assert result["label"] == "other", result
    found = describe(result).fullmatch(text(cards(page).first.locator(".answer")))
    assert found and shows(found.group(1), result["pet_probability"]), result
    before = stored_truths(server.db_path)
    assert say(cards(page).first, "Neither") == (result["request_id"], "other", "other")
    assert text(cards(page).first.locator(".saved")) == "Thanks, saved: it is neither a cat nor a dog."
    assert stored_truths(server.db_path) - before == {"other": 1}
    assert server.get("/stats").json()["predictions_by_label"]["other"] >= 1


def test_staff_page_says_when_it_is_no_pet(server, page, tmp_path):
    """The tiny model's "other" is a very green image."""
    says_no_pet_and_records_neither(server, page, solid_png(tmp_path / "green.png", GREEN))


def test_champion_says_a_blank_frame_is_no_pet(champion_server, page, tmp_path):
    says_no_pet_and_records_neither(champion_server, page, solid_png(tmp_path / "blank.png", (70, 130, 180)))


def test_probabilities_are_rounded_honestly(server, page, tmp_path):
    """Never "100.0 %" nor "0.0 %"; registry version shown when the service has one."""
    page.goto(server.url + "/")
    assert page.evaluate("[0.9996, 0.999, 0.5, 0.001, 0.0004].map(percent).join('|')").replace("\xa0", " ").split("|") == [
        "> 99.9 %", "99.9 %", "50.0 %", "0.1 %", "< 0.1 %"]
    pet = {"status": 200, "probabilities": {"cat": 0.99996, "dog": 0.00004}, "request_id": "a" * 32}
    results = [{**pet, "index": 0, "filename": "1.jpg", "label": "cat", "confidence": 0.99996, "pet_probability": 0.99999},
               {**pet, "index": 1, "filename": "2.jpg", "label": "other", "confidence": 0.9996, "pet_probability": 0.0004},
               {"index": 2, "filename": "3.jpg", "status": 413, "error": "too_large", "message": "over 10 MB"}]
    body = {"request_id": "b" * 32, "model_version": "m-7", "registry_version": "3", "run_id": "r", "count": 3,
            "results": results}
    page.route("**/predict/batch", lambda route: route.fulfill(status=200, json=body))
    page.set_input_files("#file", [str(p) for p in write_photos(tmp_path, ["cat", "cat", "cat"])])
    wait_checked(page)
    assert [text(c.locator(".answer")) for c in cards(page).all()] == [
        "Cat (> 99.9 % sure)", "This does not look like a cat or a dog (pet probability < 0.1 %)",
        "Could not check this photo: This photo is too large (HTTP 413). The service said: over 10 MB."]
    assert text(page.locator("#model")) == "Model version m-7, registry version 3"


# ---------------------------------------------------------------- failures in words
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


def json_error(status, reason, message):
    return {"status": status, "json": {"error": reason, "message": message, "request_id": "c" * 32}}


@pytest.mark.parametrize("reply, words", [
    ({"status": 502, "content_type": "text/html", "body": HTML_502},
     "The service is unreachable or overloaded (HTTP 502). Try again in a minute."),
    ({"status": 504, "content_type": "text/html", "body": HTML_502.replace("502", "504")},
     "The service is unreachable or overloaded (HTTP 504). Try again in a minute."),
    (json_error(413, "too_large", "the upload exceeds the 10 MB limit"),
     "Too large (HTTP 413): send fewer photos at once, or smaller ones."),
    (json_error(415, "unsupported_media_type", "send multipart/form-data"), "Not a photo the service can read (HTTP 415)."),
    ({"status": 429, "content_type": "text/plain", "body": "Too Many Requests"},
     "The service is busy (HTTP 429). Try again in a minute."),
    (json_error(503, "not_ready", "the model is not loaded yet"),
     "The model is not ready yet (HTTP 503). Try again in a minute. The service said: the model is not loaded yet."),
    (json_error(500, "internal_error", "the server failed"), "The service failed (HTTP 500)."),
    ({"status": 200, "content_type": "text/html", "body": "<html>maintenance</html>"},
     "The service sent an answer this page cannot read (HTTP 200)."),
    ("abort", "Cannot reach the service: check the network connection, then try again."),
], ids=["502-html", "504-html", "413", "415", "429-text", "503", "500", "200-html", "network"])
def test_every_failure_is_explained_in_words(server, page, tmp_path, reply, words):
    page.route("**/predict/batch", lambda route: route.abort() if reply == "abort" else route.fulfill(**reply))
    page.goto(server.url + "/")
    page.set_input_files("#file", str(write_photos(tmp_path, ["cat"])[0]))
    page.wait_for_selector("#error:not(:empty)", timeout=WAIT)
    shown = text(page.locator("#error"))
    assert shown.startswith("Could not check this photo: ") and words in shown, shown
    assert "Unexpected token" not in page.inner_text("body") and cards(page).count() == 0


def test_feedback_failure_is_explained(server, page, tmp_path):
    check_photos(page, server, write_photos(tmp_path, ["cat"]))
    page.route("**/feedback", lambda route: route.fulfill(status=502, content_type="text/html", body=HTML_502))
    cards(page).first.get_by_role("button", name="Dog").click()
    saved = cards(page).first.locator(".saved.error")
    saved.wait_for(timeout=WAIT)
    assert text(saved) == "Could not save: The service is unreachable or overloaded (HTTP 502). Try again in a minute."


# ---------------------------------------------------------------- layout, keyboard, accessibility, CSP
def boxes_overlap(a, b):
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


@SIZES
def test_layout_holds_at_phone_and_desktop_size(server, browser, tmp_path, size):
    """Heading, drop zone, results and each result apart; nothing wider than the screen; a
    screenshot for people in reports/browser/."""
    with new_page(browser, size) as page:
        check_photos(page, server, write_photos(tmp_path, ["cat", "dog", "other"]))
        parts = {name: page.locator(name).bounding_box() for name in ("h1", "#drop", "#results")}
        parts.update({f"card {i}": c.bounding_box() for i, c in enumerate(cards(page).all(), 1)})
        for name, box in parts.items():
            assert box and box["width"] > 0 and box["height"] > 0, name
            assert box["x"] >= 0 and box["x"] + box["width"] <= size[0], (name, box)
        names = list(parts)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if not (a == "#results" and b.startswith("card")):  # the cards are inside the results
                    assert not boxes_overlap(parts[a], parts[b]), (a, parts[a], b, parts[b])
        assert page.evaluate("document.documentElement.scrollWidth") <= size[0]
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"page-{size[0]}x{size[1]}.png"), full_page=True)


def focused(page):
    return page.evaluate("""(() => { const a = document.activeElement, card = a.closest('.card');
                                     return [card ? card.id : a.id, a.textContent.trim()]; })()""")


def test_keyboard_only(server, page, tmp_path):
    """Tab reaches the file picker, Enter opens it; then Tab reaches each result's buttons in
    order, and Enter or Space records feedback."""
    choosers = []  # listening before the page opens: an Enter could otherwise beat Playwright to the dialog
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    page.goto(server.url + "/")
    page.keyboard.press("Tab")
    assert focused(page) == ["file", ""]
    page.keyboard.press("Enter")
    for _ in range(50):
        if choosers:
            break
        page.wait_for_timeout(100)
    assert len(choosers) == 1 and choosers[0].is_multiple()
    with page.expect_response("**/predict/batch") as response:
        choosers[0].set_files([str(p) for p in write_photos(tmp_path, ["cat", "other"])])
    wait_checked(page)
    order, said, keys = [], [], {("photo-1", "Dog"): "Enter", ("photo-2", "Neither"): " "}
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(tuple(focused(page)))
        if order[-1] in keys:
            with page.expect_response("**/feedback") as feedback:
                page.keyboard.press(keys[order[-1]])
            said.append(verdict(feedback.value))
    assert order == [(f"photo-{i}", name) for i in (1, 2) for name in ("Cat", "Dog", "Neither")]
    for i, words in ((1, "it is a dog."), (2, "it is neither a cat nor a dog.")):
        page.locator(f"#photo-{i} .saved", has_text=words).wait_for(timeout=WAIT)
    results = response.value.json()["results"]
    assert said == [(results[0]["request_id"], "cat", "dog"), (results[1]["request_id"], "other", "other")]
    assert page.locator("#photo-1").get_by_role("button", name="Dog").get_attribute("aria-pressed") == "true"


def test_the_model_card_is_a_link_the_keyboard_reaches(card_server, page):
    """The link after the photos reaches the model card by Tab (after the file picker), and Enter
    opens it, shown as the text it is."""
    page.goto(card_server.url + "/")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert focused(page) == ["card-link", "Model card"]
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url == card_server.url + "/model-card"
    assert page.locator("body").inner_text().strip() == CARD.strip()


@SIZES
def test_axe_finds_nothing_serious(server, browser, tmp_path, size):
    if not os.path.exists(AXE):
        pytest.skip("no node_modules/axe-core: `make node_modules/axe-core/axe.min.js` installs it (npm)")
    with new_page(browser, size, bypass_csp=True) as page:  # the page's CSP would refuse axe's script
        check_photos(page, server, write_photos(tmp_path, ["cat", "other", "text"]))
        say(cards(page).first, "Dog")
        page.add_script_tag(path=AXE)
        violations = page.evaluate("axe.run(document, {resultTypes: ['violations']}).then(r => r.violations)")
    serious = [(v["id"], v["impact"], v["help"], [n["target"] for n in v["nodes"]])
               for v in violations if v["impact"] in ("serious", "critical")]
    assert not serious, serious


def test_page_works_under_its_content_security_policy(server, browser, tmp_path):
    """Without bypass_csp: the service's policy allows the page's own style and script and
    nothing else, and the page still checks photos and records feedback."""
    with new_page(browser) as page:
        messages = []
        page.on("console", lambda m: messages.append(m.text))
        page.on("pageerror", lambda e: messages.append(str(e)))
        page.add_init_script("window.violations = []; document.addEventListener('securitypolicyviolation',"
                             " (e) => window.violations.push(e.violatedDirective + ' ' + e.blockedURI));")
        policy = page.goto(server.url + "/").headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "style-src 'sha256-" in policy
        answer = check_photos(page, server, write_photos(tmp_path, ["dog", "cat"]))
        assert page.locator("#drop").evaluate("e => getComputedStyle(e).borderTopStyle") == "dashed"  # the style ran
        assert cards(page).first.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth > 0")
        assert say(cards(page).nth(1), "Cat") == (answer["results"][1]["request_id"], "cat", "cat")
        assert page.evaluate("window.violations") == []
    assert not [m for m in messages if "content security policy" in m.lower()], messages


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    yield from served(tmp_path_factory, API_TOKEN="shelter-s3cret")


def test_page_sends_the_staff_token_from_its_link(token_server, browser, tmp_path):
    """With API_TOKEN set, feedback needs the token: the page opened with #token=... sends it
    (and drops it from the address bar); opened without, it says what is missing."""
    with new_page(browser) as page:
        page.goto(token_server.url + "/#token=shelter-s3cret")
        assert "token" not in page.url
        with page.expect_response("**/predict/batch"):
            page.set_input_files("#file", [str(p) for p in write_photos(tmp_path, ["cat"])])
        wait_checked(page)
        with page.expect_request("**/feedback") as sent:
            say(cards(page).first, "Cat")
        assert sent.value.headers["authorization"] == "Bearer shelter-s3cret"
    with new_page(browser) as page:  # another browser, without the link's token
        page.goto(token_server.url + "/")
        with page.expect_response("**/predict/batch"):
            page.set_input_files("#file", [str(p) for p in write_photos(tmp_path, ["dog"], seed=1)])
        wait_checked(page)
        card = cards(page).first
        with page.expect_response("**/feedback") as refused:
            card.get_by_role("button", name="Dog", exact=True).click()
        assert refused.value.status == 401
        card.locator(".saved", has_text="only from staff").wait_for(timeout=WAIT)
