"""fuzz.py (make fuzz) and harness's hostile files: the files come from the seed alone, the judge
tells the JSON contract from a 5xx and from waitress's own answers; hypothesis sends the same
families of files to the app in-process (a failing file shrinks to its simplest form), and a
small round of fuzz.py against a real serve.py process (the tiny model) gets no 5xx and leaves
the process alive and ready."""
import functools
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import catdog
import fuzz
import harness
from service_helpers import Server, client_of, synthetic_photo, tiny_model

# A bounded, repeatable draw (derandomize: the same examples every run), without a deadline:
# a decode may take a second on a loaded machine, and that is no failure.
HOSTILE = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def bases():
    return harness.base_files(np.random.default_rng(0))


@st.composite
def hostile_file(draw):
    """(name, bytes) of one of harness.FAMILIES, every choice drawn by hypothesis."""
    pick = harness.Pick(lambda low, high: draw(st.integers(low, high)))
    return pick.choice(harness.FAMILIES)(bases(), pick)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    yield from client_of(tmp_path_factory)


def judged(response):
    """fuzz.judge of a test-client response: (kind, label)."""
    return fuzz.judge(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.data)


@HOSTILE
@given(hostile_file(), st.integers(0, 20))
def test_a_hostile_file_gets_a_json_4xx_or_an_answer_never_a_5xx(client, file, index):
    name, data = file
    body, content_type = fuzz.request_of(index, data)  # multipart, or a raw body of any content type
    r = client.post("/predict", data=body, content_type=content_type)
    assert judged(r)[0] == "ok", (name, r.status_code, r.data[:200])


@settings(HOSTILE, max_examples=50)
@given(st.lists(hostile_file(), min_size=1, max_size=4))
def test_a_batch_of_hostile_files_gets_no_5xx(client, files):
    body, content_type = harness.multipart([("file", name, data) for name, data in files])
    r = client.post("/predict/batch", data=body, content_type=content_type)
    assert judged(r)[0] == "ok", ([name for name, _ in files], r.status_code, r.data[:200])
    if r.status_code == 200:
        assert fuzz.batch_failures(r.data) == [], [name for name, _ in files]


def test_files_are_the_same_bytes_for_the_same_seed():
    first = harness.hostile_files(7, 40)
    assert first == harness.hostile_files(7, 40)
    assert [data for _, data in first] != [data for _, data in harness.hostile_files(8, 40)]
    assert len(first) == 40 and all(isinstance(data, bytes) for _, data in first)
    names = " ".join(name for name, _ in first)
    for kind in ("/valid", "/lie-", "random-", "png-16bit"):  # every family is in a round of 40
        assert kind in names, kind
    assert fuzz.normal_photo(3) == fuzz.normal_photo(3)


def test_a_lie_rewrites_the_size_the_header_declares():
    rng = np.random.default_rng(0)
    for fmt in ("PNG", "JPEG", "GIF"):
        data = harness.encode(harness.picture(rng, 64, 48), fmt)
        with Image.open(io.BytesIO(harness.lie_about_size(data, fmt, 6000, 5000))) as img:
            assert img.size == (6000, 5000), fmt


def test_the_worst_case_images_are_real_and_just_under_the_limits():
    for name, (data, _) in fuzz.worst_case_images(1).items():
        assert len(data) < 10 * fuzz.MIB, name  # under the default MAX_UPLOAD_MB
        with Image.open(io.BytesIO(data)) as img:
            limit = catdog.pixel_limit(img.format)
            assert 0.99 * limit < img.width * img.height <= limit, name
            catdog.check_enough_data(img, len(data))  # real data, no lying header


def test_judge_tells_the_contract_from_a_failure():
    app = {"x-request-id": "abc"}
    assert fuzz.judge(422, app, b'{"error": "corrupt", "message": "", "request_id": "abc"}') == ("ok", "422 corrupt")
    assert fuzz.judge(503, app, b'{"error": "busy"}')[0] == "ok"  # the decode budget
    assert fuzz.judge(503, app, b'{"error": "stopping"}')[0] == "failure"
    assert fuzz.judge(500, app, b'{"error": "internal_error"}')[0] == "failure"
    assert fuzz.judge(400, app, b"<html>")[0] == "contract"
    assert fuzz.judge(431, {}, b"Request Header Fields Too Large")[0] == "waitress"
    assert fuzz.judge(500, {}, b"Internal Server Error")[0] == "failure"


def test_a_small_round_gets_no_5xx_and_the_process_survives(tmp_path):
    server = Server(tiny_model(), str(tmp_path / "catdog.db"), TMPDIR=str(tmp_path))
    try:
        tally, files = fuzz.Tally(), harness.hostile_files(3, 30)
        fuzz.send_files(server.port, files, tally, clients=2, timeout=10)
        fuzz.send_batches(server.port, files, 2, 8, tally, timeout=10)
        rows = fuzz.run_protocol(server.port, synthetic_photo(np.random.default_rng(1), "cat"), tally, timeout=5)
        assert tally.of("failure") == []
        assert sum(n for (phase, _), n in tally.counts.items() if phase == "files") == 30  # each one answered
        assert len(rows) == len(fuzz.protocol_cases(b"x"))
        assert server.alive() and "Traceback" not in server.logs()
    finally:
        assert server.stop() == 0
