"""The served model as an MLflow model: what every training run logs and registers (MLflow's
"models from code": this file is the model's code), so a release is built from the registry
(`make image MODEL_URI=models:/catdog@champion`) and anyone can score photos with it:

    model = mlflow.pyfunc.load_model("models:/catdog@champion")
    model.predict([open("cat.1.jpg", "rb").read()])  # a DataFrame: label, confidence, pet_probability, cat, dog

    python registry_model.py models:/catdog@champion build/model   # its files, for an image

Its artifacts are the files the service serves, model.onnx (the int8 file that was gated),
model.json and reference_profile.json, and the model card, MODEL_CARD.md (promote.RELEASED_FILES).
Decoding, preprocessing and the answer are catdog.py's, logged beside this file, as the service
uses them.
"""
import os
import shutil
import sys
import tempfile

import mlflow
import onnxruntime as ort
import pandas as pd

import catdog


class CatdogModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.meta = catdog.read_json(context.artifacts["model.json"])
        self.session = ort.InferenceSession(context.artifacts["model.onnx"], providers=["CPUExecutionProvider"])

    def predict(self, context, model_input, params=None):
        """Photos as bytes (a list, or a DataFrame column "image") -> one row of answers each."""
        photos = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        rows = []
        for data in photos:
            img = catdog.open_image(bytes(data), min_side=self.meta["preprocess"]["resize"])
            x = catdog.preprocess(img, self.meta["preprocess"])[None]
            outputs = [output[0] for output in self.session.run(list(catdog.ONNX_OUTPUTS), {"image": x})]
            label, confidence, probabilities, pet_probability, _ = catdog.answer(outputs, self.meta)
            rows.append({"label": label, "confidence": confidence, "pet_probability": pet_probability,
                         **probabilities})
        return pd.DataFrame(rows, columns=["label", "confidence", "pet_probability", *self.meta["classes"]])


def registered_version(client, uri):
    """The registry's ModelVersion of models:/NAME@ALIAS or models:/NAME/VERSION."""
    name_and_ref = uri.removeprefix("models:/")
    if "@" in name_and_ref:
        return client.get_model_version_by_alias(*name_and_ref.split("@", 1))
    name, _, version = name_and_ref.partition("/")
    return client.get_model_version(name, version)


def download(uri, dest):
    """The artifacts of a registered model (in the registry at $MLFLOW_TRACKING_URI, else the
    project's mlflow.db), its served files and model card, into `dest`: what `make image
    MODEL_URI=...` builds from; model.json is stamped with its registry name, version and run.
    The ModelVersion."""
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", catdog.TRACKING_URI))
    client = mlflow.MlflowClient()
    version = registered_version(client, uri)
    with tempfile.TemporaryDirectory(prefix="catdog-registry-") as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                    dst_path=folder)
        os.makedirs(dest, exist_ok=True)
        for name in os.listdir(os.path.join(local, "artifacts")):
            shutil.copyfile(os.path.join(local, "artifacts", name), os.path.join(dest, name))
    meta_path = os.path.join(dest, "model.json")
    meta = catdog.read_json(meta_path)
    meta.update(registered_model=version.name, registry_version=version.version, run_id=version.run_id)
    catdog.write_json(meta_path, meta)
    return version


mlflow.models.set_model(CatdogModel())

if __name__ == "__main__":  # python registry_model.py models:/catdog@champion build/model
    found = download(*sys.argv[1:3])
    print(f"{found.name} v{found.version} (run {found.run_id}) -> {sys.argv[2]}", file=sys.stderr)
