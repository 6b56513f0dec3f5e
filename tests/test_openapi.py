"""openapi.yaml, the service's contract: it names every route of serve.create_app and no
other, the app serves it (as JSON, at /openapi.json), and schemathesis holds the in-process
app (the tiny model, a fresh database) to it: no 5xx, and only the documented status codes,
content types, bodies and headers, for generated requests and for every answer and refusal
the service has."""
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import zlib

import hypothesis
import jsonschema
import numpy as np
import pytest
import schemathesis
import yaml
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import serve
from service_helpers import ROOT, in_process, png_chunks, synthetic_photo, tiny_model

SPEC_PATH = os.path.join(ROOT, "openapi.yaml")
METHODS = {"get", "put", "post", "delete", "patch"}
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance,
               response_headers_conformance]
CHECKS = [not_a_server_error, *CONFORMANCE]
MAX_PHOTOS = serve.Settings().max_photos
TOO_LARGE = b"\xff\xd8\xff" + bytes(10 * 1024 * 1024)  # just over the default MAX_UPLOAD_MB


def read_spec():
    with open(SPEC_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@functools.cache
def uploads():
    """{what: bytes}: photos the tiny model tags cat, dog and other, and files /predict refuses."""
    rng = np.random.default_rng(0)
    cat = synthetic_photo(rng, "cat", size=(64, 48))
    return {"cat": cat, "dog": synthetic_photo(rng, "dog", fmt="PNG", size=(48, 64)),
            "other": encode(Image.new("RGB", (40, 40), (20, 250, 30)), "PNG"),
            "empty": b"", "corrupt": cat[: len(cat) // 2], "not_an_image": b"hello, I am a text file\n" * 4,
            "too_small": encode(Image.new("RGB", (8, 8), (200, 60, 40)), "PNG"),
            "unsupported_format": encode(Image.new("RGB", (64, 64), (200, 60, 40)), "ICO"),
            "truncated": png_chunks(2000, 2000, 8, 0, zlib.compress(bytes(3000)))}  # 83 bytes for 4 MP


# A photo part or an image/* body: one of uploads() or random bytes, so that the generated
# requests get answers, not only refusals. (schemathesis' registry is global: only this
# module uses it.)
PHOTO = st.one_of(st.sampled_from(list(uploads().values())), st.binary(max_size=64))
schemathesis.openapi.media_type("image/jpeg", PHOTO, aliases=("image/png", "application/octet-stream"))


# ---------------------------------------------------------------- the document itself
def flask_routes(app):
    """{(path in OpenAPI syntax, method)} of the app, without HEAD, OPTIONS and static files."""
    return {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
            for rule in app.url_map.iter_rules() if rule.endpoint != "static"
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_the_document_is_openapi_3_1_in_one_style():
    spec = read_spec()
    assert spec["openapi"].startswith("3.1.") and spec["info"]["title"] == "catdog" and spec["info"]["version"]
    with open(SPEC_PATH, encoding="utf-8") as f:
        indents = {len(line) - len(line.lstrip(" ")) for line in f.read().splitlines() if line.strip()}
    assert all(indent % 2 == 0 for indent in indents), sorted(indents)  # 2-space indent throughout (YAML: no tabs)
    for name, schema in spec["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)  # JSON Schema 2020-12, as OpenAPI 3.1 says
        if schema.get("type") == "object":
            assert "additionalProperties" in schema, name  # closed, or open on purpose
            # (schemathesis would quietly allow a required member that `properties` lacks)
            assert set(schema.get("required", ())) <= set(schema["properties"]), name
    operation_ids = [op["operationId"] for item in spec["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(operation_ids) == len(set(operation_ids))
    refs = set(re.findall(r'"\$ref": "#/components/(\w+)/(\w+)"', json.dumps(spec)))
    refs |= {("securitySchemes", name) for item in spec["paths"].values() for m, op in item.items() if m in METHODS
             for requirement in op.get("security", ()) for name in requirement}
    assert refs and all(name in spec["components"].get(kind, {}) for kind, name in refs), refs
    for kind, defined in spec["components"].items():
        assert set(defined) <= {name for k, name in refs if k == kind}, f"unused components/{kind}"


def test_every_route_is_documented_and_every_documented_operation_is_a_route(tmp_path):
    app = serve.create_app(serve.Settings(model_path=tiny_model(), db_path=str(tmp_path / "catdog.db")))
    try:
        documented = {(path, method) for path, item in read_spec()["paths"].items() for method in item
                      if method in METHODS}
        routes = flask_routes(app)
        assert routes - documented == set(), "routes missing from openapi.yaml"
        assert documented - routes == set(), "openapi.yaml documents what serve.py does not serve"
    finally:
        app.extensions["catdog"].close()


def test_the_app_serves_the_document(tmp_path):
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), load=False)
    try:
        r = client.get("/openapi.json")
        assert r.status_code == 200 and r.mimetype == "application/json"
        assert json.loads(r.data) == read_spec()
    finally:
        service.close()


# ---------------------------------------------------------------- schemathesis against the app
# The document is read from the file (test_the_app_serves_the_document: the same document the
# app serves); every request goes to the in-process app of the fixture (`app=`).
# schemathesis.pytest.from_fixture would load it from the app instead, but fails on pytest 9
# (it reads the Function._nodeid pytest removed).
schema = schemathesis.openapi.from_dict(read_spec())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The WSGI app with the tiny model and its own database, shared by every case; drift scores
    from the 5th photo on, so that /stats shows them."""
    client, service = in_process(tiny_model(), str(tmp_path_factory.mktemp("db") / "catdog.db"), drift_min_samples=5)
    yield client.application
    service.close()


def as_parts(body, files):
    """`body` (a dict, or schemathesis' form body with per-part content types) with `files` as its parts."""
    if dataclasses.is_dataclass(body):
        return dataclasses.replace(body, body={**body.body, "file": files})
    return {**body, "file": files}


def flatmap_body(context, body):
    """Batch bodies of 1-4 photos, or one too many. For an array of encoded parts (encoding
    contentType), schemathesis draws one value, which it then sends as a plain form field."""
    parts = getattr(body, "body", body)
    if context.operation.path != "/predict/batch" or not isinstance(parts, dict) or "file" not in parts:
        return st.just(body)
    photos = st.lists(PHOTO, min_size=1, max_size=4) | st.lists(PHOTO, min_size=MAX_PHOTOS + 1, max_size=MAX_PHOTOS + 1)
    return photos.map(lambda files: as_parts(body, files))


@schema.hooks.apply(flatmap_body)
@schema.parametrize()
@hypothesis.settings(max_examples=25, derandomize=True, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_the_app_keeps_the_contract(case, app):
    if case.path == "/predict/batch" and isinstance(case.body, dict) and isinstance(case.body.get("file"), bytes):
        case.body = as_parts(case.body, [case.body["file"]])  # the examples and coverage phases: see flatmap_body
    case.call_and_validate(app=app, checks=CHECKS)


def call(app, path, method="POST", checks=CHECKS, **case):
    """The response to one hand-made request, after schemathesis' checks of it."""
    response = schema[path][method].Case(**case).call_and_validate(app=app, checks=checks)
    return response.status_code, response.json()


def test_every_answer_and_refusal_keeps_the_contract(app):
    """Each label and each refusal of a photo, as a part and as a raw body, and a batch of them
    all: generated requests seldom reach every one, so here they go through the same checks."""
    photos = {**uploads(), "too_large": TOO_LARGE}
    for what, data in photos.items():
        for media_type in ("multipart/form-data", "image/png"):
            multipart = media_type.startswith("multipart/")
            status, body = call(app, "/predict", body={"file": data} if multipart else data, media_type=media_type)
            expected = "no_file" if what == "empty" and not multipart else what  # an empty body is no body
            assert body.get("label", body.get("error")) == expected, (what, media_type, status, body)
    status, batch = call(app, "/predict/batch", body={"file": list(photos.values())}, media_type="multipart/form-data")
    assert status == 200 and batch["count"] == len(photos)
    assert [item.get("label", item.get("error")) for item in batch["results"]] == list(photos)
    cat = batch["results"][0]["prediction_id"]
    judged = {"request_id": cat, "prediction_id": cat, "label": "dog", "predicted": "cat", "correct": False}
    feedback = {"body": {"prediction_id": cat, "label": "Dog"}, "media_type": "application/json"}
    assert call(app, "/feedback", **feedback) == (200, {**judged, "recorded": True})
    assert call(app, "/feedback", **feedback) == (200, {**judged, "recorded": False})  # the same again: no change
    feedback["body"]["label"] = "cat"
    assert call(app, "/feedback", **feedback)[1]["error"] == "feedback_exists"
    # two predictions of one request id (the caller's X-Request-ID): /feedback needs their prediction_id
    for _ in range(2):
        call(app, "/predict", body=uploads()["dog"], media_type="image/png", headers={"X-Request-ID": "album-7"})
    assert call(app, "/feedback", body={"request_id": "album-7", "label": "dog"},
                media_type="application/json")[1]["error"] == "ambiguous_request_id"
    removal = {"method": "DELETE", "path_parameters": {"prediction_id": cat}}
    nothing_kept = {"prediction_id": cat, "removed": False, "predictions": 0}
    assert call(app, "/predictions/{prediction_id}/photo", **removal) == (200, nothing_kept)
    status, body = call(app, "/predictions/{prediction_id}/photo", method="DELETE",
                        path_parameters={"prediction_id": "nope"})
    assert (status, body["error"]) == (404, "unknown_prediction_id")
    status, body = call(app, "/model-card", method="GET")  # the tiny model has no card
    assert (status, body["error"]) == (404, "no_model_card")


def test_the_answers_without_a_model_keep_the_contract(tmp_path):
    """503s: documented, so every check but not_a_server_error (which fails any 5xx)."""
    client, service = in_process(str(tmp_path / "missing.onnx"), str(tmp_path / "catdog.db"), load=False)
    try:
        app, checks = client.application, CONFORMANCE
        assert call(app, "/health", method="GET", checks=checks)[1]["status"] == "no_model"
        photo = {"body": {"file": uploads()["cat"]}, "media_type": "multipart/form-data"}
        assert call(app, "/predict", checks=checks, **photo)[1]["error"] == "not_ready"
        assert call(app, "/predict/batch", checks=checks, **{**photo, "body": {"file": [uploads()["cat"]]}}
                    )[1]["error"] == "not_ready"
        assert call(app, "/model-card", method="GET", checks=checks)[1]["error"] == "not_ready"
        service.stopping.set()
        assert call(app, "/health", method="GET", checks=checks) == (503, {"status": "stopping"})
        assert call(app, "/stats", method="GET")[1]["model_version"] is None
        assert call(app, "/live", method="GET") == (200, {"status": "alive"})
    finally:
        service.close()


def test_busy_and_a_failed_reload_keep_the_contract(tmp_path):
    """503 busy (another request holds the decode memory; Retry-After), per photo in a batch,
    and /health after a reload that failed (still ready, with reload_error)."""
    model_dir = tmp_path / "models"
    shutil.copytree(os.path.dirname(tiny_model()), model_dir)
    client, service = in_process(str(model_dir / "model.onnx"), str(tmp_path / "catdog.db"), decode_wait_s=0.0)
    try:
        app, photo = client.application, uploads()["cat"]
        with service.decode_budget.reserve(service.decode_budget.limit):  # as if a huge photo were decoding
            status, body = call(app, "/predict", checks=CONFORMANCE, body=photo, media_type="image/jpeg")
            assert (status, body["error"]) == (503, "busy")
            status, batch = call(app, "/predict/batch", body={"file": [photo]}, media_type="multipart/form-data")
            assert status == 200 and [r["error"] for r in batch["results"]] == ["busy"]
        (model_dir / "model.onnx").write_bytes(b"not a model")
        assert service.load("test") is False
        status, health = call(app, "/health", method="GET")
        assert status == 200 and health["reload_error"] == service.load_error
    finally:
        service.close()


def test_the_model_card_keeps_the_contract(tmp_path):
    """200 in Markdown when the model has a card (the tiny model of the other tests has none)."""
    model_dir = tmp_path / "models"
    shutil.copytree(os.path.dirname(tiny_model()), model_dir)
    (model_dir / "MODEL_CARD.md").write_text("# catdog model card: tiny-1\n", encoding="utf-8")
    client, service = in_process(str(model_dir / "model.onnx"), str(tmp_path / "catdog.db"))
    try:
        response = schema["/model-card"]["GET"].Case().call_and_validate(app=client.application, checks=CHECKS)
        assert response.status_code == 200 and response.text == "# catdog model card: tiny-1\n"
    finally:
        service.close()
