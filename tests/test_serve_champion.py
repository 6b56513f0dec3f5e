"""The real champion (models/model.onnx from `make train`) served by serve.py predicts real
shared photos correctly: held-out test-split photos when data/manifest.csv says which. It
answers "other" for non-pets (the not-pets test part, which no decision was tuned on, and
generated blanks, noise, documents), and its drift monitor stays quiet for the same pets at
phone size or resized, and speaks up for dark, greyscale and non-pet inputs. Its model card is
served."""
import io
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

import catdog
import evaluate
import other
import serve
from service_helpers import Server, in_process, upload

SHARED = catdog.SHARED_SAMPLE
MODEL = os.environ.get("MODEL_PATH", os.path.join(catdog.MODELS_DIR, "model.onnx"))  # or a candidate

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(MODEL), reason="no champion yet: models/model.onnx comes from `make train`"),
    pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"shared photo sample {SHARED} is absent"),
]


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """The model.onnx to serve: MODEL, or, when MODEL was trained before models recorded their
    preprocessing code, a copy of it stamped with this code's fingerprint. serve.py refuses
    the unstamped one (checked here); how the copy answers through this code is what these
    tests measure either way."""
    meta = catdog.read_json(os.path.splitext(MODEL)[0] + ".json")
    if "preprocess_fingerprint" in meta:
        return MODEL
    with pytest.raises(ValueError, match="was trained before models recorded their preprocessing code"):
        serve.load_model(MODEL)
    folder = tmp_path_factory.mktemp("champion")
    for name in os.listdir(os.path.dirname(MODEL)):
        if name != "model.json":
            os.symlink(os.path.join(os.path.dirname(MODEL), name), folder / name)
    catdog.write_json(folder / "model.json", {**meta, "preprocess_fingerprint": catdog.preprocessing_fingerprint()})
    return str(folder / "model.onnx")


def held_out_names():
    """File names in the held-out test split (original photos), or None without a manifest."""
    if not os.path.exists(catdog.MANIFEST):
        return None
    return {os.path.basename(row["source"]) for row in catdog.read_manifest(catdog.MANIFEST, "test")}


def held_out_photos(per_class=10):
    """Original shared photos, from the test split when the manifest is there (the champion
    never trained on them), else spread over the whole sample."""
    names = sorted(os.listdir(SHARED))
    test = held_out_names()
    if test:
        names = [n for n in names if n in test] or names
    chosen = []
    for label in catdog.CLASSES:
        mine = [n for n in names if catdog.label_from_name(n) == label]
        chosen += mine[:: max(1, len(mine) // per_class)][:per_class]
    return chosen


@pytest.mark.skipif(not os.path.exists(catdog.MANIFEST), reason="no data/manifest.csv: `make data` writes it")
def test_smoke_photos_are_held_out():
    """smoke.sh's default photos of the shared sample must be in the test split: a photo the
    model trained on would prove less."""
    with open(os.path.join(catdog.ROOT, "smoke.sh")) as f:
        defaults = re.findall(r'SMOKE_(?:CAT|DOG):-([^}]+)}', f.read())
    assert len(defaults) == 2 and set(defaults) <= held_out_names(), defaults


def test_champion_predicts_shared_photos(tmp_path, champion):
    s = Server(champion, str(tmp_path / "catdog.db"))
    try:
        version = s.get("/health").json()["model_version"]
        wrong = []
        for name in held_out_photos():
            with open(os.path.join(SHARED, name), "rb") as f:
                r = s.predict(f.read())
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == version
            if r.json()["label"] != catdog.label_from_name(name):
                wrong.append((name, r.json()["label"], r.json()["confidence"]))
    finally:
        s.stop()
    # the gate asks >= 97 % on the evaluation set; 20 photos allow one miss
    assert len(wrong) <= 1, wrong


def test_champion_sees_no_drift_on_held_out_photos(tmp_path, champion):
    """The reference profile saved beside the champion must describe photos like the ones
    it will serve: held-out originals stay under the drift threshold on every feature."""
    if not os.path.exists(os.path.join(os.path.dirname(MODEL), "reference_profile.json")):
        pytest.skip("the champion has no reference_profile.json")
    photos = held_out_photos(per_class=60)
    s = Server(champion, str(tmp_path / "catdog.db"), DRIFT_WINDOW=len(photos), DRIFT_MIN_SAMPLES=len(photos))
    try:
        for name in photos:
            with open(os.path.join(SHARED, name), "rb") as f:
                assert s.predict(f.read()).status_code == 200
        drift = s.get("/stats").json()["drift"]
    finally:
        s.stop()
    assert drift["samples"] == len(photos) and drift["psi"], drift
    assert drift["drifted"] == [], drift


def test_champion_serves_its_model_card(tmp_path, champion):
    """`make train` writes MODEL_CARD.md beside the champion; GET /model-card serves it as it is."""
    card = os.path.join(os.path.dirname(MODEL), "MODEL_CARD.md")
    if not os.path.exists(card):
        pytest.skip("the champion has no MODEL_CARD.md beside it: `make train` writes one")
    client, service = in_process(champion, str(tmp_path / "catdog.db"))
    try:
        r = client.get("/model-card")
    finally:
        service.close()
    with open(card, encoding="utf-8") as f:
        assert (r.status_code, r.mimetype, r.get_data(as_text=True)) == (200, "text/markdown", f.read())


def predict_in_process(client, img, fmt="JPEG"):
    buf = io.BytesIO()
    img.save(buf, fmt, quality=90) if fmt == "JPEG" else img.save(buf, fmt)
    r = client.post("/predict", **upload(buf.getvalue()))
    assert r.status_code == 200, r.json
    return r.json


def not_pets_test_part(per_kind=6):
    """Up to per_kind photos of each kind from the not-pets test part (never tuned on)."""
    if not os.path.isdir(catdog.NOT_PETS_SAMPLE):
        pytest.skip(f"the not-pets photos {catdog.NOT_PETS_SAMPLE} are absent")
    by_kind = {}
    for path, kind in evaluate.not_pet_photos()["test"]:
        by_kind.setdefault(kind, []).append(path)
    return [path for paths in by_kind.values() for path in paths[:per_kind]]


def test_champion_answers_other_for_non_pets_and_blanks(tmp_path, champion):
    client, service = in_process(champion, str(tmp_path / "catdog.db"))
    blanks = {"solid blue PNG": (Image.new("RGB", (640, 480), (30, 60, 200)), "PNG"),
              "black JPEG": (Image.new("RGB", (800, 600)), "JPEG"),
              "random noise": (Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)),
                               "PNG")}
    blanks.update({f"generated {kind}": (img, "PNG") for img, kind in other.synthetic_non_pets(5, seed=99)})
    answers = {name: predict_in_process(client, img, fmt) for name, (img, fmt) in blanks.items()}
    assert {name: a["label"] for name, a in answers.items()} == dict.fromkeys(blanks, "other"), answers
    photos = not_pets_test_part()
    as_pet = [path for path in photos if predict_in_process(client, catdog.open_image(path))["label"] != "other"]
    service.close()
    # The gate holds the whole test part to <= 2 % (<= 5 % per kind); a few per kind allow one miss in 20.
    assert len(as_pet) <= max(1, len(photos) // 20), as_pet


def drift_of(client, service, images):
    service.drift = type(service.drift)(len(images), len(images))  # a fresh window per case
    for img in images:
        predict_in_process(client, img)
    return client.get("/stats").json["drift"]


def test_champion_drift_quiet_for_phone_size_and_resized_pets_loud_for_dark_grey_and_non_pets(tmp_path, champion):
    """The same held-out pets at phone size (longer side 4032 px) and at half size raise no
    drift; dark, greyscale and non-pet inputs do, each on the statistic that explains it."""
    if not os.path.exists(os.path.join(os.path.dirname(MODEL), "reference_profile.json")):
        pytest.skip("the champion has no reference_profile.json")
    pets = [catdog.open_image(os.path.join(SHARED, name)) for name in held_out_photos(per_class=50)]
    client, service = in_process(champion, str(tmp_path / "catdog.db"))

    def scaled(img, longer):
        factor = longer / max(img.size)
        return img.resize((round(img.width * factor), round(img.height * factor)), Image.BICUBIC)

    phone = drift_of(client, service, [scaled(img, 4032) for img in pets])
    half = drift_of(client, service, [img.reduce(2) for img in pets])
    dark = drift_of(client, service, [img.point(lambda v: v * 0.15) for img in pets])
    grey = drift_of(client, service, [ImageOps.grayscale(img).convert("RGB") for img in pets])
    non_pets = drift_of(client, service, [catdog.open_image(p) for p in not_pets_test_part(per_kind=12)][:len(pets)])
    service.close()
    assert phone["drifted"] == [] and half["drifted"] == [], (phone, half)
    assert "brightness" in dark["drifted"], dark
    assert "saturation" in grey["drifted"], grey
    assert {"pet_distance", "other"} <= set(non_pets["drifted"]), non_pets
