"""fuzz.py (make fuzz): its inputs come from the seed alone, its judge tells the JSON contract from
a 5xx and from waitress's own answers, and a small round of it against a real serve.py process
(the tiny model) gets no 5xx and leaves the process alive and ready."""
import io

import numpy as np
from PIL import Image

import catdog
import fuzz
from service_helpers import Server, synthetic_photo, tiny_model


def test_inputs_are_the_same_bytes_for_the_same_seed():
    first = fuzz.fuzz_inputs(7, 40)
    assert first == fuzz.fuzz_inputs(7, 40)
    assert [data for _, data in first] != [data for _, data in fuzz.fuzz_inputs(8, 40)]
    assert len(first) == 40 and all(isinstance(data, bytes) for _, data in first)
    names = " ".join(name for name, _ in first)
    for kind in ("/valid", "/lie-", "random-", "png-16bit"):  # every family is in a round of 40
        assert kind in names, kind
    assert fuzz.normal_photo(3) == fuzz.normal_photo(3)


def test_a_lie_rewrites_the_size_the_header_declares():
    rng = np.random.default_rng(0)
    for fmt in ("PNG", "JPEG", "GIF"):
        data = fuzz.encode(fuzz.picture(rng, 64, 48), fmt)
        with Image.open(io.BytesIO(fuzz.lie_about_size(data, fmt, 6000, 5000))) as img:
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
        tally, files = fuzz.Tally(), fuzz.fuzz_inputs(3, 30)
        fuzz.send_files(server.port, files, tally, clients=2, timeout=10)
        fuzz.send_batches(server.port, files, 2, 8, tally, timeout=10)
        rows = fuzz.run_protocol(server.port, synthetic_photo(np.random.default_rng(1), "cat"), tally, timeout=5)
        assert tally.of("failure") == []
        assert sum(n for (phase, _), n in tally.counts.items() if phase == "files") == 30  # each one answered
        assert len(rows) == len(fuzz.protocol_cases(b"x"))
        assert server.proc.poll() is None and server.get("/health").status_code == 200
        assert "Traceback" not in server.logs()
    finally:
        assert server.stop() == 0
