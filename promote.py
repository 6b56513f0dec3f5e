"""From a measured candidate to the champion: where it comes from (lineage), what MLflow records
of it, the gate, and the registry.

- lineage: the code's commit, the data's DVC md5, dvc.lock, the manifest, the test split and
  the evaluation set, as MLflow tags and in model.json; and the training photos' statistics,
  the drift profile's reference (reference_profile.json);
- MLflow: params, metrics and tags of the run, the model files as model/, the reports as
  reports/, and the MLflow model the registry releases (registry_model.py: the served files and
  the model card);
- the gate: catdog.GATE's thresholds on the evaluation set, then the current champion compared
  photo by photo on the same photos (one-sided McNemar test, then log-loss), overall and in
  each slice of the evaluation set big enough to judge (evaluate.SLICES);
- the registry: a new version of `catdog`, aliased champion (its files written to --out, for
  serving) or challenger.

train.py calls open_registry, lineage_of and training_image_stats once, then log_run and
register_and_gate for each model; `run` is its train.Run, `candidate` its train.Candidate.
Only rank 0 gets here.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

import catdog
import evaluate
import nets

RELEASED_FILES = (*catdog.SERVED_FILES, catdog.MODEL_CARD)  # the registry's MLflow model: what a release is built from
DVC_LOCK = os.path.join(catdog.ROOT, "dvc.lock")


# ---------------------------------------------------------------- lineage, and the photos the drift profile describes
def lineage_of(data_dir, test_items, evaluation):
    """Where a model comes from, as MLflow tags (strings, "None" when unknown): the code's
    commit, the data's DVC md5, dvc.lock and manifest, the identity of the test split and of the
    evaluation set, and how many harvested feedback photos its training split holds (the
    quality report preprocess.py writes beside the manifest)."""
    feedback = feedback_report(data_dir)
    found = {"git_commit": git_commit(), "dvc_md5": dvc_hash(data_dir), "dvc_lock_sha256": dvc_lock_sha256(),
             "manifest_sha256": manifest_sha256(data_dir),
             "test_split_sha256": split_hash(test_items, data_dir), "eval_set_sha256": evaluation.identity(),
             "feedback_photos": feedback.get("trained", 0) if feedback is not None else None}
    return {k: str(v) for k, v in found.items()}


def feedback_report(data_dir):
    """The "feedback" part of the quality report preprocess.py writes beside the manifest ({}
    when the data has no feedback photos), None when there is no report."""
    manifest = evaluate.manifest_path(data_dir)
    report = os.path.join(os.path.dirname(manifest), "quality_report.json") if manifest else ""
    return catdog.read_json(report).get("feedback", {}) if os.path.isfile(report) else None


def unchecked_feedback(data_dir, eval_extra):
    """A warning when the data's feedback photos were checked for copies of other extra
    evaluation photos than eval_extra's (train.py --eval-extra against preprocess.py's): one of
    them may then copy a photo this run is measured on. None when it is the same folder, or
    there is none, or no feedback photo was trained on."""
    feedback = feedback_report(data_dir) or {}
    if not (eval_extra and feedback.get("trained")):
        return None
    checked = feedback.get("checked_against", {}).get("eval_extra")  # relative to the report
    checked = checked and os.path.normpath(os.path.join(os.path.dirname(evaluate.manifest_path(data_dir)), checked))
    if checked and os.path.realpath(checked) == os.path.realpath(eval_extra):
        return None
    return (f"the {feedback['trained']} feedback photos in the training split were checked for copies of the extra "
            f"evaluation photos of {checked or 'no folder'}, not of {eval_extra}, which this run is measured on: "
            f"check them with preprocess.py --eval-extra {eval_extra}")


def git_commit():
    """HEAD of the project's repository (+ "-dirty" with uncommitted changes), or None."""
    def git(*args, check=False):
        return subprocess.run(["git", *args], cwd=catdog.ROOT, capture_output=True, text=True,
                              check=check).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD", check=True)
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def dvc_hash(data_dir):
    """The md5 dvc.lock records for the processed data (the data stage's output: its folder
    or the folder above it, as data/ is for data/processed), if any."""
    folder = os.path.abspath(data_dir)
    for entry in dvc_lock().get("stages", {}).get("data", {}).get("outs") or []:
        if os.path.join(catdog.ROOT, entry.get("path", "")) in (folder, os.path.dirname(folder)):
            return entry.get("md5")
    return None


def dvc_lock_sha256():
    """sha256 of the project's dvc.lock as training starts: with a clean git_commit, the
    committed lock (the train stage's deps and the data hash this run used)."""
    return catdog.sha256_file(DVC_LOCK) if os.path.isfile(DVC_LOCK) else None


def dvc_lock():
    import yaml

    if not os.path.isfile(DVC_LOCK):
        return {}
    with open(DVC_LOCK) as f:
        return yaml.safe_load(f) or {}


def manifest_sha256(data_dir):
    path = evaluate.manifest_path(data_dir)
    return catdog.sha256_file(path) if path else None


def split_hash(items, root):
    """Identity of a split: sha256 over (relative path, file sha256). Two runs compare test
    accuracy directly only when this matches."""
    digest = hashlib.sha256()
    for path, label in items:
        digest.update(f"{os.path.relpath(path, root)}\t{label}\t{catdog.sha256_file(path)}\n".encode())
    return digest.hexdigest()


def training_image_stats(items, data_dir, limit=3000):
    """catdog.image_stats of the training photos (up to `limit`, evenly spaced) for the drift
    profile. The service sees original uploads of any size, so each photo is the original
    the manifest names when it is here, else the processed copy (always 224x224); without a
    manifest, the processed `items`."""
    manifest = evaluate.manifest_path(data_dir)
    rows = catdog.read_manifest(manifest, split="train") if manifest else []
    paths = [row["photo"] for row in rows if row["photo"]] or [path for path, _ in items]
    step = max(1, len(paths) // limit)
    return [catdog.image_stats(catdog.open_image(path)) for path in paths[::step]]


# ---------------------------------------------------------------- the registry
def open_registry(cfg):
    """An MlflowClient on cfg.tracking_uri, with cfg.experiment active and the registered
    model cfg.registered_name created if need be."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(cfg.experiment) is None:
        client.create_experiment(cfg.experiment, artifact_location=artifact_root(cfg.tracking_uri, cfg.experiment))
    mlflow.set_experiment(cfg.experiment)
    try:
        client.get_registered_model(cfg.registered_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(cfg.registered_name)
    return client


def artifact_root(tracking_uri, experiment):
    """Where a new experiment keeps its artifacts: in mlruns/ beside a sqlite database, as
    MLflow's default ./mlruns would be if training ran from the database's folder (that
    default follows the current directory); for any other store, None: the store decides."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = os.path.abspath(tracking_uri[len("sqlite:///"):].split("?")[0])
    return os.path.join(os.path.dirname(database), "mlruns", experiment)


# ---------------------------------------------------------------- MLflow logging
def log_run(run, candidate):
    """The active run's params, metrics and tags; the model files as artifacts model/, the
    reports as reports/; then the MLflow model the registry releases (log_registry_model)."""
    import mlflow

    folder = candidate.folder
    mlflow.log_params(params(run, candidate))
    mlflow.log_metrics({**candidate.metrics, **candidate.checks})
    mlflow.set_tags({**run.lineage, "arch": candidate.trained.which, "served_as": candidate.facts["served_as"],
                     "other_trained_on": run.others.described()})
    nets.save_model(candidate.trained.model, candidate.meta, os.path.join(folder, "model.pt"))  # and model.json, metrics included
    catdog.write_json(os.path.join(folder, "reference_profile.json"),
                      catdog.reference_profile(run.train_stats, candidate.val_probs.max(1), candidate.val_distances))
    mlflow.log_artifacts(folder, "model")
    reports = os.path.join(folder, "reports")  # made after model/ is logged, so not part of it
    evaluate.write_reports(reports, run, candidate)
    mlflow.log_artifacts(reports, "reports")
    shutil.copyfile(os.path.join(reports, "model_card.md"), os.path.join(folder, catdog.MODEL_CARD))
    return log_registry_model(folder)


def params(run, candidate):
    """The run's MLflow params: every option, then what the model and its data are."""
    facts = candidate.facts
    return {**vars(run.cfg), "model": candidate.trained.which, "processes": run.processes,
            "parameters": facts["parameters"], "temperature": round(facts["temperature"], 6),
            **{f"preprocess_{k}": v for k, v in candidate.meta["preprocess"].items()},
            **{f"{split}_images": len(items) for split, items in run.splits.items()},
            "eval_images": len(run.evaluation.items), "extra_images": facts["extra_images"],
            **{f"non_pets_{split}_images": len(items) for split, items in run.others.parts.items()},
            "pet_decision": facts["pet_decision"], "pet_threshold": round(facts["pet_threshold"], 6),
            **{f"gate_{k}": v for k, v in catdog.GATE.items()}}


def log_registry_model(folder):
    """The RELEASED_FILES of `folder` as an MLflow model (registry_model.py): what the registry
    releases and mlflow.pyfunc.load_model loads. Its requirements are the serving pins of
    requirements.txt."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name="catdog", python_model=os.path.join(catdog.ROOT, "registry_model.py"),
        artifacts={name: os.path.join(folder, name) for name in RELEASED_FILES},
        code_paths=[os.path.join(catdog.ROOT, "catdog.py")], pip_requirements=serving_pins())


def serving_pins(names=("onnxruntime", "numpy", "pillow", "pillow-heif", "pandas")):
    """The requirements.txt lines (name==version) of what registry_model.py imports."""
    with open(os.path.join(catdog.ROOT, "requirements.txt")) as f:
        pins = dict(line.strip().split("==", 1) for line in f if "==" in line and not line.startswith("#"))
    return [f"{name}=={pins[name]}" for name in names if name in pins]


# ---------------------------------------------------------------- the gate
def register_and_gate(run, candidate, logged):
    """A new registry version of the run's logged MLflow model, promoted to champion (its files
    written to cfg.out) when it passes the gate, else challenger; (promoted?, version)."""
    import mlflow

    cfg, client = run.cfg, run.client
    version = client.create_model_version(cfg.registered_name, logged.model_uri, run_id=candidate.meta["run_id"],
                                          tags={"arch": candidate.trained.which}, model_id=logged.model_id).version
    champion, against = compare_with_champion(run, candidate.eval_probs)
    promoted, reasons = gate(candidate.metrics, champion)
    verdict = "promoted" if promoted else "refused: " + "; ".join(reasons)
    client.set_registered_model_alias(cfg.registered_name, "champion" if promoted else "challenger", version)
    client.set_model_version_tag(cfg.registered_name, version, "gate", verdict)
    if promoted:
        write_champion(candidate.folder, cfg.out, {"registered_model": cfg.registered_name, "registry_version": version})
        print(f"  PROMOTED: {cfg.registered_name} v{version} is the champion ({against}); written to {cfg.out}/",
              flush=True)
    else:
        print(f"  NOT PROMOTED: {cfg.registered_name} v{version} stays challenger ({against}): " + "; ".join(reasons),
              flush=True)
    mlflow.set_tag("gate", verdict)
    return promoted, version


def gate(metrics, champion=None, thresholds=catdog.GATE):
    """(promote?, reasons it may not), on the evaluation set (metrics["eval_*"]).

    Absolute thresholds first. Then the champion, judged on the same photos: refused when
    it is significantly less accurate (one-sided exact McNemar test on the photos only one of
    the two got right, p < thresholds["significance"]); when neither is significantly more
    accurate, the lower log-loss wins. So one photo more or less decides nothing by itself:
    a better-calibrated model with one more mistake goes through, a worse-calibrated one with
    one fewer does not. Last, each slice of at least thresholds["slice_min_photos"] photos on its own: refused
    when significantly less accurate than the champion there (the same test on the slice's
    photos, at the significance shared among the judged slices), so a regression on dark photos
    is not hidden by gains elsewhere."""
    reasons = []
    if not metrics["eval_accuracy"] >= thresholds["min_accuracy"]:
        reasons.append(f"accuracy {metrics['eval_accuracy']:.4f} < {thresholds['min_accuracy']}")
    if not metrics["eval_log_loss"] <= thresholds["max_log_loss"]:
        reasons.append(f"log-loss {metrics['eval_log_loss']:.4f} > {thresholds['max_log_loss']}")
    if not metrics["eval_ece"] <= thresholds["max_ece"]:
        reasons.append(f"ECE {metrics['eval_ece']:.4f} > {thresholds['max_ece']}")
    reasons += other_gate(metrics, thresholds)
    if champion is not None:
        only_champion, only_candidate = champion["only_champion_right"], champion["only_candidate_right"]
        worse_p = evaluate.mcnemar_p(only_champion, only_candidate)
        better_p = evaluate.mcnemar_p(only_candidate, only_champion)
        if worse_p < thresholds["significance"]:
            reasons.append(f"less accurate than the champion: {only_champion} photos only the champion got right, "
                           f"{only_candidate} only this one (McNemar p = {worse_p:.3f})")
        elif better_p >= thresholds["significance"] and metrics["eval_log_loss"] > champion["log_loss"]:
            reasons.append(f"as accurate as the champion within noise ({only_candidate} vs {only_champion} photos "
                           f"only one got right) and log-loss {metrics['eval_log_loss']:.4f} > champion's "
                           f"{champion['log_loss']:.4f}")
        reasons += slice_gate(champion["slices"], thresholds)
    return not reasons, reasons


def slice_gate(slices, thresholds):
    """Reasons the candidate is significantly less accurate than the champion in a slice of at
    least thresholds["slice_min_photos"] photos (slices: compare_with_champion's), each tested
    at the significance divided by the number of slices judged."""
    judged = {name: paired for name, paired in slices.items() if paired["images"] >= thresholds["slice_min_photos"]}
    # Bonferroni: with five slices each tested at 5 %, an equal candidate would be refused far
    # more often than one time in twenty.
    level = thresholds["significance"] / max(1, len(judged))
    reasons = []
    for name, paired in judged.items():
        worse_p = evaluate.mcnemar_p(paired["only_champion_right"], paired["only_candidate_right"])
        if worse_p < level:
            reasons.append(f"less accurate than the champion on {name} photos ({evaluate.SLICES[name][0]}, "
                           f"{paired['images']} photos): {paired['only_champion_right']} only the champion got right, "
                           f"{paired['only_candidate_right']} only this one (McNemar p = {worse_p:.3f})")
    return reasons


def other_gate(metrics, thresholds):
    """Reasons the "other" decision misses its targets (metrics of evaluate.flat_other)."""
    reasons = []
    if not metrics["eval_pets_as_other"] <= thresholds["max_pets_as_other"]:
        reasons.append(f"pets answered other {metrics['eval_pets_as_other']:.4f} > {thresholds['max_pets_as_other']}")
    if not metrics["other_as_pet"] <= thresholds["max_other_as_pet"]:
        reasons.append(f"non-pets answered cat or dog {metrics['other_as_pet']:.4f} > {thresholds['max_other_as_pet']}")
    for key in sorted(k for k in metrics if k.startswith("other_as_pet_")):
        kind = key[len("other_as_pet_"):]
        if (metrics[f"other_photos_{kind}"] >= thresholds["kind_min_photos"]
                and not metrics[key] <= thresholds["max_other_as_pet_per_kind"]):
            reasons.append(f"{kind} answered cat or dog {metrics[key]:.4f} > {thresholds['max_other_as_pet_per_kind']}")
    return reasons


def compare_with_champion(run, probs):
    """(How the current champion does against `probs` on the evaluation set, or None when there
    is no champion; what it was compared as)."""
    import mlflow

    client, name = run.client, run.cfg.registered_name
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        return None, "no champion yet"
    champion_run = client.get_run(version.run_id)
    label = f"champion v{version.version} ({champion_run.data.tags.get('arch')})"
    try:
        with tempfile.TemporaryDirectory(prefix="catdog-champion-") as download:
            champion_probs, how = champion_answers(champion_run, run.evaluation, download)
    except Exception as e:  # noqa: BLE001 -- an unreadable champion cannot block a measured candidate
        print(f"  {label} cannot be loaded ({e}); gating on thresholds only", flush=True)
        return None, f"{label} unreadable"
    labels = run.evaluation.labels
    champion_right, candidate_right = champion_probs.argmax(1) == labels, probs.argmax(1) == labels
    figures = evaluate.scores(champion_probs, labels)
    print(f"  {label} {how}: accuracy {figures['accuracy']:.4f}, log-loss {figures['log_loss']:.4f}", flush=True)
    slices = {name: paired(champion_right[members], candidate_right[members])
              for name, members in run.evaluation.slices.items()}
    print(slice_comparison(slices), flush=True)
    return {"accuracy": figures["accuracy"], "log_loss": figures["log_loss"],
            **paired(champion_right, candidate_right), "slices": slices}, f"{label}, {how}"


def paired(champion_right, candidate_right):
    """What the gate judges of two bool arrays of right answers on the same photos."""
    return {"images": len(champion_right), "champion_right": int(np.sum(champion_right)),
            "candidate_right": int(np.sum(candidate_right)),
            "only_champion_right": int(np.sum(champion_right & ~candidate_right)),
            "only_candidate_right": int(np.sum(candidate_right & ~champion_right))}


def slice_comparison(slices, min_photos=catdog.GATE["slice_min_photos"]):
    """The gate's table: the champion and the candidate in each slice, photo by photo."""
    lines = [f"  {'slice':8}{'photos':>8}{'champion':>10}{'candidate':>11}{'only champion':>15}{'only candidate':>16}"
             f"{'McNemar p':>11}  judged"]
    for name, s in slices.items():
        accuracies = (f"{s['champion_right'] / s['images']:10.4f}{s['candidate_right'] / s['images']:11.4f}"
                      if s["images"] else f"{'-':>10}{'-':>11}")
        lines.append(f"  {name:8}{s['images']:8d}{accuracies}{s['only_champion_right']:15d}"
                     f"{s['only_candidate_right']:16d}"
                     f"{evaluate.mcnemar_p(s['only_champion_right'], s['only_candidate_right']):11.3f}  "
                     + ("yes" if s["images"] >= min_photos else f"no (< {min_photos} photos)"))
    return "\n".join(lines)


def champion_answers(champion_run, evaluation, download):
    """(The champion's probabilities on the evaluation set, how they were had): from its run's
    evaluation.csv when it was measured on the same photos, else (or when that file cannot be
    had) by running its served file on them here."""
    import mlflow

    run_id = champion_run.info.run_id
    if champion_run.data.tags.get("eval_set_sha256") == evaluation.identity():
        try:
            return evaluate.read_evaluation_csv(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="reports/evaluation.csv", dst_path=download)), "on the same photos"
        except (OSError, mlflow.exceptions.MlflowException, ValueError) as e:
            print(f"  the champion's answers cannot be read ({e}); measuring its served file instead", flush=True)
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=download)
    meta = catdog.read_json(os.path.join(folder, "model.json"))
    probs = evaluate.onnx_outputs(os.path.join(folder, "model.onnx"), evaluation.items, meta["preprocess"])["probs"]
    return probs, "re-measured on these photos"


def write_champion(folder, out, registry):
    """Copy a promoted model's files into `out`, each replaced atomically; its model.json
    stamped with `registry`, its name and version there."""
    meta_path = os.path.join(folder, "model.json")
    catdog.write_json(meta_path, {**catdog.read_json(meta_path), **registry})
    os.makedirs(out, exist_ok=True)
    for name in ("model.pt", *RELEASED_FILES):
        shutil.copyfile(os.path.join(folder, name), os.path.join(out, name + ".tmp"))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
