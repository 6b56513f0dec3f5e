"""Post-deployment evaluation: is the DEPLOYED model still right?

Sends labelled photos to a running service as real HTTP requests, tells the service
the true labels via /feedback (which feeds its live accuracy), and measures what a
client sees: accuracy, precision, recall, F1, the confusion matrix and latency
percentiles. Logs them to MLflow tagged with the serving model version, writes a
Markdown report with a confusion-matrix plot, and exits non-zero when accuracy is
below the threshold, so a bad deployment fails loudly instead of printing 50 %.

    python post_eval.py http://127.0.0.1:8000 ../shared/datasets/dogs-vs-cats-3k --limit 200
    python post_eval.py http://127.0.0.1:8000 --manifest data/manifest.csv --split test
    python post_eval.py http://127.0.0.1:8000 --manifest data/manifest.csv --not-pets ../shared/datasets/not-pets

Labels come from file names (cat.12.jpg, other.7.jpg) or folders (cat/12.jpg, other/7.jpg),
or from the manifest; the photos sent from --not-pets are "other" (neither a cat nor a dog),
their subfolder their kind (bird, object, people_face, ...). Only the held-out test part of
that folder is sent by default (--not-pets-part): train.py trains and tunes on the train and
val parts of the same split (evaluate.not_pet_photos, same seed), which would flatter the model.
When any photo or answer is "other", the report has the third class: a 3x3 confusion matrix,
the share of non-pets answered cat or dog (overall and per kind) and the share of pets
answered "other".
"""
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import catdog
import evaluate
import harness

# ---------------------------------------------------------------- config (--name value overrides)
min_accuracy = 0.99     # below this accuracy the run fails (exit 1)
limit = 0               # evaluate at most this many images (0 = all), balanced over classes
concurrency = 4         # parallel clients: enough to exercise the server's threads, not a load test
timeout = 30.0          # seconds per request
out = os.path.join(catdog.ROOT, "reports", "post_eval")  # folder of the report, metrics and plot
experiment = "catdog-post-deploy"  # MLflow experiment of the run
tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", catdog.TRACKING_URI)  # MLflow tracking URI
feedback = True         # post the true labels to /feedback (feeds the service's live accuracy)
token = os.environ.get("API_TOKEN", "")  # the service's API_TOKEN, for /feedback and /stats ($API_TOKEN)
manifest = ""           # preprocess.py's manifest CSV: evaluate one split of it instead of IMAGES
split = "test"          # the manifest split to evaluate
not_pets = ""           # also send photos of this folder as "other" (subfolders are kinds: bird, object, ...)
not_pets_part = "test"  # which part of evaluate.not_pet_photos to send: test (never trained or tuned on), val, train or all
not_pets_seed = catdog.SEED  # the seed train.py split the not-pets folder with (its --seed)

OTHER, PETS, ANSWERS = catdog.OTHER, catdog.CLASSES, catdog.ANSWERS  # "other": neither a cat nor a dog
NOT_PETS_PARTS = (*(part for part, _ in evaluate.NOT_PETS_SPLIT), "all")


def parse_args(argv=None):
    parser = catdog.config_parser(globals(), choices={"not_pets_part": NOT_PETS_PARTS})
    parser.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("images", nargs="*", help="photo files or folders (cat.N.jpg, other.N.jpg or cat/ dog/ other/)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- which photos, with which labels
def manifest_files(path, split):
    """[(photo, label)] of one split of preprocess.py's manifest: the original photo a client
    would send, or the processed copy when the original is not on this machine."""
    rows = catdog.read_manifest(path, split)
    missing = sum(row["photo"] is None for row in rows)
    if missing:
        print(f"post_eval: {missing} {split} photos of {path} are not on this machine", file=sys.stderr)
    return [(row["photo"], row["label"]) for row in rows if row["photo"]]


def image_files(paths):
    """The image files among the given files and the files under the given folders, sorted."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                found += [os.path.join(root, n) for n in names if n.lower().endswith(catdog.IMAGE_SUFFIXES)]
        else:
            found.append(path)
    return sorted(found)


def labelled_photos(paths):
    """[(path, label)] labelled by name or folder, cat, dog or other; unlabelled files are left out."""
    return [(p, label) for p in image_files(paths) if (label := catdog.label_from_name(p, ANSWERS))]


def not_pet_photos(folder, part="test", seed=catdog.SEED):
    """[(path, "other")] of the non-pets to send, and {real path: kind}.

    part "train", "val" or "test": that part of evaluate.not_pet_photos(folder, seed), the split
    train.py makes of the photos in the kind subfolders (test: never trained or tuned on).
    part "all": every photo under folder, nested or not; its kind is the first subfolder
    (bird/, object/), or the name's first word for a photo at the top (bird.3.jpg)."""
    if part != "all":
        chosen = sorted(evaluate.not_pet_photos(folder, seed)[part])
        return [(path, OTHER) for path, _ in chosen], {os.path.realpath(path): kind for path, kind in chosen}
    pairs, kinds = [], {}
    for path in image_files([folder]):
        first = os.path.relpath(path, folder).split(os.sep)[0]
        kinds[os.path.realpath(path)] = first if first != os.path.basename(path) else first.split(".")[0]
        pairs.append((path, OTHER))
    return pairs, kinds


def unique(pairs):
    """Each photo once, with the first label it came with: --not-pets may overlap the other photos."""
    seen, kept = set(), []
    for path, label in pairs:
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            kept.append((path, label))
    return kept


def interleave(groups):
    """One item of each group in turn, skipping groups that ran out: every prefix is balanced."""
    return [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]


def balanced_head(pairs, n, kinds=None):
    """The first n pairs, the classes in turn and, within "other", its kinds in turn, so a small
    --limit still sees every class and every kind of non-pet (a kind that runs out gives way)."""
    if not n or n >= len(pairs):
        return pairs
    kinds = kinds or {}
    by_class = [[p for p in pairs if p[1] == c] for c in ANSWERS]
    kind_of = {p: kinds.get(os.path.realpath(p[0]), OTHER) for p in by_class[-1]}
    by_class[-1] = interleave([[p for p in by_class[-1] if kind_of[p] == k] for k in sorted(set(kind_of.values()))])
    return interleave(by_class)[:n]


# ---------------------------------------------------------------- HTTP (stdlib only)
def http_json(url, data=None, headers=None, method=None, timeout=30.0):
    """(status, parsed JSON body or {}) for one request. HTTP errors are answers, not
    exceptions; no answer at all (refused, reset, timed out) is status 0."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except OSError as e:
        return 0, {"error": str(e)}
    try:
        return status, json.loads(body or b"{}")
    except ValueError:
        return status, {"error": body[:200].decode("utf-8", "replace")}


def predict(url, path, label, timeout):
    """Send one photo to /predict; the client-side latency is what a user waits."""
    with open(path, "rb") as f:
        content = f.read()
    # A neutral file name: the file name carries the label and must never reach the service.
    body, content_type = harness.multipart([("file", "photo.jpg", content)])
    started = time.perf_counter()
    status, answer = http_json(f"{url}/predict", body, {"Content-Type": content_type}, "POST", timeout)
    latency_ms = (time.perf_counter() - started) * 1000
    return {"path": path, "label": label, "status": status, "latency_ms": latency_ms,
            "predicted": answer.get("label") if status == 200 else None,
            "confidence": answer.get("confidence"), "pet_probability": answer.get("pet_probability"),
            "request_id": answer.get("request_id"),
            "model_version": answer.get("model_version"), "error": answer.get("error")}


def send_feedback(url, result, timeout, token=""):
    body = json.dumps({"request_id": result["request_id"], "label": result["label"]}).encode()
    status, _ = http_json(f"{url}/feedback", body, {"Content-Type": "application/json", **bearer(token)}, "POST",
                          timeout)
    return 200 <= status < 300


def bearer(token):
    """The Authorization header a service started with API_TOKEN asks of /feedback and /stats."""
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------- metrics (numpy)
def classes_of(results):
    """cat and dog, and "other" once a photo or an answer is "other": photos of cats and dogs
    that a two-answer service tags read exactly as they did before the third answer."""
    seen = {r["label"] for r in results} | {r["predicted"] for r in results}
    return ANSWERS if OTHER in seen else PETS


def classification_metrics(results):
    """Accuracy over every photo sent (a failed request counts as wrong), per-class
    precision/recall/F1 over the answered ones, the confusion matrix (rows = truth) and its
    classes; with "other": the shares of non-pets answered cat or dog and of pets answered other."""
    classes = classes_of(results)
    index = {c: i for i, c in enumerate(classes)}
    answered = [r for r in results if r["predicted"] in index]
    truth, predicted = ([index[r[key]] for r in answered] for key in ("label", "predicted"))
    matrix = evaluate.confusion_matrix(truth, predicted, len(classes))
    low, high = evaluate.wilson_interval(int(np.trace(matrix)), len(results))
    metrics = {"images": len(results), "answered": len(answered), "errors": len(results) - len(answered),
               "accuracy": float(np.trace(matrix) / max(1, len(results))), "accuracy_low": low, "accuracy_high": high}
    for name, score in evaluate.class_scores(truth, predicted, classes).items():
        for key in ("precision", "recall", "f1"):
            metrics[f"{key}_{name}"] = score[key]
    metrics["f1_macro"] = float(np.mean([metrics[f"f1_{c}"] for c in classes]))
    if OTHER in index:
        pets, other = matrix[:-1], matrix[-1]
        metrics["other_photos"], metrics["pet_photos"] = int(other.sum()), int(pets.sum())
        metrics["other_as_pet"] = float(other[:-1].sum() / max(1, other.sum()))  # non-pets tagged cat or dog
        metrics["pets_as_other"] = float(pets[:, -1].sum() / max(1, pets.sum()))  # pets turned away
    return metrics, matrix, classes


def kind_metrics(results, kinds):
    """{kind: {photos, cat, dog, other, as_pet}} of the answered non-pets: how often each
    kind of non-pet (bird, object, ...) is tagged as a cat or a dog."""
    found = {}
    for r in results:
        if r["label"] == OTHER and r["predicted"] in ANSWERS:
            kind = kinds.get(os.path.realpath(r["path"]), OTHER)
            counts = found.setdefault(kind, {"photos": 0, **dict.fromkeys(ANSWERS, 0)})
            counts["photos"] += 1
            counts[r["predicted"]] += 1
    for counts in found.values():
        counts["as_pet"] = sum(counts[c] for c in PETS) / counts["photos"]
    return dict(sorted(found.items()))


def latency_metrics(results, wall_s):
    latencies = np.array([r["latency_ms"] for r in results if r["status"] == 200])
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (float("nan"),) * 3
    return {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95), "latency_p99_ms": float(p99),
            "latency_mean_ms": float(latencies.mean()) if len(latencies) else float("nan"),
            "throughput_rps": len(results) / wall_s if wall_s else 0.0}


# ---------------------------------------------------------------- outputs
def kinds_section(kinds):
    """Markdown lines: per kind of non-pet, its answers and the share tagged as a pet."""
    lines = ["", '## Non-pets by kind (truth "other")', "",
             "| kind | photos | " + " | ".join(f"answered {c}" for c in ANSWERS) + " | answered cat or dog |",
             "|---" * (len(ANSWERS) + 3) + "|"]
    lines += [f"| {kind} | {n['photos']} | " + " | ".join(str(n[c]) for c in ANSWERS) + f" | {n['as_pet']:.1%} |"
              for kind, n in kinds.items()]
    return lines


def write_report(path, url, version, source, metrics, matrix, classes, kinds, results, stats, passed, min_accuracy):
    wrong = [r for r in results if r["predicted"] != r["label"]]
    lines = [
        "# Post-deployment evaluation", "",
        f"- service: {url}, model version `{version}`",
        f"- photos: {metrics['images']} from {source}, {metrics['errors']} failed requests",
        f"- result: **{'PASS' if passed else 'FAIL'}** (accuracy {metrics['accuracy']:.4f}, "
        f"threshold {min_accuracy})", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
        "", "## Confusion matrix (rows = true label)", "", "![confusion matrix](confusion_matrix.png)", "",
        "| | " + " | ".join(f"pred {c}" for c in classes) + " |",
        "|---" * (len(classes) + 1) + "|",
        *[f"| true {c} | " + " | ".join(str(n) for n in row) + " |" for c, row in zip(classes, matrix)],
    ]
    if kinds:
        lines += kinds_section(kinds)
    if stats:
        lines += ["", "## The service's own view (`/stats` after feedback)", "", "```json",
                  json.dumps(stats, indent=2, sort_keys=True), "```"]
    if wrong:
        lines += ["", f"## Wrong or failed ({len(wrong)})", "", "| photo | true | predicted | confidence | status |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['path']} | {r['label']} | {r['predicted']} | {r['confidence']} | {r['status']} |"
                  for r in wrong[:50]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def mlflow_metrics(metrics, kinds):
    """The finite metrics, and per kind of non-pet its share answered cat or dog (other_as_pet.<kind>)."""
    flat = {k: v for k, v in metrics.items() if np.isfinite(v)}
    flat.update({"other_as_pet." + re.sub(r"[^\w.-]", "_", kind): n["as_pet"] for kind, n in kinds.items()})
    return flat


def log_to_mlflow(cfg, version, source, metrics, kinds):
    import mlflow  # slow import; only when there is something to log

    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name=f"post-eval {version}") as run:
        mlflow.set_tags({"model_version": version, "service_url": cfg.url, "stage": "post-deploy"})
        mlflow.log_params({"source": source, "limit": cfg.limit, "concurrency": cfg.concurrency,
                           "min_accuracy": cfg.min_accuracy, "feedback": cfg.feedback, "not_pets": cfg.not_pets,
                           "not_pets_part": cfg.not_pets_part, "not_pets_seed": cfg.not_pets_seed})
        mlflow.log_metrics(mlflow_metrics(metrics, kinds))
        mlflow.log_artifacts(cfg.out)
        return run.info.run_id


# ---------------------------------------------------------------- main
def main(argv=None):
    cfg = parse_args(argv)
    url = cfg.url = cfg.url.rstrip("/")
    if cfg.manifest:
        pairs, source = manifest_files(cfg.manifest, cfg.split), f"{cfg.manifest} split={cfg.split}"
    else:
        pairs, source = labelled_photos(cfg.images), " ".join(cfg.images)
    kinds = {}
    if cfg.not_pets:
        not_pets, kinds = not_pet_photos(cfg.not_pets, cfg.not_pets_part, cfg.not_pets_seed)
        if not not_pets:
            print(f"post_eval: no {cfg.not_pets_part} photos of not-pets in {cfg.not_pets} (the parts come from "
                  "its kind subfolders; --not-pets-part all takes every photo)", file=sys.stderr)
        pairs = unique(pairs + not_pets)
        source = " + ".join(filter(None, [source, f"{cfg.not_pets} (not pets, {cfg.not_pets_part} part)"]))
    pairs = balanced_head(pairs, cfg.limit, kinds)
    if not pairs:
        sys.exit(f"post_eval: no labelled photos found in {source or '(nothing given)'}")

    status, health = http_json(f"{url}/health", timeout=cfg.timeout)
    if status != 200:
        sys.exit(f"post_eval: {url}/health answered {status} {health}; is the service up?")

    print(f"post_eval: {len(pairs)} photos from {source} -> {url} ({cfg.concurrency} clients)")
    started = time.perf_counter()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        results = list(pool.map(lambda pair: predict(url, *pair, cfg.timeout), pairs))
        wall_s = time.perf_counter() - started
        answered = [r for r in results if r["request_id"]]
        delivered = (sum(pool.map(lambda r: send_feedback(url, r, cfg.timeout, cfg.token), answered))
                     if cfg.feedback else 0)
    versions = {r["model_version"] for r in results if r["model_version"]} or {health.get("model_version")}
    version = ",".join(sorted(map(str, versions)))

    metrics, matrix, classes = classification_metrics(results)
    by_kind = kind_metrics(results, kinds) if kinds else {}
    metrics.update(latency_metrics(results, wall_s))
    metrics["feedback_posted"] = delivered
    _, stats = http_json(f"{url}/stats", headers=bearer(cfg.token), timeout=cfg.timeout)  # its live accuracy after our feedback

    passed = metrics["accuracy"] >= cfg.min_accuracy
    feedback_ok = not cfg.feedback or delivered == len(answered)
    os.makedirs(cfg.out, exist_ok=True)
    evaluate.confusion_plot(cfg.out, matrix, classes, "post-deployment confusion matrix")
    catdog.write_json(os.path.join(cfg.out, "metrics.json"),
                      {"model_version": version, "url": url, **metrics, **({"kinds": by_kind} if by_kind else {})})
    write_report(os.path.join(cfg.out, "report.md"), url, version, source, metrics, matrix, classes, by_kind, results,
                 stats if isinstance(stats, dict) and "error" not in stats else None, passed, cfg.min_accuracy)
    run_id = log_to_mlflow(cfg, version, source, metrics, by_kind)

    print(f"model {version}: accuracy {metrics['accuracy']:.4f} (95 % interval {metrics['accuracy_low']:.4f}-"
          f"{metrics['accuracy_high']:.4f}; {metrics['images']} photos, "
          f"{metrics['errors']} failed), f1 {metrics['f1_macro']:.4f}, latency p50/p95/p99 "
          f"{metrics['latency_p50_ms']:.1f}/{metrics['latency_p95_ms']:.1f}/{metrics['latency_p99_ms']:.1f} ms, "
          f"{metrics['throughput_rps']:.1f} req/s, feedback {delivered}/{len(answered)}")
    print(f"confusion matrix (rows true {'/'.join(classes)}): {matrix.tolist()}")
    if OTHER in classes:
        print(f"other: {metrics['other_as_pet']:.2%} of {metrics['other_photos']} non-pets answered cat or dog, "
              f"{metrics['pets_as_other']:.2%} of {metrics['pet_photos']} pets answered other")
    for kind, n in by_kind.items():
        print(f"  {kind}: {n['as_pet']:.1%} of {n['photos']} answered cat or dog")
    print(f"report {os.path.join(cfg.out, 'report.md')}, MLflow run {run_id} in experiment {cfg.experiment!r}")
    if not feedback_ok:
        print(f"FAIL: /feedback accepted {delivered} of {len(answered)} labels", file=sys.stderr)
    if not passed:
        print(f"FAIL: accuracy {metrics['accuracy']:.4f} is below {cfg.min_accuracy}", file=sys.stderr)
    return 0 if passed and feedback_ok else 1


if __name__ == "__main__":
    sys.exit(main())
