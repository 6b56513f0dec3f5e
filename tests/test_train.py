"""train.py end to end on tiny synthetic images: both architectures, MLflow read back, the
gate (a weak model is refused, a good one promoted, a broken served file refused), the model
card beside the champion and in the registry, a failing step (the run marked FAILED, no
temporary folder left), the options, save/load, ONNX export and int8 quantization, identical
train/serve preprocessing, the metrics (evaluate.py) and torchrun with 2 CPU processes. Plus a
quality check of the real champion when `make data` and `make train` have run. No test changes directory: train.py's paths are anchored, MLflow's artifacts sit beside
each test's database."""
import os
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

import catdog

pytest.importorskip("torch")  # the training stack; the service's tests need neither
pytest.importorskip("mlflow")
import mlflow
import torch

import evaluate
import nets
import promote
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COUNTS = {"train": 16, "val": 8, "test": 8, "extra": 12}  # per class; extra: the extra evaluation photos
NON_PET_KINDS = ("greenery", "grey")  # the tiny not-pets folder, 30 photos each
# What "other" is learnt and measured on in these runs (15/6/9 of each kind, no generated images).
OTHER_DATA = "({} photos, 2 kinds) + generated images; train/val/test: 30/12/18 photos + 0/0/0 generated"
# train.py's options: every one is logged as an MLflow param.
CONFIG = ["arch", "data", "out", "seed", "threads", "workers", "epochs", "batch_size", "lr", "weight_decay",
          "backbone", "mirror_view", "pretrained", "extract_batch_size", "aug_views", "head_epochs", "head_l2",
          "quantize", "calibration_images", "eval_extra", "not_pets", "synthetic", "synthetic_only", "pet_l2", "tracking_uri",
          "experiment", "registered_name"]
PARAMS = {*CONFIG, "model", "processes", "parameters", "temperature", "preprocess_resize", "preprocess_crop",
          "preprocess_mean", "preprocess_std", "train_images", "val_images", "test_images", "eval_images",
          "extra_images", "non_pets_train_images", "non_pets_val_images", "non_pets_test_images", "pet_decision",
          "pet_threshold", *(f"gate_{k}" for k in catdog.GATE)}
SCORES = ["accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "ece"]
EVAL_SCORES = [*SCORES, "accuracy_low", "accuracy_high", "images", "errors"]
# Every photo of make_dataset is under 200 px and none is dark, grey or elongated: only the
# small slice has an accuracy; every slice has its photos and errors.
SLICE_METRICS = {*(f"slice_{name}_{k}" for name in evaluate.SLICES for k in ("images", "errors")),
                 *(f"slice_small_{k}" for k in ("accuracy", "accuracy_low", "accuracy_high"))}
METRICS = {*(f"test_{k}" for k in SCORES), *(f"extra_{k}" for k in SCORES), *(f"eval_{k}" for k in EVAL_SCORES),
           *(f"torch_test_{k}" for k in SCORES), "train_seconds",
           "onnx_max_abs_prob_diff", "served_torch_label_agreement", "served_torch_max_abs_prob_diff",
           "val_accuracy_calibrated", "val_log_loss_calibrated", "val_ece_calibrated",
           "eval_pets_as_other", "other_as_pet", *(f"other_{k}_{kind}" for k in ("as_pet", "photos") for kind in NON_PET_KINDS),
           *SLICE_METRICS}
# The pet-vs-other candidates measured on val (the baseline has no ImageNet classifier).
CANDIDATES = {"baseline": ("head", "distance"), "transfer": ("imagenet", "head", "head_imagenet", "distance")}
EPOCH_METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
MODEL_FILES = {"model/model.pt", "model/model.onnx", "model/model.json", "model/reference_profile.json"}
REPORT_FILES = {"reports/confusion_matrix.png", "reports/curves.png", "reports/roc_curve.png",
                "reports/reliability_diagram.png", "reports/worst_mistakes.png",
                "reports/classification_report.txt", "reports/model_card.md", "reports/evaluation.csv",
                "reports/other_by_kind.png"}


def make_dataset(root, seed=0):
    """Cats are reddish with horizontal stripes, dogs bluish with vertical ones: easy to learn
    in seconds, so 'a good model' is reachable in a test, and varied sizes like real uploads."""
    rng = np.random.default_rng(seed)
    for split, count in COUNTS.items():
        for label, name in enumerate(catdog.CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                height, width = rng.integers(40, 64, size=2)
                base = np.array([170, 70, 60] if label == 0 else [60, 90, 180], dtype=np.float64)
                stripes = (np.arange(height)[:, None] // 4 % 2) if label == 0 else (np.arange(width)[None, :] // 4 % 2)
                pixels = base + 40 * np.broadcast_to(stripes, (height, width))[..., None] + rng.normal(0, 20, (height, width, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{name}.{i}.jpg"))
    make_non_pets(os.path.join(os.path.dirname(root), "notpets"), rng)
    return root


def make_non_pets(root, rng, count=30):
    """Neither cats nor dogs: greenish blotches and grey noise, one folder per kind."""
    for kind, base in zip(NON_PET_KINDS, ([60, 170, 70], [128, 128, 128])):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for i in range(count):
            height, width = rng.integers(40, 64, size=2)
            pixels = np.array(base) + rng.normal(0, 25, (height, width, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(root, kind, f"{i}.jpg"))


def run_train(tmp, *args):
    return train.main(["--data", str(tmp / "processed"), "--out", str(tmp / "models"),
                       "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--no-pretrained",
                       "--backbone", "efficientnet-lite0", "--eval-extra", str(tmp / "processed" / "extra"),
                       "--not-pets", str(tmp / "notpets"), "--synthetic", "0", "--extract-batch-size", "32", *args])


def runs_of(tmp):
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("catdog")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three runs against one registry: a weak baseline (0 epochs), a trained baseline, and
    a transfer model."""
    tmp = tmp_path_factory.mktemp("train")
    make_dataset(tmp / "processed")
    weak = run_train(tmp, "--arch", "baseline", "--epochs", "0")["baseline"]
    models_after_weak = sorted(os.listdir(tmp / "models")) if (tmp / "models").exists() else []
    good = run_train(tmp, "--arch", "baseline", "--epochs", "6", "--lr", "0.01", "--batch-size", "8")["baseline"]
    transfer = run_train(tmp, "--arch", "transfer", "--head-epochs", "5")["transfer"]
    return {"tmp": tmp, "weak": weak, "good": good, "transfer": transfer, "models_after_weak": models_after_weak}


def test_weak_model_is_refused_and_good_one_promoted(trained):
    client = mlflow.MlflowClient(f"sqlite:///{trained['tmp']}/mlflow.db")
    weak, good = trained["weak"], trained["good"]
    assert weak["eval_accuracy"] < catdog.GATE["min_accuracy"] and not weak["promoted"]
    assert trained["models_after_weak"] == []  # nothing reached models/
    promoted, reasons = promote.gate(weak)  # the first version: no champion to compare with
    assert not promoted and reasons[0] == f"accuracy {weak['eval_accuracy']:.4f} < {catdog.GATE['min_accuracy']}"
    assert client.get_model_version("catdog", weak["version"]).tags["gate"] == "refused: " + "; ".join(reasons)
    assert good["eval_accuracy"] >= catdog.GATE["min_accuracy"] and good["promoted"]
    assert client.get_model_version("catdog", good["version"]).tags["gate"] == "promoted"
    champion = client.get_model_version_by_alias("catdog", "champion").version
    meta = catdog.read_json(trained["tmp"] / "models" / "model.json")
    assert meta["registry_version"] == champion
    expected_arch = "transfer" if trained["transfer"]["promoted"] else "baseline"
    assert meta["arch"] == expected_arch and meta["metrics"]["eval_accuracy"] >= catdog.GATE["min_accuracy"]


def test_mlflow_runs_hold_params_metrics_artifacts_and_lineage(trained):
    tmp = trained["tmp"]
    client, runs = runs_of(tmp)
    assert [r.info.run_name for r in runs] == ["baseline", "baseline", "transfer"]
    assert [r.info.status for r in runs] == ["FINISHED"] * 3
    weak, good, transfer = runs
    assert good.data.params["epochs"] == "6" and good.data.params["lr"] == "0.01"
    assert good.data.params["preprocess_crop"] == "128" and transfer.data.params["preprocess_crop"] == "224"
    test_split = promote.split_hash(train.list_split(str(tmp / "processed"), "test"), str(tmp / "processed"))
    for run, result in ((weak, trained["weak"]), (good, trained["good"]), (transfer, trained["transfer"])):
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        assert set(params) == PARAMS
        assert (params["processes"], params["pretrained"], params["quantize"]) == ("1", "False", "True")
        assert (params["train_images"], params["test_images"]) == (str(2 * COUNTS["train"]), str(2 * COUNTS["test"]))
        assert params["parameters"] == str(result["parameters"])
        assert (params["eval_images"], params["extra_images"]) == (str(2 * COUNTS["test"] + 2 * COUNTS["extra"]),
                                                                   str(2 * COUNTS["extra"]))
        assert params["temperature"] == str(round(result["temperature"], 6))
        candidates = {f"val_{k}_{name}" for k in ("pets_as_other", "other_as_pet") for name in CANDIDATES[run.info.run_name]}
        assert set(metrics) == METRICS | candidates | (EPOCH_METRICS if run is not weak else set())
        for key in SCORES:
            assert metrics[f"test_{key}"] == pytest.approx(result[f"test_{key}"]), key  # the served file's figures
            assert metrics[f"extra_{key}"] == pytest.approx(result[f"extra_{key}"]), key
        for key in EVAL_SCORES:
            assert metrics[f"eval_{key}"] == pytest.approx(result[f"eval_{key}"]), key
        right = round(result["eval_accuracy"] * result["eval_images"])
        assert (result["eval_images"], result["eval_errors"]) == (2 * COUNTS["test"] + 2 * COUNTS["extra"],
                                                                  result["eval_images"] - right)
        assert (result["eval_accuracy_low"], result["eval_accuracy_high"]) == evaluate.wilson_interval(
            right, result["eval_images"])
        for key in ("accuracy", "accuracy_low", "accuracy_high", "images", "errors"):  # every photo is small
            assert metrics[f"slice_small_{key}"] == pytest.approx(result[f"eval_{key}"]), key
        assert all(metrics[f"slice_{name}_images"] == 0 for name in ("dark", "grey", "wide", "tall"))
        # The test split is the first part of the evaluation set: both photo counts add up.
        assert right == round(result["test_accuracy"] * 2 * COUNTS["test"] + result["extra_accuracy"] * 2 * COUNTS["extra"])
        assert metrics["train_seconds"] == pytest.approx(result["train_seconds"])
        assert metrics["onnx_max_abs_prob_diff"] <= 1e-4  # fp32 export before quantization
        assert 0 <= metrics["served_torch_max_abs_prob_diff"] <= 1  # int8 vs PyTorch
        # Fractions of the 16 test and 16 val images.
        assert (metrics["served_torch_label_agreement"] * 2 * COUNTS["test"]).is_integer()
        assert (metrics["val_accuracy_calibrated"] * 2 * COUNTS["val"]).is_integer()
        assert tags["arch"] == run.info.run_name and tags["served_as"] == "int8 ONNX"
        assert tags["gate"] == client.get_model_version("catdog", result["version"]).tags["gate"]
        assert (tags["gate"] == "promoted") == result["promoted"]
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"])  # the project's, from any folder
        assert tags["test_split_sha256"] == test_split and re.fullmatch(r"[0-9a-f]{64}", tags["eval_set_sha256"])
        assert tags["dvc_md5"] == tags["manifest_sha256"] == "None"  # the synthetic data has neither
        assert re.fullmatch(r"[0-9a-f]{64}", tags["dvc_lock_sha256"])  # the project's committed dvc.lock
        assert tags["other_trained_on"] == f"not-pets folder {tmp / 'notpets'} " + OTHER_DATA.format(60)
        artifacts = {a.path for folder in ("model", "reports") for a in client.list_artifacts(run.info.run_id, folder)}
        assert artifacts == MODEL_FILES | REPORT_FILES
        # Beside the database, not in the current directory.
        assert run.info.artifact_uri.startswith(str(tmp / "mlruns" / "catdog")), run.info.artifact_uri
    history = client.get_metric_history(good.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(6))
    assert len(client.get_metric_history(transfer.info.run_id, "train_accuracy")) == 5


def test_the_registry_champion_is_an_mlflow_model_that_answers_as_the_service(trained, tmp_path, monkeypatch):
    """models:/catdog@champion loads with mlflow.pyfunc and answers photos as serve.py does;
    registry_model.download gives the files `make image MODEL_URI=...` builds from."""
    import registry_model
    import serve

    tracking = f"sqlite:///{trained['tmp']}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("catdog", "champion")
    assert champion.source.startswith("models:/m-")  # a logged MLflow model, not a folder of files
    photos = [path for path, _ in train.list_split(str(trained["tmp"] / "processed"), "test")][::4]
    answers = mlflow.pyfunc.load_model("models:/catdog@champion").predict([open(p, "rb").read() for p in photos])
    served = serve.load_model(str(trained["tmp"] / "models" / "model.onnx"))
    for path, row in zip(photos, answers.itertuples()):
        x = catdog.preprocess(catdog.open_image(path, min_side=served.meta["preprocess"]["resize"]),
                              served.meta["preprocess"])
        label, confidence, probabilities, pet_probability, _ = catdog.answer(served.run(x[None])[0], served.meta)
        assert (row.label, row.confidence, row.pet_probability) == (label, pytest.approx(confidence),
                                                                   pytest.approx(pet_probability)), path
        assert (row.cat, row.dog) == (pytest.approx(probabilities["cat"]), pytest.approx(probabilities["dog"]))
    found = registry_model.download("models:/catdog@champion", str(tmp_path / "build"))
    assert found.version == champion.version
    assert sorted(os.listdir(tmp_path / "build")) == sorted(promote.RELEASED_FILES)
    for name in ("model.onnx", "reference_profile.json", "MODEL_CARD.md"):
        assert (tmp_path / "build" / name).read_bytes() == (trained["tmp"] / "models" / name).read_bytes()
    meta = catdog.read_json(tmp_path / "build" / "model.json")
    assert (meta["registry_version"], meta["run_id"]) == (champion.version, champion.run_id)


def test_the_champion_has_its_model_card_beside_it(trained, tmp_path):
    """models/MODEL_CARD.md: the card of the model model.json describes, with its figures; the
    same text as its run's reports/model_card.md."""
    models = trained["tmp"] / "models"
    meta = catdog.read_json(models / "model.json")
    m = meta["metrics"]
    card = (models / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# catdog model card: {meta['arch']}\n")
    assert (f"accuracy {m['eval_accuracy']:.4f}, 95 % interval\n{m['eval_accuracy_low']:.4f}-"
            f"{m['eval_accuracy_high']:.4f} ({m['eval_errors']:.0f} wrong)") in card
    assert f"**Test split alone**: accuracy {m['accuracy']:.4f}, precision {m['precision']:.4f}" in card
    assert f"{m['parameters']:,} parameters; temperature {m['temperature']:.3f}" in card
    assert f"decision\n\"{m['pet_decision']}\"" in card and f"is below\n{m['pet_threshold']:.4f}" in card
    assert meta["data"]["eval_set_sha256"] in card and meta["git_commit"] in card
    assert "**Accuracy by slice**" in card and evaluate.slice_table(m) in card
    assert (f"| small | shorter side < {evaluate.SLICE_SMALL} px | {m['eval_images']} | {m['slice_small_accuracy']:.4f} "
            f"({m['slice_small_accuracy_low']:.4f}-{m['slice_small_accuracy_high']:.4f}) | {m['eval_errors']} |") in card
    assert (f"Learnt from the train and val parts, measured on the test part of: not-pets folder "
            f"{trained['tmp'] / 'notpets'} " + OTHER_DATA.format(60)) in card
    assert meta["preprocess_fingerprint"] == catdog.preprocessing_fingerprint()  # serve.py checks it
    logged = mlflow.artifacts.download_artifacts(run_id=meta["run_id"], artifact_path="reports/model_card.md",
                                                 dst_path=str(tmp_path), tracking_uri=f"sqlite:///{trained['tmp']}/mlflow.db")
    assert open(logged).read() == card


def test_training_into_a_tracking_server_then_loading_its_champion(tmp_path, monkeypatch):
    """A team's set-up: `mlflow server` (PostgreSQL backend store, --serve-artifacts) on
    127.0.0.1; train.py registers into it over HTTP, artifacts go through the server (no local
    path in the run), and the champion loads back from it."""
    from harness import PostgresServer, free_port, wait_ready, why_no_postgres

    if why_no_postgres():
        pytest.skip(why_no_postgres())
    make_dataset(tmp_path / "processed")
    with PostgresServer() as database:
        backend = database.new_database("mlflow").replace("postgresql://", "postgresql+psycopg://")
        port = free_port()
        server = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri", backend, "--serve-artifacts",
             "--artifacts-destination", str(tmp_path / "server-artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(f"{url}/health", server, timeout=120)
            result = train.main(["--data", str(tmp_path / "processed"), "--out", str(tmp_path / "models"),
                                 "--tracking-uri", url, "--no-pretrained", "--arch", "baseline", "--epochs", "6",
                                 "--lr", "0.01", "--batch-size", "8", "--eval-extra", str(tmp_path / "processed" / "extra"),
                                 "--not-pets", str(tmp_path / "notpets"), "--synthetic", "0"])["baseline"]
            assert result["promoted"]
            monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
            mlflow.set_tracking_uri(url)
            champion = mlflow.MlflowClient().get_model_version_by_alias("catdog", "champion")
            run = mlflow.MlflowClient().get_run(champion.run_id)
            assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # server-side
            assert os.listdir(tmp_path / "server-artifacts")  # the server stored them
            photo = train.list_split(str(tmp_path / "processed"), "test")[0][0]
            answer = mlflow.pyfunc.load_model("models:/catdog@champion").predict([open(photo, "rb").read()])
            assert answer.label[0] == ("cat" if "/cat/" in photo else "dog")
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers
            server.wait(30)


def test_saved_champion_loads_and_its_served_int8_file_is_what_was_measured(trained):
    import onnx
    import onnxruntime

    models = trained["tmp"] / "models"
    model, meta = nets.load_model(str(models / "model.pt"))
    assert meta["classes"] == list(catdog.CLASSES)
    assert meta["preprocess"] == catdog.preprocess_settings(meta["arch"], meta["backbone"])
    assert meta["backbone"] == {"transfer": "efficientnet-lite0", "baseline": "simple-cnn"}[meta["arch"]]
    assert meta["served_as"] == "int8 ONNX"
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(models / "model.onnx")).graph.node}
    items = train.list_split(str(trained["tmp"] / "processed"), "test")
    batch = np.stack([catdog.preprocess(catdog.open_image(path), meta["preprocess"]) for path, _ in items])
    with torch.no_grad():
        torch_labels = model(torch.from_numpy(batch)).numpy().argmax(1)
    session = onnxruntime.InferenceSession(str(models / "model.onnx"), providers=["CPUExecutionProvider"])
    served_labels = session.run(["logits"], {"image": batch})[0].argmax(1)
    labels = np.array([label for _, label in items])
    assert np.isclose((served_labels == labels).mean(), meta["metrics"]["accuracy"])  # the gated figure
    assert (served_labels == torch_labels).mean() >= 0.9
    run = mlflow.MlflowClient(f"sqlite:///{trained['tmp']}/mlflow.db").get_run(meta["run_id"])
    assert run.data.metrics["onnx_max_abs_prob_diff"] <= 1e-4  # the fp32 export before quantization
    profile = catdog.read_json(models / "reference_profile.json")
    assert profile["count"] == 2 * COUNTS["train"] and set(profile["features"]) == set(catdog.DRIFT_FEATURES)
    confidence = profile["confidence"]
    assert len(confidence["fractions"]) == len(confidence["edges"]) + 1 and np.isclose(sum(confidence["fractions"]), 1)
    assert set(profile["shares"]) == set(catdog.DRIFT_SHARES)
    # The "other" decision: saved in the meta, applied by the served file's pet_logit.
    other = meta["other"]
    assert other["score"] == model.pet.score_name and other["score"] in nets.PET_SCORES
    pet_probs = 1 / (1 + np.exp(-session.run(["pet_logit"], {"image": batch})[0]))
    assert pet_probs.shape == (len(items),) and 0 < other["threshold"] < 1
    assert other["by_kind"].keys() == {"greenery", "grey"} and other["pets_as_other"] == meta["metrics"]["eval_pets_as_other"]
    # model.json's metrics keep the names they always had: the test split's figures unprefixed.
    assert set(meta["metrics"]) == {*SCORES, *(f"extra_{k}" for k in SCORES), *(f"eval_{k}" for k in EVAL_SCORES),
                                    "eval_pets_as_other", "other_as_pet", "train_seconds", "extra_images", "parameters",
                                    "temperature", "served_as", "pet_decision", "pet_threshold",
                                    *(f"other_{k}_{kind}" for k in ("as_pet", "photos") for kind in NON_PET_KINDS),
                                    *SLICE_METRICS}


@pytest.mark.parametrize("arch", ["baseline", "transfer"])
def test_every_onnx_output_matches_pytorch(tmp_path, arch):
    """The fp32 export computes what CatDogNet.outputs computes: cat/dog logits, the pet logit of
    each candidate decision, and the feature distance."""
    import onnxruntime

    model = nets.build_model(arch, pretrained=False, backbone="efficientnet-lite0").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in (model.pet.head.weight, model.pet.mean, model.pet.whiten):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    crop = catdog.preprocess_settings(arch, "efficientnet-lite0")["crop"]
    x = torch.randn(3, 3, crop, crop, generator=generator)
    for name in [n for n in nets.PET_SCORES if arch == "transfer" or "imagenet" not in n]:
        model.pet.score_name = name
        path = str(tmp_path / f"{name}.onnx")
        nets.export_onnx(model, catdog.model_meta(arch, backbone="efficientnet-lite0"), path)
        served = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
            list(catdog.ONNX_OUTPUTS), {"image": x.numpy()})
        with torch.no_grad():
            expected = model.outputs(x)
        for output, want in zip(served, expected):
            assert np.allclose(output, want.numpy(), rtol=1e-4, atol=1e-4), (name, output, want)


def test_frozen_features_from_onnx_runtime_are_pytorchs(tmp_path):
    """On a CPU the transfer model's features come from ONNX Runtime (train.frozen_features):
    the same numbers PyTorch computes, for every photo and in order, with one export reused."""
    root = make_dataset(str(tmp_path / "processed"))
    items = train.list_split(root, "val")
    settings = catdog.preprocess_settings("transfer", "efficientnet-lite0")
    backbone = nets.build_model("transfer", backbone="efficientnet-lite0").features.eval()
    run = train.Run(cfg=catdog.config_parser(vars(train)).parse_args([]), device=torch.device("cpu"), processes=1,
                    splits={}, others=None, evaluation=None, lineage={}, train_stats=[], client=None)
    got = train.frozen_features(run, backbone, train.Images(items, settings))
    assert backbone in nets.SESSIONS  # exported once, reused for the next photos
    want = train.predict(backbone, train.Images(items, settings), batch_size=7)
    assert got.shape == want.shape == (len(items), 1280)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_gate_judges_the_served_file_not_pytorch(tmp_path, monkeypatch):
    """A good PyTorch model whose served file is broken (here: logits negated, so every label
    flips) is refused: the gate measures what the service would run."""
    import onnx

    def broken_quantize(path, calibration):
        graph = onnx.load(path)
        (node,) = [node for node in graph.graph.node if "logits" in node.output]
        node.output[list(node.output).index("logits")] = "raw_logits"
        graph.graph.node.append(onnx.helper.make_node("Neg", ["raw_logits"], ["logits"]))
        onnx.save(graph, path)

    make_dataset(tmp_path / "processed")
    monkeypatch.setattr(nets, "quantize_onnx", broken_quantize)
    result = run_train(tmp_path, "--arch", "baseline", "--epochs", "6", "--lr", "0.01", "--batch-size", "8")["baseline"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("catdog").experiment_id])[0]
    assert run.data.metrics["torch_test_accuracy"] >= catdog.GATE["min_accuracy"]
    assert result["test_accuracy"] < 0.5 and not result["promoted"] and not (tmp_path / "models").exists()


def fail_export(monkeypatch, seen):
    """The served file disagrees with PyTorch: the fp32 parity check stops the run."""
    real = evaluate.onnx_outputs

    def shifted(*args, **kwargs):
        outputs = real(*args, **kwargs)
        return {**outputs, "probs": outputs["probs"] + 0.01}

    monkeypatch.setattr(evaluate, "onnx_outputs", shifted)
    return SystemExit, "ONNX export of baseline disagrees with PyTorch by 1.00e-02 (> 1e-4)"


def fail_logging(monkeypatch, seen):
    """Any other error, here once the folder holds the exported files."""
    def log_run(run, candidate):
        seen["folder"], seen["files"] = candidate.folder, sorted(os.listdir(candidate.folder))
        raise OSError("disk full")

    monkeypatch.setattr(promote, "log_run", log_run)
    return OSError, "disk full"


@pytest.mark.parametrize("failure", [fail_export, fail_logging])
def test_a_failing_step_marks_the_run_failed_and_leaves_no_temporary_folder(tmp_path, monkeypatch, failure):
    make_dataset(tmp_path / "processed")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where train.py's folders go
    seen = {}
    error, message = failure(monkeypatch, seen)
    with pytest.raises(error) as raised:
        run_train(tmp_path, "--arch", "baseline", "--epochs", "0")
    assert str(raised.value) == message  # only main() turns ExportMismatch into an exit
    assert mlflow.active_run() is None
    _, runs = runs_of(tmp_path)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("baseline", "FAILED")]
    assert [name for name in os.listdir(tmp_path / "tmp") if name.startswith("catdog-")] == []
    if seen:  # the folder existed, with the served file, and is gone
        assert seen["files"] == ["model.json", "model.onnx"] and not os.path.exists(seen["folder"])
    assert not (tmp_path / "models").exists()


def test_options_are_explained_and_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    for name in CONFIG:
        assert f"--{name.replace('_', '-')} " in text or f"--{name.replace('_', '-')}," in text, name
    assert text.count("(default:") == len(CONFIG)  # config_parser adds it to each option's help
    assert "--pretrained, --no-pretrained" in text and "--quantize, --no-quantize" in text
    for wrong in (["--quantize", "flase"], ["--quantize", "false"], ["--arch", "cnn"], ["--epochs", "two"]):
        with pytest.raises(SystemExit) as done:
            train.main(wrong)
        assert done.value.code == 2, wrong  # argparse's usage error, before any work
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        train.main(["--data", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert str(done.value) == f"no images in {tmp_path}/train/{{cat,dog}}/ (run `make data` first)"
    assert os.listdir(tmp_path) == []  # stopped before MLflow was touched


def test_missing_not_pets_photos_stop_training_unless_synthetic_only_is_asked(tmp_path):
    """Without photos that are neither cats nor dogs "other" would be learnt from generated
    images alone: training stops and says what is missing where, before MLflow is touched;
    --synthetic-only trains so on purpose, and the run says which data "other" saw."""
    make_dataset(tmp_path / "processed")
    (tmp_path / "empty" / "bird").mkdir(parents=True)
    refused = {str(tmp_path / "absent"): f"the not-pets folder {tmp_path / 'absent'} does not exist",
               str(tmp_path / "empty"): f"the not-pets folder {tmp_path / 'empty'} holds no photos in kind subfolders "
                                        f"({tmp_path / 'empty'}/<kind>/*.jpg)",
               "": 'no not-pets folder is given (--not-pets "")'}
    for folder, problem in refused.items():
        with pytest.raises(SystemExit) as done:
            run_train(tmp_path, "--arch", "baseline", "--epochs", "0", "--not-pets", folder, "--synthetic", "20")
        assert str(done.value).startswith(problem + ': "other" (neither a cat nor a dog) would be learnt and '
                                          "measured on generated images alone. Give --not-pets a folder"), folder
        assert str(done.value).endswith("or pass --synthetic-only if generated images alone are intended")
        assert not (tmp_path / "mlflow.db").exists()
    result = run_train(tmp_path, "--arch", "baseline", "--epochs", "0", "--synthetic", "10", "--synthetic-only")
    (run,) = runs_of(tmp_path)[1]
    assert run.data.params["synthetic_only"] == "True" and run.data.params["non_pets_test_images"] == "5"
    assert run.data.tags["other_trained_on"] == ("no not-pets photos (--synthetic-only) + generated images; "
                                                 "train/val/test: 0/0/0 photos + 10/5/5 generated")
    assert result["baseline"]["version"] is not None


def test_quantize_onnx_keeps_predictions_and_shrinks_the_file(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = nets.build_model("baseline").eval()
    meta = catdog.model_meta("baseline")
    path = str(tmp_path / "model.onnx")
    nets.export_onnx(model, meta, path)
    crop = meta["preprocess"]["crop"]
    x = np.random.default_rng(0).normal(0, 1, (32, 3, crop, crop)).astype(np.float32)
    fp32_size = os.path.getsize(path)
    fp32 = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    nets.quantize_onnx(path, (x[i:i + 8] for i in range(0, 32, 8)))
    int8 = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    assert os.path.getsize(path) < fp32_size / 2
    assert np.abs(catdog.softmax(int8) - catdog.softmax(fp32)).max() < 0.05
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.onnx"]  # no temporary files left


def test_changed_evaluation_set_remeasures_the_champion(trained, tmp_path, capsys):
    """The champion and the candidate are compared photo by photo: on a changed evaluation set
    the champion's served file is measured again on the candidate's photos."""
    import shutil

    import onnxruntime

    shutil.copytree(trained["tmp"] / "processed", tmp_path / "processed")
    shutil.copytree(trained["tmp"] / "notpets", tmp_path / "notpets")
    os.remove(train.list_split(str(tmp_path / "processed"), "test")[0][0])
    shutil.copyfile(trained["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # same registry, same champion
    result = run_train(tmp_path, "--arch", "baseline", "--epochs", "0")["baseline"]
    printed = capsys.readouterr().out
    models = trained["tmp"] / "models"
    meta = catdog.read_json(models / "model.json")
    evaluation = evaluate.evaluation_set(train.list_split(str(tmp_path / "processed"), "test"),
                                      str(tmp_path / "processed" / "extra"), str(tmp_path / "processed"))
    batch = np.stack([catdog.preprocess(catdog.open_image(path), meta["preprocess"]) for path, _ in evaluation.items])
    session = onnxruntime.InferenceSession(str(models / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = catdog.softmax(session.run(["logits"], {"image": batch})[0])
    figures = evaluate.scores(probs, evaluation.labels)
    assert (f"champion v{meta['registry_version']} ({meta['arch']}) re-measured on these photos: "
            f"accuracy {figures['accuracy']:.4f}, log-loss {figures['log_loss']:.4f}") in printed
    assert not result["promoted"] and not (tmp_path / "models").exists()
    assert "re-measured on these photos): " in printed.split("NOT PROMOTED:")[1]


def test_unchanged_evaluation_set_reuses_the_champions_answers(trained, tmp_path, capsys):
    import shutil

    shutil.copytree(trained["tmp"] / "processed", tmp_path / "processed")
    shutil.copytree(trained["tmp"] / "notpets", tmp_path / "notpets")
    shutil.copyfile(trained["tmp"] / "mlflow.db", tmp_path / "mlflow.db")
    run_train(tmp_path, "--arch", "baseline", "--epochs", "0")
    meta = catdog.read_json(trained["tmp"] / "models" / "model.json")
    printed = capsys.readouterr().out
    assert (f"champion v{meta['registry_version']} ({meta['arch']}) on the same photos: "
            f"accuracy {meta['metrics']['eval_accuracy']:.4f}") in printed
    images = 2 * COUNTS["test"] + 2 * COUNTS["extra"]
    assert f"evaluation set: {images} photos, of which 0 dark, {images} small, 0 grey, 0 wide, 0 tall (slices)" in printed
    small = next(line.split() for line in printed.splitlines() if line.startswith("  small "))  # the gate's table
    assert small[:3] == ["small", str(images), f"{meta['metrics']['eval_accuracy']:.4f}"] and small[-1] == "yes"


@pytest.mark.parametrize("arch", ["baseline", "transfer"])
def test_train_eval_transform_equals_serving_transform(tmp_path, arch):
    make_dataset(tmp_path)
    items = train.list_split(str(tmp_path), "val")
    meta = catdog.model_meta(arch)
    for index in (0, len(items) - 1):
        train_view, _ = train.Images(items, catdog.preprocess_settings(arch))[index]
        with open(items[index][0], "rb") as f:
            data = f.read()
        served = catdog.preprocess(catdog.open_image(data, min_side=meta["preprocess"]["resize"]),  # as serve.py
                                   meta["preprocess"])
        assert train_view.dtype == torch.float32 and np.array_equal(train_view.numpy(), served)


def test_augmentation_is_seeded_and_ends_in_the_shared_preprocessing(tmp_path):
    make_dataset(tmp_path)
    items = train.list_split(str(tmp_path), "train")
    augmented = train.Images(items, catdog.preprocess_settings("baseline"), augment=True, seed=1)
    first, again = augmented[3][0], augmented[3][0]
    augmented.epoch = 1
    other_epoch = augmented[3][0]
    plain = train.Images(items, catdog.preprocess_settings("baseline"))[3][0]
    assert torch.equal(first, again) and not torch.equal(first, other_epoch)
    assert first.shape == plain.shape == (3, 128, 128) and not torch.equal(first, plain)


# "other" figures inside every target: 2 kinds, one too small to be judged on its own.
OTHER_OK = {"eval_pets_as_other": 0.0, "other_as_pet": 0.01, "other_as_pet_bird": 0.04, "other_photos_bird": 25,
            "other_as_pet_food": 0.5, "other_photos_food": 6}


def test_gate_rules():
    good = {"eval_accuracy": 0.99, "eval_log_loss": 0.03, "eval_ece": 0.01, **OTHER_OK}
    assert promote.gate(good) == (True, [])
    for key, value, reason in (("eval_accuracy", 0.5, "accuracy 0.5000 < 0.97"),
                               ("eval_log_loss", 0.7, "log-loss 0.7000 > 0.1"), ("eval_ece", 0.2, "ECE 0.2000 > 0.05"),
                               ("eval_pets_as_other", 0.004, "pets answered other 0.0040 > 0.003"),
                               ("other_as_pet", 0.03, "non-pets answered cat or dog 0.0300 > 0.02"),
                               ("other_as_pet_bird", 0.08, "bird answered cat or dog 0.0800 > 0.05")):
        assert promote.gate({**good, key: value}) == (False, [reason])
    assert promote.gate({**good, "eval_log_loss": float("nan")}) == (False, ["log-loss nan > 0.1"])


def champion(only_champion_right, only_candidate_right, log_loss, slices=None):
    return {"accuracy": 0.99, "log_loss": log_loss, "only_champion_right": only_champion_right,
            "only_candidate_right": only_candidate_right, "slices": slices or {}}


def test_gate_lets_one_more_mistake_through_with_a_better_log_loss():
    good = {"eval_accuracy": 0.99, "eval_log_loss": 0.02, "eval_ece": 0.01, **OTHER_OK}
    assert promote.gate(good, champion(1, 0, log_loss=0.03)) == (True, [])
    assert promote.gate(good, champion(4, 1, log_loss=0.03)) == (True, [])  # p = 0.19: noise


def test_gate_refuses_one_fewer_mistake_with_a_worse_log_loss():
    good = {"eval_accuracy": 0.99, "eval_log_loss": 0.04, "eval_ece": 0.01, **OTHER_OK}
    assert promote.gate(good, champion(0, 1, log_loss=0.03)) == (False, [
        "as accurate as the champion within noise (1 vs 0 photos only one got right) and log-loss 0.0400 > "
        "champion's 0.0300"])
    assert promote.gate(good, champion(0, 6, log_loss=0.03)) == (True, [])  # significantly more accurate: p = 0.016


def test_gate_refuses_a_significantly_less_accurate_candidate_whatever_its_log_loss():
    good = {"eval_accuracy": 0.99, "eval_log_loss": 0.01, "eval_ece": 0.01, **OTHER_OK}
    assert promote.gate(good, champion(6, 0, log_loss=0.03)) == (False, [
        "less accurate than the champion: 6 photos only the champion got right, 0 only this one (McNemar p = 0.016)"])
    assert evaluate.mcnemar_p(6, 0) == 1 / 64 and evaluate.mcnemar_p(4, 1) == 6 / 32


def test_gate_refuses_a_candidate_as_good_overall_but_worse_on_dark_photos(capsys):
    """Paired answers built by hand on 2,300 photos: the candidate gets 6 photos right that the
    champion missed and misses 6 the champion got right, so overall it is as accurate and
    better calibrated; but the 6 it misses are all among the 40 dark photos."""
    dark, grey = np.arange(2300) < 40, np.arange(2300) >= 2280
    champion_right, candidate_right = np.ones(2300, dtype=bool), np.ones(2300, dtype=bool)
    candidate_right[:6] = False                # dark photos only the champion gets right
    champion_right[100:106] = False            # elsewhere, photos only the candidate gets right
    candidate_right[2280:2286] = False         # 20 grey photos: too few to be judged
    champion_right[200:206] = False
    slices = {name: promote.paired(champion_right[members], candidate_right[members])
              for name, members in (("dark", dark), ("grey", grey))}
    overall = promote.paired(champion_right, candidate_right)
    assert overall["champion_right"] == overall["candidate_right"]
    good = {"eval_accuracy": 0.99, "eval_log_loss": 0.02, "eval_ece": 0.01, **OTHER_OK}
    verdict = promote.gate(good, {**champion(overall["only_champion_right"], overall["only_candidate_right"],
                                             log_loss=0.03), "slices": slices})
    assert verdict == (False, [f"less accurate than the champion on dark photos (mean luminance < {evaluate.SLICE_DARK} "
                               "of 255, 40 photos): 6 only the champion got right, 0 only this one (McNemar p = 0.016)"])
    assert slices["grey"]["only_champion_right"] == 6 and slices["grey"]["images"] < catdog.GATE["slice_min_photos"]
    assert promote.gate(good, champion(12, 12, log_loss=0.03, slices={"grey": slices["grey"]})) == (True, [])
    # Five slices judged: each is tested at 0.05 / 5, so 6 to 0 (p = 0.016) no longer refuses, 7 to 0 does.
    others = {name: promote.paired(np.ones(60, dtype=bool), np.ones(60, dtype=bool))
              for name in ("small", "wide", "tall", "grey")}
    assert promote.gate(good, champion(12, 12, log_loss=0.03, slices={**others, "dark": slices["dark"]}))[0]
    candidate_right[6] = False
    dark7 = promote.paired(champion_right[dark], candidate_right[dark])
    assert not promote.gate(good, champion(13, 12, log_loss=0.03, slices={**others, "dark": dark7}))[0]
    table = promote.slice_comparison(slices).splitlines()
    assert table[0].split() == ["slice", "photos", "champion", "candidate", "only", "champion", "only", "candidate",
                                "McNemar", "p", "judged"]
    assert table[1].split() == ["dark", "40", "1.0000", "0.8500", "6", "0", "0.016", "yes"]
    assert table[2].split() == ["grey", "20", "1.0000", "0.7000", "6", "0", "0.016", "no", "(<", "30", "photos)"]


def test_wilson_interval_matches_its_formula():
    low, high = evaluate.wilson_interval(2290, 2300)
    assert (round(low, 4), round(high, 4)) == (0.9920, 0.9976)
    assert evaluate.wilson_interval(300, 300)[1] == pytest.approx(1.0) and evaluate.wilson_interval(0, 0) == (0.0, 1.0)
    assert round(evaluate.wilson_interval(300, 300)[0], 4) == 0.9874  # 300 right of 300 still allows 98.7 %


def test_metrics_match_definitions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(np.clip(labels * 0.3 + rng.uniform(0, 0.7, 200), 0, 1), 1)  # many ties
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert np.isclose(evaluate.roc_auc(scores, labels), brute)
    probs = np.stack([1 - scores, scores], 1)
    metrics = evaluate.scores(probs, labels)
    predicted = probs.argmax(1)
    assert np.isclose(metrics["accuracy"], np.mean(predicted == labels))
    assert np.isclose(metrics["recall"], np.sum((predicted == 1) & (labels == 1)) / np.sum(labels == 1))
    # Perfectly calibrated in every bin: confidence 0.8 and 80 % right.
    calibrated = np.tile([[0.2, 0.8]], (10, 1))
    assert evaluate.expected_calibration_error(calibrated, np.array([1] * 8 + [0] * 2)) < 1e-9
    assert np.isclose(evaluate.scores(calibrated, np.array([1] * 8 + [0] * 2))["log_loss"],
                      -(0.8 * np.log(0.8) + 0.2 * np.log(0.2)))


def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this Python")
    make_dataset(tmp_path / "processed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "train.py"),
                             "--data", str(tmp_path / "processed"), "--out", str(tmp_path / "models"),
                             "--epochs", "2", "--head-epochs", "3", "--no-pretrained", "--backbone", "efficientnet-lite0",
                             "--eval-extra", str(tmp_path / "processed" / "extra"), "--extract-batch-size", "32",
                             "--not-pets", str(tmp_path / "notpets"), "--synthetic", "4"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)  # any folder will do
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("== baseline") == 1  # rank 0 prints
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("catdog").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["baseline", "transfer"]  # only rank 0 logs
    assert [r.data.params["processes"] for r in runs] == ["2", "2"]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]


def test_champion_quality_on_the_shared_sample():
    """The real champion (make data && make train) on the processed test split: >= 99 %."""
    import onnxruntime

    models, test_dir = os.path.join(ROOT, "models"), os.path.join(ROOT, "data", "processed", "test")
    if not os.path.exists(os.path.join(models, "model.onnx")) or not os.path.isdir(test_dir):
        pytest.skip("needs models/model.onnx and data/processed/test (run `make data train`)")
    if not os.path.isdir(os.path.join(ROOT, "..", "shared", "datasets", "dogs-vs-cats-3k")):
        pytest.skip("the shared sample ../shared/datasets/dogs-vs-cats-3k is absent")
    meta = catdog.read_json(os.path.join(models, "model.json"))
    session = onnxruntime.InferenceSession(os.path.join(models, "model.onnx"), providers=["CPUExecutionProvider"])
    items = train.list_split(os.path.join(ROOT, "data", "processed"), "test")
    correct = 0
    for start in range(0, len(items), 50):
        chunk = items[start:start + 50]
        batch = np.stack([catdog.preprocess(catdog.open_image(path), meta["preprocess"]) for path, _ in chunk])
        predicted = session.run(["logits"], {"image": batch})[0].argmax(1)
        correct += int(np.sum(predicted == np.array([label for _, label in chunk])))
    assert len(items) >= 100 and correct / len(items) >= 0.99, f"{correct}/{len(items)}"
