"""make predict: tag a folder of photos offline with the champion, each answered as POST /predict
answers it, without running the service.

    python predict.py DIR --out predictions.csv      # CSV; --out x.jsonl (or --out-format jsonl): JSON lines
    python predict.py DIR --compare                  # also the same photos one by one to a local /predict

Every file under DIR, sorted, is one row: the service's answer fields (label, confidence,
pet_probability, the cat and dog probabilities, rounded as its JSON is), or the reason the file
could not be used (error: the service's reason, such as corrupt, not_an_image or too_small; message).
The path is the service's own: serve.Settings from the environment (MODEL_PATH, MAX_UPLOAD_MB,
MAX_PIXELS, the decode budget), serve.load_model (its ONNX Runtime settings and checks),
upload.prepare (limits, decoding, catdog.preprocess with the model's settings) and catdog.answer.
One worker process per CPU decodes its photos and runs them through a one-thread ONNX Runtime
session of its own, run_size photos per run: faster on 2 CPUs than decoding workers feeding one
two-thread session in the main process, which ships every preprocessed image between processes.

When names carry labels (cat.12.jpg, dog/3.jpg, other.7.jpg: catdog.label_from_name), prints the
accuracy with its 95 % Wilson interval. Prints photos per second; --compare starts serve.py on a free
port (harness.Server), posts each photo once, one client on one keep-alive connection, and prints
both rates, their ratio and how many answers differ.
"""
import concurrent.futures
import csv
import http.client
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np

import catdog
import evaluate
import harness
import serve
import upload

# ---------------------------------------------------------------- config (--name value overrides)
out = "predictions.csv"  # where the rows go: .csv, or .jsonl / .json for JSON lines
out_format = ""  # csv or jsonl; "": by the extension of --out
workers = 0  # worker processes, each with its own ONNX Runtime session; 0: the CPUs this process may use
run_size = 8  # photos per ONNX Runtime run (more than the service's RUN_SIZE: no client waits on a run)
compare = False  # also send the same photos one by one to POST /predict of a local serve.py
listed_errors = 20  # the unreadable files named in the summary (all of them are in the rows)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
CSV_FIELDS = ("file", "label", "confidence", "pet_probability", *(f"probability_{c}" for c in catdog.CLASSES),
              "truth", "error", "message", "model_version")
SERVE_START_S = 180  # the champion's load and warm-up on a busy machine


def parse_args(argv=None):
    parser = catdog.config_parser(globals(), choices={"out_format": ("", "csv", "jsonl")})
    parser.add_argument("dir", help="the folder of photos (every file under it, sorted)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the photos
def files_under(folder):
    """Every file under `folder`, sorted: the content decides what is a photo, never the name
    (as the service sniffs it), so a stray Thumbs.db is a row with its reason."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, name) for name in names]
    return sorted(found)


def output_format(path, given):
    fmt = given or FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        sys.exit(f"predict: cannot tell the format of {path} from its extension: name it .csv or .jsonl, "
                 "or give --out-format csv|jsonl")
    return fmt


# ---------------------------------------------------------------- scoring, in the worker processes
WORKER = {}  # in each worker: its model, the settings and its decode budget (start_worker)


def start_worker(settings):
    WORKER.update(model=serve.load_model(settings.model_path), settings=settings,
                  budget=upload.DecodeBudget(int(settings.decode_budget_mb * 1024 * 1024), settings.decode_wait_s,
                                             serve.log))


def score(paths):
    """The rows of these files (one task: a run of up to --run-size), each answered as POST
    /predict answers it, in one ONNX Runtime run."""
    model, settings, budget = WORKER["model"], WORKER["settings"], WORKER["budget"]
    rows, inputs = [], []
    for path in paths:
        row = {"file": path, "truth": catdog.label_from_name(path, catdog.ANSWERS)}
        try:
            with open(path, "rb") as f:
                data = f.read(settings.max_upload_bytes + 1)  # one byte over the limit is enough to refuse it
            inputs.append((row, upload.prepare(data, model.meta["preprocess"], settings, budget)[0]))
        except catdog.ImageError as e:
            row.update(error=e.reason, message=str(e))
        except OSError as e:
            row.update(error="unreadable", message=f"the file could not be read ({e.strerror})")
        rows.append(row)
    if inputs:
        for (row, _), outputs in zip(inputs, model.run(np.stack([x for _, x in inputs]))):
            row.update(serve.answer_fields(catdog.answer(outputs, model.meta)))
    return rows


# ---------------------------------------------------------------- rows out, progress, summary
class Rows:
    """The output file, written row by row as results come: CSV (probabilities as columns) or
    JSON lines (as the API nests them)."""

    def __init__(self, path, fmt, version):
        self.version = version
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "w", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.f, CSV_FIELDS) if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, row):
        row = {**row, "model_version": self.version}
        if self.csv:
            probabilities = row.pop("probabilities", {})
            self.csv.writerow({**row, **{f"probability_{c}": p for c, p in probabilities.items()}})
        else:
            self.f.write(json.dumps(row) + "\n")

    def close(self):
        self.f.close()


def progress(done, total, started):
    rate = done / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(f"\rpredict: {done}/{total} photos ({done / total:.0%}), {rate:.1f} photos/s ")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def score_folder(cfg, paths, settings, version):
    """Scores `paths` on cfg.workers processes, writing each row to cfg.out as it comes (`file`
    relative to cfg.dir): (rows, seconds from starting the workers to the last row)."""
    count = cfg.workers or serve.available_cpus()
    tasks = [paths[i:i + cfg.run_size] for i in range(0, len(paths), cfg.run_size)]
    rows, shown = [], 0.0
    output = Rows(cfg.out, output_format(cfg.out, cfg.out_format), version)
    started = time.perf_counter()
    # spawn: each worker builds its own ONNX Runtime session in a fresh process, nothing inherited.
    # A worker that dies (a decoder crashing) breaks the pool: an error, never a silent gap.
    with concurrent.futures.ProcessPoolExecutor(count, multiprocessing.get_context("spawn"), start_worker,
                                                (settings,)) as pool:
        for batch in pool.map(score, tasks):
            for row in batch:
                row["file"] = os.path.relpath(row["file"], cfg.dir)
                output.write(row)
            rows += batch
            if time.perf_counter() - shown > 0.2 or len(rows) == len(paths):
                shown = time.perf_counter()
                progress(len(rows), len(paths), started)
    seconds = time.perf_counter() - started
    output.close()
    return rows, seconds


def summarise(rows, listed):
    """Lines about the answers: counts by label, the unreadable files with their reasons, and
    the accuracy over the photos labelled by name."""
    lines = ["answers: " + ", ".join(f"{label} {n}" for label, n in sorted(Counter(
        row["label"] for row in rows if "label" in row).items()))]
    failed = [row for row in rows if "error" in row]
    if failed:
        reasons = Counter(row["error"] for row in failed)
        lines.append(f"unreadable: {len(failed)} files (" + ", ".join(f"{r} {n}" for r, n in reasons.most_common())
                     + ")")
        lines += [f"  {row['file']}: {row['error']}: {row['message']}" for row in failed[:listed]]
        if len(failed) > listed:
            lines.append(f"  and {len(failed) - listed} more (their rows say why)")
    labelled = [row for row in rows if (row["truth"] and "label" in row)]
    if labelled:
        right = sum(row["label"] == row["truth"] for row in labelled)
        low, high = evaluate.wilson_interval(right, len(labelled))
        skipped = sum(1 for row in failed if row["truth"])
        lines.append(f"accuracy {right / len(labelled):.2%} (95 % Wilson interval {low:.2%} to {high:.2%}): "
                     f"{right} of {len(labelled)} photos labelled by their names right"
                     + (f"; {skipped} labelled {'file' if skipped == 1 else 'files'} unreadable" if skipped else ""))
    return lines


# ---------------------------------------------------------------- the same photos through /predict
def service_answers(paths, settings):
    """(answers, seconds) of the same files sent one by one to POST /predict of a local serve.py
    (the same settings, from the environment, but its own store in a temporary folder: never the
    production one DATABASE_URL or KEEP_PHOTOS may name): one client, one keep-alive connection."""
    with tempfile.TemporaryDirectory(prefix="catdog-predict-") as folder:
        server = harness.Server({"MODEL_PATH": settings.model_path, "DB_PATH": os.path.join(folder, "predict.db")},
                                log=os.path.join(folder, "serve.log"), unset=("DATABASE_URL", "KEEP_PHOTOS", "PHOTOS_DIR"))
        try:
            server.wait(timeout=SERVE_START_S)
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            answers, started = [], time.perf_counter()
            for path in paths:
                with open(path, "rb") as f:
                    body, content_type = harness.multipart([("file", os.path.basename(path), f.read())])
                connection.request("POST", "/predict", body, {"Content-Type": content_type})
                answers.append(json.loads(connection.getresponse().read()))
            seconds = time.perf_counter() - started
            connection.close()
        finally:
            server.stop()
    return answers, seconds


def differences(rows, answers):
    """The files whose row is not what /predict answered (its label, probabilities or error)."""
    fields = ("label", "confidence", "pet_probability", "probabilities", "error")
    return [row["file"] for row, answer in zip(rows, answers)
            if any(row.get(k) != answer.get(k) for k in fields)]


# ---------------------------------------------------------------- main
def main(argv=None):
    cfg = parse_args(argv)
    output_format(cfg.out, cfg.out_format)  # a bad --out fails before any work
    if not os.path.isdir(cfg.dir):
        sys.exit(f"predict: {cfg.dir} is not a folder")
    paths = files_under(cfg.dir)
    if not paths:
        sys.exit(f"predict: {cfg.dir} holds no files")
    settings = serve.Settings.from_env()
    try:  # refused here as the service would refuse it, rather than in every worker
        meta = serve.load_model(settings.model_path).meta
    except (OSError, ValueError) as e:
        sys.exit(f"predict: cannot load the model {settings.model_path} (MODEL_PATH; `make train` makes one): {e}")
    rows, seconds = score_folder(cfg, paths, settings, str(meta.get("version", "unknown")))
    count = cfg.workers or serve.available_cpus()
    print(f"predict: {len(rows)} files of {cfg.dir} -> {cfg.out} in {seconds:.1f} s: {len(rows) / seconds:.1f} "
          f"photos/s offline ({count} workers, runs of {cfg.run_size}; model {meta.get('version')})")
    for line in summarise(rows, cfg.listed_errors):
        print(line)
    if cfg.compare:
        answers, served_s = service_answers(paths, settings)
        offline, served = len(rows) / seconds, len(rows) / served_s
        differ = differences(rows, answers)
        print(f"the same {len(rows)} files one by one to a local POST /predict (one client, keep-alive): "
              f"{served:.1f} photos/s; offline {offline:.1f} photos/s, {offline / served:.2f}x")
        print(f"answers differing from /predict's: {len(differ)}" + (f" ({', '.join(differ[:10])})" if differ else ""))


if __name__ == "__main__":
    main()
