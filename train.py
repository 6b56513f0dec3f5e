"""Train the cat/dog models, track them in MLflow, and promote a measured champion.

    python train.py                                  # both models on data/processed
    python train.py --arch transfer --head-epochs 40
    python train.py --help                           # every option (the config block below)
    torchrun --nproc_per_node 4 train.py --arch baseline   # the same script, DDP

baseline  a small CNN trained from scratch: the reference the transfer model must beat.
transfer  EfficientNet-Lite2 (--backbone) with ImageNet weights, frozen. Its pooled 1280-d
          features are extracted once, then only the linear head is trained on them.
Both learn the "other" answer on the same features (other.py), are calibrated (temperature
folded into the head), exported to ONNX (checked against PyTorch) and quantized to int8, the
file the service runs. That file is measured on the evaluation set (evaluate.py), logged to
MLflow, registered and gated (promote.py); only a promoted model reaches models/.

Top to bottom: options, processes, data, fitting, then the run as named steps: train_and_gate
-> prepare, then per model train_model, calibrate, export_and_measure, promote.log_run and
promote.register_and_gate.
"""
import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset, Subset

import catdog
import evaluate
import nets
import other
import promote

# ---------------------------------------------------------------- config
# Plain values, nanoGPT style: each line `name = value  # help` is an option --name (see
# catdog.config_parser, called in main()); booleans take --name / --no-name.
arch = "both"                  # which model(s) to train and gate: baseline, transfer or both
data = catdog.PROCESSED_DIR    # the processed images: {train,val,test}/{cat,dog}/*.jpg
out = catdog.MODELS_DIR        # where a promoted champion is written
seed = catdog.SEED             # seed of the weights, the batch order and the augmentations
threads = 0                    # torch threads per process; 0 = cores / processes
workers = 0                    # DataLoader worker processes (0 = decode in the training process)
# baseline: a CNN from scratch
epochs = 6                     # baseline: training epochs (the reference, never the champion: kept short)
batch_size = 32                # baseline: images per batch (small ones run faster per image on a 2-core CPU: cache)
lr = 3e-3                      # baseline: peak learning rate of AdamW's one-cycle schedule
weight_decay = 5e-4            # baseline: AdamW weight decay
# transfer: frozen features + a linear head
backbone = catdog.BACKBONE     # transfer: the frozen ImageNet network (efficientnet-lite0, -lite1 or -lite2)
mirror_view = False            # transfer: the mirror image of every training photo as a second training view
pretrained = True              # transfer: ImageNet weights (--no-pretrained: random ones, for tests only)
extract_batch_size = 16        # transfer: images per batch when extracting the frozen features
aug_views = 0                  # transfer: extra augmented train views to extract features from
head_epochs = 20               # transfer: full-batch L-BFGS steps (25 iterations each) on the features
head_l2 = 0.01                 # transfer: L2 penalty of the logistic head
# the served file
quantize = True                # serve int8 ONNX (nets.quantize_onnx), about 2x less serving CPU; --no-quantize: fp32
calibration_images = 128       # training images that set the int8 activation ranges
# evaluation: what every candidate is measured, reported and gated on
eval_extra = catdog.EXTRA_SAMPLE  # labelled photos measured with the test split, never trained on ("": test only)
not_pets = catdog.NOT_PETS_SAMPLE  # photos neither cat nor dog, by kind, split by evaluate.not_pet_photos; absent or empty: refused
synthetic = 200                # generated non-pets (blank, noise, gradient, document, screenshot) for training; half as many for val and test
synthetic_only = False         # learn and measure "other" on the generated non-pets alone, without --not-pets photos
pet_l2 = 0.01                  # L2 penalty of the pet-vs-other logistic head
# tracking and the registry
tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", catdog.TRACKING_URI)  # MLflow tracking URI ($MLFLOW_TRACKING_URI, else mlflow.db in the project root)
experiment = "catdog"          # MLflow experiment the runs go to
registered_name = "catdog"     # MLflow registered model the versions go to
ARCHS = ("baseline", "transfer", "both")


# ---------------------------------------------------------------- processes (torchrun)
# Without torchrun this is one process: RANK 0, WORLD 1, and no process group.
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start_processes(cfg):
    """The device this process trains on, the process group joined under torchrun."""
    device = torch.device("cpu")
    if WORLD > 1:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // WORLD))
    return device


def log(*args):
    if RANK == 0:
        print(*args, flush=True)


# ---------------------------------------------------------------- why training stops
class TrainError(Exception):
    """A reason training cannot go on; main() prints it and exits."""


class NoData(TrainError):
    """A split has no images."""


class ExportMismatch(TrainError):
    """The exported ONNX file does not compute what the PyTorch model computes."""


# ---------------------------------------------------------------- data
def load_splits(root):
    """{split: [(path, class index)]} of every split under root; NoData when one is empty."""
    splits = {split: list_split(root, split) for split, _ in catdog.SPLITS}
    for split, items in splits.items():
        if not items:
            raise NoData(f"no images in {root}/{split}/{{cat,dog}}/ (run `make data` first)")
    return splits


def list_split(root, split):
    """[(path, class index)] of root/split/{cat,dog}/*, sorted so every run sees the same order."""
    items = []
    for index, name in enumerate(catdog.CLASSES):
        folder = os.path.join(root, split, name)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        items += [(os.path.join(folder, n), index) for n in names if n.lower().endswith((".jpg", ".jpeg", ".png"))]
    return items


class Images(Dataset):
    """Images of one split as (normalised tensor, label). With `augment`, a random view
    whose randomness depends only on (seed, epoch, index), so runs and process counts agree."""

    def __init__(self, items, settings, augment=False, seed=0, mirror=False):
        self.items, self.settings, self.augment, self.seed, self.epoch = items, settings, augment, seed, 0
        self.mirror = mirror  # every image left-right mirrored

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        img = catdog.open_image(path)
        if self.mirror:
            img = ImageOps.mirror(img)
        if self.augment:
            img = augment(img, self.settings["resize"], np.random.default_rng([self.seed, self.epoch, index]))
        return torch.from_numpy(catdog.preprocess(img, self.settings)), label


def augment(img, size, rng):
    """Random resized crop (60-100 % of the area, aspect 3:4-4:3) to size x size, horizontal
    flip, rotation up to 10 degrees and colour jitter of +-20 %. The caller then applies
    catdog.preprocess, the same function evaluation and serving use."""
    width, height = img.size
    area = width * height * rng.uniform(0.6, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = min(width, round(np.sqrt(area * aspect)))
    crop_h = min(height, round(np.sqrt(area / aspect)))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    # Grey corners: (127 - mean) / std is ~0 after normalisation, the least surprising fill.
    img = img.rotate(rng.uniform(-10, 10), Image.BILINEAR, fillcolor=(127, 127, 127))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.8, 1.2))
    return img


# ---------------------------------------------------------------- fitting
def to_device(x, device):
    x = x.to(device)
    # channels_last runs these convolutions 1.5-2.5x faster on CPU (measured here).
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def predict(model, dataset, batch_size):
    """Outputs of `model` for every item of `dataset`, in order. Under torchrun each process
    computes every WORLD-th item and all of them receive the whole result."""
    share = Subset(dataset, range(RANK, len(dataset), WORLD))
    model.eval()
    device = next(model.parameters()).device  # trained models come back on the CPU, even on a GPU machine
    outputs = []
    with torch.inference_mode():
        for x, _ in DataLoader(share, batch_size=batch_size):
            outputs.append(model(to_device(x, device)).float().cpu())
    result = torch.cat(outputs) if outputs else torch.zeros(0)
    if WORLD == 1:
        return result
    parts = [None] * WORLD
    dist.all_gather_object(parts, result)
    full = torch.zeros(len(dataset), *parts[0].shape[1:])
    for rank, part in enumerate(parts):
        full[rank::WORLD] = part
    return full


def frozen_features(run, network, dataset):
    """Outputs of the frozen `network` for every item of `dataset`. On a CPU, in one process,
    ONNX Runtime runs the network exported once: the same features (within 1e-5) in a fifth of
    PyTorch eager's time on 2 cores, which is most of make train (docs/benchmarks.md)."""
    if run.device.type != "cpu" or WORLD > 1:
        return predict(network, dataset, run.cfg.extract_batch_size)
    session = nets.onnx_session(network, dataset.settings["crop"])
    loader = DataLoader(dataset, batch_size=run.cfg.extract_batch_size)
    outputs = [session.run(None, {"image": x.numpy()})[0] for x, _ in loader]
    return torch.from_numpy(np.concatenate(outputs)) if outputs else torch.zeros(0)


def fit(run, model, train_set, val_set, log_metrics):
    """AdamW with a one-cycle schedule (the baseline's options); per-epoch train/val loss and
    accuracy. Under torchrun the model is wrapped in DistributedDataParallel and each process
    sees its share of batches."""
    cfg = run.cfg
    net = torch.nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    sampler = (torch.utils.data.DistributedSampler(train_set, WORLD, RANK, shuffle=True, seed=cfg.seed)
               if WORLD > 1 else None)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.workers,
                        drop_last=len(train_set) >= 2 * cfg.batch_size * WORLD)  # no 1-image BatchNorm batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=max(1, cfg.epochs * len(loader)))
    val_labels = evaluate.labels_of(val_set.items)
    history = []
    for epoch in range(cfg.epochs):
        started = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_set.epoch = epoch  # new augmentations each epoch (read by Images)
        totals = train_one_epoch(net, loader, optimizer, scheduler, run.device)
        val_logits = predict(model, val_set, 128)
        row = {"train_loss": float(totals[0] / totals[2]), "train_accuracy": float(totals[1] / totals[2]),
               "val_loss": float(F.cross_entropy(val_logits, torch.from_numpy(val_labels))),
               "val_accuracy": float((val_logits.argmax(1).numpy() == val_labels).mean())}
        history.append(row)
        log_metrics(row, epoch)
        log(f"  epoch {epoch + 1:3d}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
            f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  {time.time() - started:.1f}s")
    return history


def train_one_epoch(net, loader, optimizer, scheduler, device):
    """One pass over `loader`; (loss sum, correct, count) over every process's batches."""
    net.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = to_device(x, device), y.to(device)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                               torch.tensor(len(y), dtype=torch.float64, device=device)])
    if WORLD > 1:
        dist.all_reduce(totals)
    return totals


def train_baseline(run, log_metrics):
    cfg, splits = run.cfg, run.splits
    settings = catdog.preprocess_settings("baseline")
    torch.manual_seed(cfg.seed)
    model = nets.build_model("baseline").to(run.device).to(memory_format=torch.channels_last)
    train_set = Images(splits["train"], settings, augment=True, seed=cfg.seed)
    history = fit(run, model, train_set, Images(splits["val"], settings), log_metrics)
    return model.cpu().eval(), history, None, None


def train_transfer(run, log_metrics):
    """Extract frozen backbone features once, then train only the linear head on them."""
    cfg, splits = run.cfg, run.splits
    settings = catdog.preprocess_settings("transfer", cfg.backbone)
    torch.manual_seed(cfg.seed)
    model = nets.build_model("transfer", pretrained=cfg.pretrained, backbone=cfg.backbone).eval()
    backbone = model.features.to(run.device).to(memory_format=torch.channels_last)
    started = time.time()
    views = [Images(splits["train"], settings)]
    if cfg.mirror_view:
        views.append(Images(splits["train"], settings, mirror=True))
    for view in range(cfg.aug_views):
        views.append(Images(splits["train"], settings, augment=True, seed=cfg.seed))
        views[-1].epoch = view
    train_x = torch.cat([frozen_features(run, backbone, v) for v in views])
    train_y = torch.from_numpy(np.tile(evaluate.labels_of(splits["train"]), len(views)))
    val_x = frozen_features(run, backbone, Images(splits["val"], settings))
    count = len(train_x) + len(val_x)
    log(f"  features of {count} images in {time.time() - started:.1f}s"
        f" ({(time.time() - started) / max(1, count) * 1000:.1f} ms/image)")
    val_y = evaluate.labels_of(splits["val"])
    history = fit_logistic(model.head, (train_x, train_y), (val_x, val_y), cfg, log_metrics)
    held_out = out_of_fold_logits(train_x, train_y, len(splits["train"]), cfg)
    with torch.no_grad():
        calibration = (torch.cat([held_out, model.head(val_x)]),
                       np.concatenate([evaluate.labels_of(splits["train"]), val_y]))
    pets = {"train": train_x[:len(splits["train"])], "val": val_x}
    return model.cpu().eval(), history, calibration, pets


def out_of_fold_logits(train_x, train_y, photos, cfg, folds=5):
    """Logits of every training photo (its first view) from a head fitted without it, for
    temperature scaling: val alone cannot calibrate a strong model (with none of its photos
    wrong, the best temperature is ~0)."""
    order = np.random.default_rng(cfg.seed).permutation(photos)
    logits = torch.zeros(photos, len(catdog.CLASSES))
    views = len(train_x) // photos
    for held in np.array_split(order, folds):
        kept = np.setdiff1d(order, held)
        rows = torch.from_numpy(np.concatenate([kept + view * photos for view in range(views)]))
        head = torch.nn.Linear(train_x.shape[1], len(logits[0]))
        fit_logistic(head, (train_x[rows], train_y[rows]), None, cfg)
        with torch.no_grad():
            logits[held] = head(train_x[torch.from_numpy(held)])
    return logits


def fit_logistic(head, train, val, cfg, log_metrics=None):
    """L2-regularised logistic regression on the features (train, val: (features, labels)),
    full-batch L-BFGS: better calibrated than mini-batch AdamW heads. Every process holds all
    features (gathered by predict), so under torchrun each one solves the same small convex
    problem; no DDP needed. Without log_metrics, a silent fit (no history)."""
    (train_x, train_y), head = train, head.cpu()
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=25, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + cfg.head_l2 / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    history = []
    for epoch in range(cfg.head_epochs):
        optimizer.step(closure)
        if log_metrics is None:
            continue
        with torch.no_grad():
            train_logits, val_logits, val_y = head(train_x), head(val[0]), torch.from_numpy(val[1])
            row = {"train_loss": float(F.cross_entropy(train_logits, train_y)),
                   "train_accuracy": float((train_logits.argmax(1) == train_y).float().mean()),
                   "val_loss": float(F.cross_entropy(val_logits, val_y)),
                   "val_accuracy": float((val_logits.argmax(1) == val_y).float().mean())}
        history.append(row)
        log_metrics(row, epoch)
        log(f"  L-BFGS step {epoch + 1:3d}/{cfg.head_epochs}  train loss {row['train_loss']:.4f} acc "
            f"{row['train_accuracy']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}")
    return history


# ---------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """What every model of this run is trained, measured and gated on (prepare)."""
    cfg: argparse.Namespace    # the options above, logged as they are as MLflow params
    device: torch.device       # where this process trains
    processes: int             # WORLD
    splits: dict               # {train, val, test: [(path, class index)]}
    others: other.NonPets      # photos that are neither cats nor dogs
    evaluation: evaluate.Evaluation  # what every model is measured and gated on
    lineage: dict              # promote.lineage_of: MLflow tags ({} on ranks other than 0)
    train_stats: list          # image statistics of the training photos, for the drift profile
    client: object             # the MLflow registry (None on ranks other than 0)


@dataclasses.dataclass
class Trained:
    """A model straight out of training."""
    which: str                 # baseline or transfer
    model: torch.nn.Module
    history: list              # per epoch: train/val loss and accuracy
    seconds: float             # training time
    calibration: tuple | None  # (held-out logits, labels) to fit the temperature on; None: val
    pet_threshold: float       # answered "other" below this pet probability
    other_candidates: dict     # {pet decision candidate: its val rates}


@dataclasses.dataclass
class Calibrated:
    """How PyTorch does on test once the temperature is folded into the head."""
    temperature: float
    test_probs: np.ndarray
    test_scores: dict


@dataclasses.dataclass
class Candidate:
    """A model with its served file written and measured: what promote.py logs and gates, and
    evaluate.py reports. Metric names are evaluate.py's (test_accuracy, eval_log_loss, ...)."""
    trained: Trained
    folder: str                # its files until they are logged: model.onnx, model.json, ...
    meta: dict                 # model.json, metrics included
    metrics: dict              # the served file's figures, the "other" rates, train_seconds: gated and reported
    checks: dict               # logged beside them: PyTorch's own, export parity, val calibration, the candidates
    facts: dict                # parameters, temperature, served_as, pet_decision, pet_threshold, extra_images
    eval_probs: np.ndarray     # cat/dog probabilities of the evaluation set
    val_probs: np.ndarray
    val_distances: np.ndarray  # pet_distance of the val photos, for the drift profile
    other_rates: dict          # evaluate.other_rates on the evaluation set's pets and the test non-pets


def prepare(cfg, device, synthetic_folder):
    """The Run: the splits, the evaluation set, the non-pets (the generated ones written to
    synthetic_folder) and, on rank 0, the registry, the lineage and the drift statistics."""
    splits = load_splits(cfg.data)
    if missing := other.missing_photos(cfg):
        raise NoData(missing)
    log(f"data {cfg.data}: " + evaluate.format_counts({k: len(v) for k, v in splits.items()})
        + f"; {WORLD} process(es), {torch.get_num_threads()} threads each, device {device}")
    evaluation = evaluate.evaluation_set(evaluate.original_photos(splits["test"], cfg.data), cfg.eval_extra, cfg.data)
    if evaluation.left_out:
        log(f"extra evaluation photos in {cfg.eval_extra}: left out " + evaluate.format_counts(evaluation.left_out))
    if cfg.eval_extra and not np.any(evaluation.parts == "extra"):
        log(f"no usable extra evaluation photos at {cfg.eval_extra}: candidates are measured on the test split only")
    log(f"evaluation set: {len(evaluation.items)} photos, of which "
        + evaluate.format_counts({name: int(np.sum(m)) for name, m in evaluation.slices.items()}) + " (slices)")
    client, lineage, train_stats = None, {}, []
    if RANK == 0:
        client = promote.open_registry(cfg)
        lineage = promote.lineage_of(cfg.data, splits["test"], evaluation)
        if unchecked := promote.unchecked_feedback(cfg.data, cfg.eval_extra):
            log(f"WARNING: {unchecked}")
            lineage["feedback_unchecked"] = unchecked  # an MLflow tag beside the lineage
        train_stats = promote.training_image_stats(splits["train"], cfg.data)
    others = other.non_pets(cfg, synthetic_folder)
    if not others.parts["train"]:
        raise NoData(f"no photos that are neither cats nor dogs in {cfg.not_pets!r} and --synthetic 0: "
                     "the \"other\" decision has nothing to learn from")
    log(f"non-pets: {others.described()}")
    return Run(cfg, device, WORLD, splits, others, evaluation, lineage, train_stats, client)


def run_one(run, which):
    """Train, calibrate, export and measure, log, register and gate one model: its metrics,
    facts, promoted? and version. Under torchrun all processes train and calibrate, rank 0 alone
    goes on, in an MLflow run marked FAILED when a step raises and a folder removed either way."""
    import mlflow

    log(f"\n== {which}")
    if RANK != 0:
        calibrate(run, train_model(run, which, log_metrics=lambda row, step: None))
        return None
    with (mlflow.start_run(run_name=which) as active,
          tempfile.TemporaryDirectory(prefix=f"catdog-{which}-") as folder):
        trained = train_model(run, which, log_metrics=lambda row, step: mlflow.log_metrics(row, step=step))
        calibrated = calibrate(run, trained)
        candidate = export_and_measure(run, trained, calibrated, model_meta(run, trained, calibrated, active), folder)
        logged = promote.log_run(run, candidate)
        promoted, version = promote.register_and_gate(run, candidate, logged)
        return {**candidate.metrics, **candidate.facts, "promoted": promoted, "version": version}


def train_model(run, which, log_metrics):
    """Train the cat/dog model, then its "other" decision on the same pooled features."""
    started = time.time()
    train = train_baseline if which == "baseline" else train_transfer
    model, history, calibration, pets = train(run, log_metrics)
    settings = catdog.preprocess_settings(which, run.cfg.backbone)

    def pooled(items):
        return frozen_features(run, model.features, Images(items, settings))

    pets = pets or {split: pooled(run.splits[split]) for split in ("train", "val")}
    others = {split: pooled(run.others.items(split)) for split in ("train", "val")}
    threshold, candidates = other.decide_other(model.pet, pets, others, run.others.kinds("val"), run.cfg)
    for name, rates in candidates.items():
        log(f"  \"other\" candidate {name:13s}: val pets answered other {rates['pets_as_other']:.4f}, "
            f"non-pets answered cat/dog {rates['other_as_pet']:.4f} (threshold {rates['threshold']:.4f})")
    log(f"  \"other\" decision: {model.pet.score_name}, answered when the pet probability is below {threshold:.4f}")
    return Trained(which, model, history, time.time() - started, calibration, threshold, candidates)


def calibrate(run, trained):
    """Temperature scaling on the held-out logits training kept (else on val), folded into the
    head; then PyTorch's view of test. Every process takes part (predict shares the images out)."""
    model, settings = trained.model, catdog.preprocess_settings(trained.which, run.cfg.backbone)
    logits, labels = trained.calibration or (predict(model, Images(run.splits["val"], settings), 64),
                                             evaluate.labels_of(run.splits["val"]))
    temperature = nets.fit_temperature(logits, labels)
    nets.fold_temperature(model, temperature)
    test_items = run.evaluation.test_items
    test_probs = catdog.softmax(predict(model, Images(test_items, settings), 64).numpy())
    test_scores = evaluate.scores(test_probs, evaluate.labels_of(test_items))
    log(f"  temperature {temperature:.3f}; PyTorch test {evaluate.format_metrics(test_scores)}")
    return Calibrated(temperature, test_probs, test_scores)


def model_meta(run, trained, calibrated, active):
    """model.json of the model in MLflow run `active` (its metrics come with export_and_measure)."""
    lineage = run.lineage
    return catdog.model_meta(trained.which, temperature=calibrated.temperature, run_id=active.info.run_id,
                             backbone=run.cfg.backbone, served_as="int8 ONNX" if run.cfg.quantize else "fp32 ONNX",
                             data={k: lineage[k] for k in ("test_split_sha256", "eval_set_sha256", "dvc_md5",
                                                            "dvc_lock_sha256", "manifest_sha256", "feedback_photos")},
                             git_commit=lineage["git_commit"],
                             other={"label": catdog.OTHER, "score": trained.model.pet.score_name,
                                    "threshold": trained.pet_threshold})


def export_and_measure(run, trained, calibrated, meta, folder):
    """Write the served file, folder/model.onnx, and measure it on val, on the evaluation set
    and on the test non-pets: the service runs this file, so it is what is reported and gated."""
    evaluation, others, settings = run.evaluation, run.others, meta["preprocess"]
    onnx_path = os.path.join(folder, "model.onnx")
    parity = export_served_model(run, trained.model, meta, onnx_path, calibrated.test_probs)
    started = time.time()
    val = evaluate.onnx_outputs(onnx_path, run.splits["val"], settings)
    on_eval = evaluate.onnx_outputs(onnx_path, evaluation.items, settings)
    on_others = evaluate.onnx_outputs(onnx_path, others.items("test"), settings)
    eval_probs = on_eval["probs"]
    rates = evaluate.other_rates(on_eval["pet"], on_others["pet"], others.kinds("test"), meta["other"]["threshold"])
    log(f"  \"other\": {rates['pets_as_other']:.4f} of {len(eval_probs)} pets answered other, "
        f"{rates['other_as_pet']:.4f} of {len(on_others['pet'])} test non-pets answered cat or dog; by kind: "
        + ", ".join(f"{k} {v['as_pet']:.3f} of {v['photos']}" for k, v in rates["by_kind"].items()))
    figures = evaluate.measure(eval_probs, evaluation)
    test_probs = eval_probs[evaluation.parts == "test"]  # the test split comes first, in order
    agreement = float(np.mean(test_probs.argmax(1) == calibrated.test_probs.argmax(1)))
    log(f"  served model ({meta['served_as']}) on {len(evaluation.items)} photos in {time.time() - started:.0f}s: "
        f"{evaluate.describe(figures['eval'])}\n  test {evaluate.format_metrics(figures['test'])}"
        f"; same label as PyTorch on {agreement:.2%} of test")
    val_scores = evaluate.scores(val["probs"], evaluate.labels_of(run.splits["val"]))
    metrics = {**evaluate.flat(figures), **evaluate.flat_other(rates), "train_seconds": trained.seconds}
    checks = {**evaluate.flat({"torch_test": calibrated.test_scores}), "onnx_max_abs_prob_diff": parity,
              "served_torch_label_agreement": agreement,
              "served_torch_max_abs_prob_diff": float(np.abs(test_probs - calibrated.test_probs).max()),
              **{f"val_{k}_calibrated": val_scores[k] for k in ("accuracy", "log_loss", "ece")},
              **{f"val_{k}_{name.replace('+', '_')}": val_rates[k] for name, val_rates in trained.other_candidates.items()
                 for k in ("pets_as_other", "other_as_pet")}}
    facts = {"parameters": sum(p.numel() for p in trained.model.parameters()), "temperature": calibrated.temperature,
             "served_as": meta["served_as"], "pet_decision": trained.model.pet.score_name,
             "pet_threshold": trained.pet_threshold, "extra_images": int(np.sum(evaluation.parts == "extra"))}
    meta["other"].update(rates)
    meta["metrics"] = {**evaluate.model_json_names(metrics), **facts}
    return Candidate(trained, folder, meta, metrics, checks, facts, eval_probs, val["probs"], val["distance"], rates)


def export_served_model(run, model, meta, path, torch_test_probs):
    """Write the ONNX file the service will run: fp32 export checked against PyTorch on the
    test split (ExportMismatch when they disagree), then (--quantize) int8. Returns the fp32
    parity, max |p_onnx - p_torch|."""
    nets.export_onnx(model, meta, path)
    test_items = run.evaluation.test_items
    onnx = evaluate.onnx_outputs(path, test_items, meta["preprocess"])
    parity = max(float(np.abs(onnx["probs"] - torch_test_probs).max()),
                 pet_parity(model, onnx, test_items, meta["preprocess"]))
    log(f"  ONNX fp32 parity over {len(test_items)} test images: max |p_onnx - p_torch| = {parity:.2e}")
    if not parity <= 1e-4:
        raise ExportMismatch(f"ONNX export of {meta['arch']} disagrees with PyTorch by {parity:.2e} (> 1e-4)")
    if run.cfg.quantize:
        started, count, items = time.time(), run.cfg.calibration_images, run.splits["train"] + run.others.items("train")
        # Evenly spaced training images (both classes, the non-pets): the activation ranges int8 must cover.
        nets.quantize_onnx(path, evaluate.batches(items[::max(1, len(items) // count)][:count], meta["preprocess"], 16))
        log(f"  quantized to int8 in {time.time() - started:.1f}s ({count} calibration images)")
    return parity


def pet_parity(model, onnx, items, settings, count=64):
    """max |difference| of the pet probability, and of pet_distance relative to 1 + itself,
    between the ONNX file's outputs over `items` (evaluate.onnx_outputs) and PyTorch, on the
    first `count` items."""
    x = torch.stack([x for x, _ in Images(items[:count], settings)])
    with torch.no_grad():
        _, pet_logit, distance = model.outputs(x)
    pet, distances = onnx["pet"][:count], onnx["distance"][:count]
    return max(float(np.abs(pet - torch.sigmoid(pet_logit).numpy()).max()),
               float((np.abs(distances - distance.numpy()) / (1 + distance.numpy())).max()))


# ---------------------------------------------------------------- main
def main(argv=None):
    """Train, gate and maybe promote the models --arch names: {arch: run_one's result} (None on
    ranks other than 0). Only here does a TrainError become an exit with its message."""
    cfg = catdog.config_parser(globals(), choices={"arch": ARCHS, "backbone": tuple(catdog.BACKBONES)}).parse_args(argv)
    try:
        return train_and_gate(cfg)
    except TrainError as e:
        raise SystemExit(str(e)) from None


def train_and_gate(cfg):
    device = start_processes(cfg)
    with tempfile.TemporaryDirectory(prefix="catdog-synthetic-") as synthetic_folder:
        run = prepare(cfg, device, synthetic_folder)
        results = {which: run_one(run, which) for which in (["baseline", "transfer"] if cfg.arch == "both" else [cfg.arch])}
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()
    if RANK == 0:
        evaluate.print_table(results)
    return results


if __name__ == "__main__":
    main()
