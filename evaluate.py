"""Measuring answers: the figures of a set of probabilities (accuracy, precision / recall / F1,
ROC-AUC, log-loss, ECE), the Wilson interval of an accuracy and the paired McNemar test, the
report plots, the evaluation set every candidate is measured on (and its per-photo answers), the
not-pets split, what a served ONNX file answers, and the model card.

numpy only at import (matplotlib and ONNX Runtime are imported where they are used), never
torch: post_eval.py measures a deployed service with the same functions.

Names: a figure of one part of the evaluation set is `<part>_<name>` (test_accuracy,
extra_log_loss, eval_accuracy_low, slice_dark_accuracy), as MLflow logs it; model.json alone
keeps its older names for the test split's figures (accuracy, log_loss, ...: model_json_names).
"""
import csv
import dataclasses
import functools
import hashlib
import math
import os

import numpy as np

import catdog

# Slices: kinds of photo a shelter uploads and a machine can tell, each a rule on a photo's
# catdog.image_stats (the service's drift statistics: one definition of brightness, colour and
# size) taken from the original photo, at the size it was uploaded. A photo may fall in several
# slices or in none. Thresholds are set so that each slice of the 2,299-photo evaluation set
# holds dozens of photos (docs/benchmarks.md, "Accuracy by slice").
SLICE_DARK = 70       # mean luminance (0-255) below this: a black cat on a dark floor, a kennel at night
SLICE_SMALL = 200     # shorter side (px) below this: upscaled to the model's input
SLICE_GREY = 8        # mean max-min channel difference (0-255) below this: greyscale or nearly colourless
SLICE_ELONGATED = 1.6  # wide: width / height above this; tall: height / width above it
SLICES = {  # name: (rule in words, test on catdog.image_stats)
    "dark": (f"mean luminance < {SLICE_DARK} of 255", lambda s: s["brightness"] < SLICE_DARK),
    "small": (f"shorter side < {SLICE_SMALL} px", lambda s: min(s["width"], s["height"]) < SLICE_SMALL),
    "grey": (f"mean channel spread < {SLICE_GREY} of 255", lambda s: s["saturation"] < SLICE_GREY),
    "wide": (f"width / height > {SLICE_ELONGATED}", lambda s: s["width"] > SLICE_ELONGATED * s["height"]),
    "tall": (f"height / width > {SLICE_ELONGATED}", lambda s: s["height"] > SLICE_ELONGATED * s["width"]),
}


# ---------------------------------------------------------------- figures (numpy)
def scores(probs, labels, bins=15):
    """Accuracy, precision/recall/F1 (dog = positive), ROC-AUC, log-loss and ECE."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    predicted = probs.argmax(1)
    dog = class_scores(labels, predicted)["dog"]
    return {"accuracy": float(np.mean(predicted == labels)), "precision": dog["precision"],
            "recall": dog["recall"], "f1": dog["f1"],
            "roc_auc": roc_auc(probs[:, 1], labels),
            "log_loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1)))),
            "ece": expected_calibration_error(probs, labels, bins)}


def class_scores(truth, predicted, classes=catdog.CLASSES):
    """Per class: precision, recall, F1 and support, from arrays of indices into `classes`."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    found = {}
    for index, name in enumerate(classes):
        hits = np.sum((predicted == index) & (truth == index))
        precision = hits / max(1, np.sum(predicted == index))
        recall = hits / max(1, np.sum(truth == index))
        found[name] = {"precision": float(precision), "recall": float(recall),
                       "f1": float(2 * precision * recall / max(1e-12, precision + recall)),
                       "support": int(np.sum(truth == index))}
    return found


def confusion_matrix(truth, predicted, size):
    """Counts of (true class, predicted class), rows = truth, from arrays of class indices."""
    matrix = np.zeros((size, size), dtype=int)
    np.add.at(matrix, (np.asarray(truth, dtype=int), np.asarray(predicted, dtype=int)), 1)
    return matrix


def roc_auc(scores, labels):
    """Probability that a random dog scores above a random cat (Mann-Whitney U, ties count half)."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # tied scores share their mean rank
    return float((ranks[labels == 1].sum() - len(positives) * (len(positives) + 1) / 2)
                 / (len(positives) * len(negatives)))


def roc_points(scores, labels):
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order] == 1
    tpr = np.r_[0, np.cumsum(hits) / max(1, hits.sum())]
    fpr = np.r_[0, np.cumsum(~hits) / max(1, (~hits).sum())]
    return fpr, tpr


def expected_calibration_error(probs, labels, bins=15):
    """Weighted mean |accuracy - confidence| over equal-width confidence bins."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(np.sum(which == b) / len(labels) * abs(correct[which == b].mean() - confidence[which == b].mean())
                     for b in range(bins) if np.any(which == b)))


def wilson_interval(successes, n, z=1.96):
    """95 % (z=1.96) Wilson score interval of a proportion: unlike p +- z*sqrt(p(1-p)/n) it
    stays inside [0, 1] and is honest near 100 %, where these accuracies live."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(only_a_right, only_b_right):
    """One-sided exact McNemar test on paired answers: the probability of `only_b_right` or
    fewer photos that only B got right, out of the photos where exactly one of A and B was
    right, if both were equally accurate. Small: B is worse than A."""
    n = only_a_right + only_b_right
    return float(sum(math.comb(n, k) for k in range(only_b_right + 1)) / 2 ** n) if n else 1.0


def classification_report(probs, labels):
    predicted = probs.argmax(1)
    lines = [f"{'':>10} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>10}"]
    for name, score in class_scores(labels, predicted).items():
        lines.append(f"{name:>10} {score['precision']:10.4f} {score['recall']:10.4f} {score['f1']:10.4f} "
                     f"{score['support']:10d}")
    lines.append(f"{'accuracy':>10} {'':>10} {'':>10} {np.mean(predicted == labels):10.4f} {len(labels):10d}")
    return "\n".join(lines) + "\n"


def other_rates(pet_probs_of_pets, pet_probs_of_others, kinds, threshold):
    """{pets_as_other, other_as_pet, by_kind: {kind: {photos, as_pet}}} at `threshold`."""
    accepted = np.asarray(pet_probs_of_others) >= threshold
    by_kind = {str(kind): {"photos": int(np.sum(kinds == kind)), "as_pet": float(np.mean(accepted[kinds == kind]))}
               for kind in sorted(set(kinds))}
    return {"pets_as_other": float(np.mean(np.asarray(pet_probs_of_pets) < threshold)),
            "other_as_pet": float(np.mean(accepted)) if len(accepted) else 0.0, "by_kind": by_kind}


# ---------------------------------------------------------------- names
def flat(figures):
    """{part: {name: value}} as one flat dict: test_accuracy, ..., eval_accuracy_low, ..."""
    return {f"{part}_{k}": v for part, values in figures.items() for k, v in values.items()}


def flat_other(other):
    """other_rates as flat metrics: eval_pets_as_other, other_as_pet, other_as_pet_<kind>, other_photos_<kind>."""
    found = {"eval_pets_as_other": other["pets_as_other"], "other_as_pet": other["other_as_pet"]}
    for kind, rates in other["by_kind"].items():
        name = kind.replace(" ", "_")
        found.update({f"other_as_pet_{name}": rates["as_pet"], f"other_photos_{name}": rates["photos"]})
    return found


def model_json_names(metrics):
    """`metrics` under the names model.json has always given them: the test split's figures
    without their prefix (accuracy, log_loss, ...), every other one as it is."""
    return {k.removeprefix("test_"): v for k, v in metrics.items()}


def describe(values):
    """One line of evaluation-set figures, interval included."""
    return (f"accuracy {values['accuracy']:.4f} (95 % interval {values['accuracy_low']:.4f}-"
            f"{values['accuracy_high']:.4f}, {values['errors']} wrong of {values['images']}), "
            f"log-loss {values['log_loss']:.4f}, ECE {values['ece']:.4f}")


def format_metrics(values):
    return "  ".join(f"{k} {v:.4f}" for k, v in values.items())


def format_counts(counts):
    """{what: n} as "n what, ..."."""
    return ", ".join(f"{n} {what}" for what, n in counts.items())


# ---------------------------------------------------------------- plots (matplotlib, Agg)
def plots(folder, history, probs, evaluation, title):
    """The report figures of one model's served file on the evaluation set, as PNGs in `folder`."""
    labels = evaluation.labels
    confusion_plot(folder, confusion_matrix(labels, probs.argmax(1), len(catdog.CLASSES)), catdog.CLASSES,
                   f"{title}: confusion matrix")
    curves_plot(folder, history, title)
    roc_plot(folder, probs, labels, title)
    reliability_plot(folder, probs, labels, title)
    worst_mistakes_plot(folder, probs, labels, evaluation.items, title)


def confusion_plot(folder, matrix, classes, title):
    """folder/confusion_matrix.png: the counts of `matrix` (rows = truth) over `classes`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 1.6, 1.2 * len(classes) + 1.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=9)
    save(fig, folder, "confusion_matrix.png")


def curves_plot(folder, history, title):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = np.arange(1, len(history) + 1)
    for key, ax in (("loss", left), ("accuracy", right)):
        for split in ("train", "val"):
            ax.plot(steps, [row[f"{split}_{key}"] for row in history], marker=".", label=split)
        ax.set(xlabel="epoch", ylabel=key, title=f"{title}: {key}")
        ax.legend()
    save(fig, folder, "curves.png")


def roc_plot(folder, probs, labels, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    fpr, tpr = roc_points(probs[:, 1], labels)
    ax.plot(fpr, tpr, label=f"AUC {roc_auc(probs[:, 1], labels):.4f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC (dog positive)")
    ax.legend(loc="lower right")
    save(fig, folder, "roc_curve.png")


def reliability_plot(folder, probs, labels, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.5, 1, 11)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, 9)
    for b in range(10):
        if np.any(which == b):
            ax.bar(edges[b], correct[which == b].mean(), width=0.05, align="edge", edgecolor="k", alpha=0.7)
    ax.plot([0.5, 1], [0.5, 1], "k:", lw=0.8)
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"{title}: reliability (ECE "
           f"{expected_calibration_error(probs, labels):.4f})", xlim=(0.5, 1), ylim=(0, 1.02))
    save(fig, folder, "reliability_diagram.png")


def worst_mistakes_plot(folder, probs, labels, items, title, count=16, columns=4):
    """The most confident mistakes first: where the model is most wrong."""
    plt = pyplot()
    confidence, predicted = probs.max(1), probs.argmax(1)
    mistakes = np.flatnonzero(predicted != labels)
    worst = mistakes[np.argsort(-confidence[mistakes])][:count]
    rows = max(1, -(-len(worst) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(10, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, worst):
        ax.imshow(catdog.open_image(items[index][0]))
        ax.set_title(f"true {catdog.CLASSES[labels[index]]}, said {catdog.CLASSES[predicted[index]]} "
                     f"{confidence[index]:.2f}", fontsize=8)
    fig.suptitle(f"{title}: worst mistakes on the evaluation set ({len(mistakes)} in all)")
    save(fig, folder, "worst_mistakes.png")


def other_plot(folder, other, title):
    """Share of the test non-pets answered cat or dog, per kind, beside the share of pets answered other."""
    plt = pyplot()
    rows = [("pets answered other", other["pets_as_other"], None)] + [
        (f"{kind} ({v['photos']})", v["as_pet"], v["photos"]) for kind, v in other["by_kind"].items()]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1],
            color=["tab:red" if r[2] is None else "tab:blue" for r in rows][::-1])
    ax.axvline(catdog.GATE["max_other_as_pet_per_kind"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("share answered wrongly (non-pets: cat or dog; pets: other)")
    ax.set_title(f"{title}: \"other\" on photos it never saw ({len(other['by_kind'])} kinds)")
    save(fig, folder, "other_by_kind.png")


def pyplot():
    """matplotlib.pyplot drawing into files (Agg), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, folder, name):
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=90)
    pyplot().close(fig)


# ---------------------------------------------------------------- the evaluation set
def labels_of(items):
    return np.array([label for _, label in items], dtype=np.int64)


@dataclasses.dataclass
class Evaluation:
    """The photos every candidate is measured, reported and gated on: the test split, then the
    extra photos (300 photos alone give an accuracy +-0.9 points wide; 2,300 tell 99.0 from 99.5 %)."""
    items: list          # [(path, class index)], the test split first
    parts: np.ndarray    # "test" or "extra", per item
    hashes: list         # sha256 of each photo's file
    stats: list          # catdog.image_stats of each photo, which its slices come from
    left_out: dict       # extra photos left out: {why: count}

    @property
    def labels(self):
        return labels_of(self.items)

    @functools.cached_property
    def slices(self):
        """{slice: bool array over the photos} of each SLICES rule."""
        return {name: np.array([rule(s) for s in self.stats], dtype=bool) for name, (_, rule) in SLICES.items()}

    @property
    def test_items(self):
        return [item for item, part in zip(self.items, self.parts) if part == "test"]

    def identity(self):
        """sha256 over (part, file name, label, file sha256): two runs share per-photo answers
        only when this matches."""
        digest = hashlib.sha256()
        for (path, label), part, sha in zip(self.items, self.parts, self.hashes):
            digest.update(f"{part}\t{os.path.basename(path)}\t{label}\t{sha}\n".encode())
        return digest.hexdigest()


def manifest_path(data_dir):
    """The manifest preprocess.py writes beside (or inside) the processed data, if any."""
    parent = os.path.dirname(os.path.abspath(data_dir))
    for path in (os.path.join(parent, "manifest.csv"), os.path.join(data_dir, "manifest.csv")):
        if os.path.isfile(path):
            return path
    return None


def original_photos(items, data_dir):
    """`items` with each processed copy replaced by the original photo the manifest names,
    where it is on this machine: the service sees originals, of any size, not 224 px copies."""
    manifest = manifest_path(data_dir)
    originals = {row["path"]: row["photo"] for row in catdog.read_manifest(manifest)} if manifest else {}
    keys = [os.path.normpath(os.path.abspath(path)) for path, _ in items]
    found = [originals.get(key) for key in keys]
    # read_manifest names the copy itself when its original is not on this machine.
    if missing := sum(photo in (None, key) for photo, key in zip(found, keys)):
        # Said aloud: on copies the small, wide and tall slices come out empty and go unjudged.
        print(f"warning: {missing} of {len(items)} test photos have no original on this machine (data/manifest.csv "
              "names them): they are measured as their 224 px copies, so the slices by size and shape miss them",
              flush=True)
    return [(photo or path, label) for photo, (path, label) in zip(found, items)]


def evaluation_set(test_items, extra_folder, data_dir):
    """The test split (its originals where they are here: original_photos), then the photos of
    extra_folder that decode and are none of the manifest's photos (an extra set that overlaps
    training would flatter the model); each photo's image_stats read as it is opened."""
    extra, left_out = extra_photos(extra_folder, data_dir) if extra_folder and os.path.isdir(extra_folder) else ([], {})
    return Evaluation(items=test_items + [(path, label) for path, label, _, _ in extra],
                      parts=np.array(["test"] * len(test_items) + ["extra"] * len(extra)),
                      hashes=[catdog.sha256_file(path) for path, _ in test_items] + [sha for _, _, sha, _ in extra],
                      stats=[catdog.image_stats(catdog.open_image(path)) for path, _ in test_items]
                      + [stats for _, _, _, stats in extra], left_out=left_out)


def extra_photos(folder, data_dir):
    """([(path, class index, sha256, image_stats)] of the usable extra photos, {why: count} of
    the others)."""
    manifest = manifest_path(data_dir)
    known = {row["sha256"] for row in catdog.read_manifest(manifest, keep_dropped=True)} if manifest else set()
    kept, dropped = [], {"known to the manifest": 0, "not decodable": 0}
    for path, label in catdog.labelled_photos([folder]):
        sha = catdog.sha256_file(path)
        if sha in known:
            dropped["known to the manifest"] += 1
            continue
        try:
            img = catdog.open_image(path)
        except catdog.ImageError:
            dropped["not decodable"] += 1
            continue
        kept.append((path, catdog.CLASSES.index(label), sha, catdog.image_stats(img)))
    return kept, {why: n for why, n in dropped.items() if n}


def measure(probs, evaluation):
    """Figures of one set of answers: {"test": ..., "extra": ..., "eval": ...} (each of
    `scores`), eval covering both with its accuracy's 95 % Wilson interval; then
    {"slice_<name>": accuracy_figures} of each slice of the evaluation set."""
    labels, figures = evaluation.labels, {}
    for part in ("test", "extra"):
        if np.any(evaluation.parts == part):
            figures[part] = scores(probs[evaluation.parts == part], labels[evaluation.parts == part])
    right = probs.argmax(1) == labels
    figures["eval"] = {**scores(probs, labels), **accuracy_figures(right)}
    for name, members in evaluation.slices.items():
        figures[f"slice_{name}"] = accuracy_figures(right[members])
    return figures


def accuracy_figures(right):
    """images and errors of a bool array of right answers, and when it is not empty their
    accuracy with its 95 % Wilson interval (accuracy_low, accuracy_high)."""
    hits, n = int(np.sum(right)), len(right)
    if not n:
        return {"images": 0, "errors": 0}
    low, high = wilson_interval(hits, n)
    return {"accuracy": hits / n, "accuracy_low": low, "accuracy_high": high, "images": n, "errors": n - hits}


def write_evaluation_csv(path, evaluation, probs):
    """Every photo's answer, so a later candidate is compared with this one photo by photo."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["photo", "part", "label", "p_dog"])
        for (photo, label), part, p in zip(evaluation.items, evaluation.parts, probs[:, 1]):
            writer.writerow([os.path.basename(photo), part, catdog.CLASSES[label], f"{p:.8f}"])


def read_evaluation_csv(path):
    with open(path, newline="") as f:
        p_dog = np.array([float(row["p_dog"]) for row in csv.DictReader(f)])
    return np.stack([1 - p_dog, p_dog], axis=1)


def batches(items, settings, batch_size):
    """float32 batches (n, 3, crop, crop) of the photos of `items`, decoded and preprocessed
    as training and the service do (catdog.open_image, catdog.preprocess)."""
    for start in range(0, len(items), batch_size):
        yield np.stack([catdog.preprocess(catdog.open_image(path), settings) for path, _ in items[start:start + batch_size]])


def onnx_outputs(onnx_path, items, settings, batch_size=64):
    """{probs: cat/dog probabilities, pet: pet probability, distance: pet_distance} of every
    photo of `items` from an ONNX file in ONNX Runtime, decoded and preprocessed as training does."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    runs = [session.run(list(catdog.ONNX_OUTPUTS), {"image": x}) for x in batches(items, settings, batch_size)]
    logits, pet_logits, distances = (np.concatenate([run[i] for run in runs]) if runs else np.zeros(0) for i in range(3))
    return {"probs": catdog.softmax(logits) if len(logits) else np.zeros((0, 2)),
            "pet": 1 / (1 + np.exp(-pet_logits)), "distance": distances}


# ---------------------------------------------------------------- the not-pets split
NOT_PETS_SPLIT = (("train", 0.5), ("val", 0.2), ("test", 0.3))  # per kind, seeded


def not_pet_photos(folder=catdog.NOT_PETS_SAMPLE, seed=catdog.SEED):
    """{split: [(path, kind)]} of the not-pets folder, each kind (subfolder) split on its own
    by NOT_PETS_SPLIT in a seeded order: every kind is in every part it is big enough for.
    Training learns "other" from train and val; test is measured, here and after deployment."""
    splits = {split: [] for split, _ in NOT_PETS_SPLIT}
    kinds = sorted(k for k in os.listdir(folder) if os.path.isdir(os.path.join(folder, k))) if os.path.isdir(folder) else []
    for kind in kinds:
        names = sorted(n for n in os.listdir(os.path.join(folder, kind)) if n.lower().endswith(catdog.IMAGE_SUFFIXES))
        order = np.random.default_rng([seed, int(hashlib.sha256(kind.encode()).hexdigest()[:8], 16)]).permutation(names)
        cuts = np.round(np.cumsum([share for _, share in NOT_PETS_SPLIT]) * len(names)).astype(int)
        for (split, _), start, end in zip(NOT_PETS_SPLIT, [0, *cuts[:-1]], cuts):
            splits[split] += [(os.path.join(folder, kind, name), kind) for name in order[start:end]]
    return splits


# ---------------------------------------------------------------- reports and the model card
def print_table(results):
    """The end of a training run: each model's figures, registry version and verdict, side by side."""
    rows = [("eval photos", "eval_images", "{:.0f}"), ("eval accuracy", "eval_accuracy", "{:.4f}"),
            ("  95 % interval", None, None), ("eval log-loss", "eval_log_loss", "{:.4f}"),
            ("eval ECE", "eval_ece", "{:.4f}"), ("pets -> other", "eval_pets_as_other", "{:.4f}"),
            ("non-pets -> pet", "other_as_pet", "{:.4f}"), ("test accuracy", "test_accuracy", "{:.4f}"),
            ("test log-loss", "test_log_loss", "{:.4f}"), ("train time (s)", "train_seconds", "{:.0f}"),
            ("parameters", "parameters", "{:,}"), ("served as", "served_as", "{}"),
            ("registry version", "version", "{}"), ("promoted", "promoted", "{}")]
    names = list(results)
    print("\n" + f"{'':18}" + "".join(f"{n:>16}" for n in names))
    for label, key, fmt in rows:
        cells = [f"{r['eval_accuracy_low']:.4f}-{r['eval_accuracy_high']:.4f}" if key is None else fmt.format(r[key])
                 for r in results.values()]
        print(f"{label:18}" + "".join(f"{c:>16}" for c in cells))
    print(f"\nGate thresholds (on the evaluation set): {catdog.GATE}")


def write_reports(folder, run, candidate):
    """Figures, classification report, per-photo answers and model card of a candidate's
    served file on the evaluation set (run: train.Run, candidate: train.Candidate)."""
    os.makedirs(folder)
    plots(folder, candidate.trained.history, candidate.eval_probs, run.evaluation, candidate.trained.which)
    other_plot(folder, candidate.other_rates, candidate.trained.which)
    with open(os.path.join(folder, "classification_report.txt"), "w") as f:
        f.write(classification_report(candidate.eval_probs, run.evaluation.labels))
    write_evaluation_csv(os.path.join(folder, "evaluation.csv"), run.evaluation, candidate.eval_probs)
    with open(os.path.join(folder, "model_card.md"), "w") as f:
        f.write(model_card(run, candidate))


def slice_table(metrics):
    """Markdown table of the accuracy by slice, from the flat metrics of `measure`'s figures."""
    rows = [("all photos", "-", "eval")] + [(name, rule, f"slice_{name}") for name, (rule, _) in SLICES.items()]
    lines = ["| slice | rule | photos | accuracy (95 % interval) | errors |", "| --- | --- | ---: | --- | ---: |"]
    for name, rule, key in rows:
        accuracy = (f"{metrics[f'{key}_accuracy']:.4f} ({metrics[f'{key}_accuracy_low']:.4f}-"
                    f"{metrics[f'{key}_accuracy_high']:.4f})" if metrics[f"{key}_images"] else "-")
        lines.append(f"| {name} | {rule} | {metrics[f'{key}_images']:.0f} | {accuracy} | {metrics[f'{key}_errors']:.0f} |")
    return "\n".join(lines)


def model_card(run, candidate):
    cfg, lineage, which = run.cfg, run.lineage, candidate.trained.which
    m, facts = candidate.metrics, candidate.facts
    description = {"baseline": "a small CNN trained from scratch (reference model)",
                   "transfer": f"{cfg.backbone} (ImageNet weights, frozen) with a linear head"}[which]
    extra = (f"{facts['extra_images']} extra photos from {cfg.eval_extra} (same source, re-encoded, never trained on)"
             if facts["extra_images"] else "no extra photos")
    return f"""# catdog model card: {which}

**Model**: {description}; {facts['parameters']:,} parameters; temperature {facts['temperature']:.3f}
folded into the head. Served as an {facts['served_as']} model; every metric below is of that
file. Input: RGB photo, preprocessing {candidate.meta['preprocess']} (catdog.preprocess).

**Data**: {cfg.data}: {format_counts({k: len(v) for k, v in run.splits.items()})} images (cats and dogs,
balanced). Test split sha256 {lineage['test_split_sha256']}; DVC md5 {lineage['dvc_md5']}
(dvc.lock sha256 {lineage['dvc_lock_sha256']}); manifest sha256 {lineage['manifest_sha256']}; code {lineage['git_commit']}.
Staff-corrected photos harvested from the service (make harvest) in the training split: {lineage['feedback_photos']}.

**Evaluation** ({m['eval_images']:.0f} photos: the test split and {extra}; evaluation set
sha256 {lineage['eval_set_sha256']}): accuracy {m['eval_accuracy']:.4f}, 95 % interval
{m['eval_accuracy_low']:.4f}-{m['eval_accuracy_high']:.4f} ({m['eval_errors']:.0f} wrong),
log-loss {m['eval_log_loss']:.4f}, ECE {m['eval_ece']:.4f}, ROC-AUC {m['eval_roc_auc']:.4f}.

**Test split alone**: accuracy {m['test_accuracy']:.4f}, precision {m['test_precision']:.4f},
recall {m['test_recall']:.4f}, F1 {m['test_f1']:.4f}, ROC-AUC {m['test_roc_auc']:.4f},
log-loss {m['test_log_loss']:.4f}, ECE {m['test_ece']:.4f}. Training took {m['train_seconds']:.0f} s.

**Accuracy by slice** of the evaluation set, each rule on the original photo (catdog.image_stats);
a photo may be in several slices or in none:

{slice_table(m)}

**"other"** (neither a cat nor a dog): answered when the pet probability (decision
"{facts['pet_decision']}", one of {', '.join(candidate.trained.other_candidates)}, chosen on val) is below
{facts['pet_threshold']:.4f}, the threshold under which {catdog.PETS_REJECTED:.1%} of the training pets
fall. On photos it never saw: pets answered "other" {m['eval_pets_as_other']:.4f} of the
evaluation set; non-pets answered cat or dog {m['other_as_pet']:.4f} of the not-pets test part and
generated blanks, noise, documents and screenshots (per kind in reports/other_by_kind.png).
Learnt from the train and val parts, measured on the test part of: {run.others.described()}.

**Intended use**: telling whether a photo shows a cat or a dog, for a pet-adoption workflow
with a human in the loop.

**Limits**: "other" was learnt from the photos and generated images above;
a kind of photo unlike all of them may still get "cat" or "dog", and a photo with both a cat and a
dog gets one of the two. Evaluation photos come from the
same Kaggle source as training; expect lower accuracy on photos from other cameras and
sources, which the service's drift monitor watches for.
"""
