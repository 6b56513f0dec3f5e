"""Train the cat/dog models, track them in MLflow, and promote a measured champion.

    python train.py                                  # both models on data/processed
    python train.py --arch transfer --head-epochs 40
    python train.py --help                           # every option (the config block below)
    torchrun --nproc_per_node 4 train.py --arch baseline   # the same script, DDP

baseline  a small CNN trained from scratch: the reference the transfer model must beat.
transfer  EfficientNet-Lite2 (--backbone) with ImageNet weights, frozen. Its pooled 1280-d
          features are extracted once, then only the linear head is trained on them.
Both are calibrated with temperature scaling (folded into the head), exported to ONNX
(checked against PyTorch) and quantized to int8, the file the service runs. That file is
measured on the evaluation set (the test split + the extra photos, --eval-extra), logged to
MLflow, registered as `catdog`, and put through the gate (catdog.GATE, and the champion
compared photo by photo on the same evaluation set). Only a promoted model is written to
models/ (model.pt, model.json, model.onnx, reference_profile.json).
"""
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset, Subset

import catdog
import nets

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
quantize = True                # serve int8 ONNX (catdog.quantize_onnx), about 2x less serving CPU; --no-quantize: fp32
calibration_images = 128       # training images that set the int8 activation ranges
# evaluation: what every candidate is measured, reported and gated on
eval_extra = catdog.EXTRA_SAMPLE  # labelled photos measured with the test split, never trained on ("": test only)
not_pets = catdog.NOT_PETS_SAMPLE  # photos neither cat nor dog, by kind, split by catdog.not_pet_photos ("": none)
synthetic = 200                # generated non-pets (blank, noise, gradient, document, screenshot) for training; half as many for val and test
pet_l2 = 0.01                  # L2 penalty of the pet-vs-other logistic head
# tracking and the registry
tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", catdog.TRACKING_URI)  # MLflow tracking URI ($MLFLOW_TRACKING_URI, else mlflow.db in the project root)
experiment = "catdog"          # MLflow experiment the runs go to
registered_name = "catdog"     # MLflow registered model the versions go to
ARCHS = ("baseline", "transfer", "both")


# ---------------------------------------------------------------- distributed (torchrun) set-up
# Without torchrun this is one process: RANK 0, WORLD 1, and no process group.
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
DEVICE = torch.device("cpu")


def setup_processes(cfg):
    global DEVICE
    if WORLD > 1:
        if torch.cuda.is_available():
            DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    elif torch.cuda.is_available():
        DEVICE = torch.device("cuda")
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // WORLD))


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


def labels_of(items):
    return np.array([label for _, label in items], dtype=np.int64)


# ---------------------------------------------------------------- training
def to_device(x, device=None):
    x = x.to(device or DEVICE)
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


def fit(model, train_set, val_set, val_labels, cfg, epochs, batch_size, lr, weight_decay, mlflow_log):
    """AdamW with a one-cycle schedule; per-epoch train/val loss and accuracy. Under torchrun
    the model is wrapped in DistributedDataParallel and each process sees its share of batches."""
    net = torch.nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    sampler = (torch.utils.data.DistributedSampler(train_set, WORLD, RANK, shuffle=True, seed=cfg.seed)
               if WORLD > 1 else None)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.workers,
                        drop_last=len(train_set) >= 2 * batch_size * WORLD)  # no 1-image BatchNorm batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(1, epochs * len(loader)))
    history = []
    for epoch in range(epochs):
        started = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_set.epoch = epoch  # new augmentations each epoch (read by Images)
        totals = train_one_epoch(net, loader, optimizer, scheduler)
        val_logits = predict(model, val_set, 128)
        row = {"train_loss": float(totals[0] / totals[2]), "train_accuracy": float(totals[1] / totals[2]),
               "val_loss": float(F.cross_entropy(val_logits, torch.from_numpy(val_labels))),
               "val_accuracy": float((val_logits.argmax(1).numpy() == val_labels).mean())}
        history.append(row)
        mlflow_log(row, epoch)
        log(f"  epoch {epoch + 1:3d}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
            f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  {time.time() - started:.1f}s")
    return history


def train_one_epoch(net, loader, optimizer, scheduler):
    """One pass over `loader`; (loss sum, correct, count) over every process's batches."""
    net.train()
    totals = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    for x, y in loader:
        x, y = to_device(x), y.to(DEVICE)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                               torch.tensor(len(y), dtype=torch.float64, device=DEVICE)])
    if WORLD > 1:
        dist.all_reduce(totals)
    return totals


def fit_temperature(logits, labels):
    """Temperature scaling: the T > 0 minimising val NLL of logits / T (LBFGS on log T)."""
    logits, labels = logits.detach().double(), torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def train_baseline(cfg, splits, mlflow_log):
    settings = catdog.preprocess_settings("baseline")
    torch.manual_seed(cfg.seed)
    model = nets.build_model("baseline").to(DEVICE).to(memory_format=torch.channels_last)
    train_set = Images(splits["train"], settings, augment=True, seed=cfg.seed)
    val_set = Images(splits["val"], settings)
    history = fit(model, train_set, val_set, labels_of(splits["val"]), cfg, cfg.epochs, cfg.batch_size,
                  cfg.lr, cfg.weight_decay, mlflow_log)
    return model.cpu().eval(), history, None, None


def train_transfer(cfg, splits, mlflow_log):
    """Extract frozen backbone features once, then train only the linear head on them."""
    settings = catdog.preprocess_settings("transfer", cfg.backbone)
    torch.manual_seed(cfg.seed)
    model = nets.build_model("transfer", pretrained=cfg.pretrained, backbone=cfg.backbone).eval()
    backbone = model.features.to(DEVICE).to(memory_format=torch.channels_last)
    started = time.time()
    views = [Images(splits["train"], settings)]
    if cfg.mirror_view:
        views.append(Images(splits["train"], settings, mirror=True))
    for view in range(cfg.aug_views):
        views.append(Images(splits["train"], settings, augment=True, seed=cfg.seed))
        views[-1].epoch = view
    train_x = torch.cat([predict(backbone, v, cfg.extract_batch_size) for v in views])
    train_y = torch.from_numpy(np.tile(labels_of(splits["train"]), len(views)))
    val_x = predict(backbone, Images(splits["val"], settings), cfg.extract_batch_size)
    count = len(train_x) + len(val_x)
    log(f"  features of {count} images in {time.time() - started:.1f}s"
        f" ({(time.time() - started) / max(1, count) * 1000:.1f} ms/image)")
    val_y = labels_of(splits["val"])
    history = fit_logistic(model.head, train_x, train_y, val_x, val_y, cfg, mlflow_log)
    held_out = out_of_fold_logits(train_x, train_y, len(splits["train"]), cfg)
    with torch.no_grad():
        calibration = (torch.cat([held_out, model.head(val_x)]), np.concatenate([labels_of(splits["train"]), val_y]))
    pets = {"train": train_x[:len(splits["train"])], "val": val_x}
    return model.cpu().eval(), history, calibration, pets


def out_of_fold_logits(train_x, train_y, photos, cfg, folds=5):
    """Logits of every training photo (its first view) from a head fitted without it, for
    temperature scaling. Val alone cannot calibrate a strong model: with none of its 300
    photos wrong, the best temperature is ~0 (measured: T 0.02 for Lite2, eval log-loss 0.42
    instead of 0.017 with out-of-fold logits of the 2,700 photos)."""
    order = np.random.default_rng(cfg.seed).permutation(photos)
    logits = torch.zeros(photos, len(catdog.CLASSES))
    views = len(train_x) // photos
    for held in np.array_split(order, folds):
        kept = np.setdiff1d(order, held)
        rows = torch.from_numpy(np.concatenate([kept + view * photos for view in range(views)]))
        head = torch.nn.Linear(train_x.shape[1], len(logits[0]))
        fit_logistic(head, train_x[rows], train_y[rows], None, None, cfg)
        with torch.no_grad():
            logits[held] = head(train_x[torch.from_numpy(held)])
    return logits


def fit_logistic(head, train_x, train_y, val_x, val_labels, cfg, mlflow_log=None):
    """L2-regularised logistic regression on the features, full-batch L-BFGS. Measured here it
    beat mini-batch AdamW heads on test log-loss (0.027 vs 0.046+: Adam's heads made one
    mistake with near-certainty). Every process holds all features (gathered by predict), so
    under torchrun each one solves the same small convex problem; no DDP needed. Without
    mlflow_log, a silent fit (no history)."""
    head = head.cpu()
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=25, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + cfg.head_l2 / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    history = []
    for epoch in range(cfg.head_epochs):
        optimizer.step(closure)
        if mlflow_log is None:
            continue
        with torch.no_grad():
            train_logits, val_logits, val_y = head(train_x), head(val_x), torch.from_numpy(val_labels)
            row = {"train_loss": float(F.cross_entropy(train_logits, train_y)),
                   "train_accuracy": float((train_logits.argmax(1) == train_y).float().mean()),
                   "val_loss": float(F.cross_entropy(val_logits, val_y)),
                   "val_accuracy": float((val_logits.argmax(1) == val_y).float().mean())}
        history.append(row)
        mlflow_log(row, epoch)
        log(f"  L-BFGS step {epoch + 1:3d}/{cfg.head_epochs}  train loss {row['train_loss']:.4f} acc "
            f"{row['train_accuracy']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}")
    return history


# ---------------------------------------------------------------- the "other" decision
@dataclasses.dataclass
class NonPets:
    """Photos that are neither cats nor dogs: {split: [(path, kind)]}, the not-pets folder's
    parts (catdog.not_pet_photos) and generated ones (catdog.synthetic_non_pets)."""
    parts: dict

    def items(self, split):
        """As (path, 0) items for Images; the label is unused."""
        return [(path, 0) for path, _ in self.parts[split]]

    def kinds(self, split):
        return np.array([kind for _, kind in self.parts[split]])


def non_pets(cfg, folder):
    """NonPets of cfg.not_pets plus cfg.synthetic generated images for training and half as
    many for val and for test (written to `folder`), each part from its own seed."""
    parts = catdog.not_pet_photos(cfg.not_pets, cfg.seed) if cfg.not_pets else {s: [] for s, _ in catdog.NOT_PETS_SPLIT}
    for offset, (split, count) in enumerate((("train", cfg.synthetic), ("val", cfg.synthetic // 2),
                                             ("test", cfg.synthetic // 2))):
        for i, (img, kind) in enumerate(catdog.synthetic_non_pets(count, [cfg.seed, offset])):
            path = os.path.join(folder, f"{split}-{i:04d}-{kind}.png")
            img.save(path)
            parts[split].append((path, f"synthetic {kind}"))
    if not parts["train"]:
        raise NoData(f"no photos that are neither cats nor dogs in {cfg.not_pets!r} and --synthetic 0: "
                     "the \"other\" decision has nothing to learn from")
    return NonPets(parts)


def fit_binary(x, y, l2, weight=None):
    """L2-regularised logistic regression of y (1 = pet) on the rows of x, full-batch L-BFGS,
    the two classes weighted equally: (weight vector, bias)."""
    y = torch.as_tensor(y, dtype=torch.float32)
    positive = float(y.mean())
    sample_weight = torch.where(y > 0, 0.5 / positive, 0.5 / (1 - positive))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x @ w + b, y, weight=sample_weight)
                + l2 / 2 * w.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def fit_whitening(pets, components):
    """(mean, whitening matrix) of the pets' features: their top principal components, each
    scaled to unit variance, so PetDecision.distance is about 1 for a typical pet."""
    mean = pets.mean(0)
    _, singular, vectors = torch.linalg.svd(pets - mean, full_matrices=False)
    k = min(components, len(singular))
    variance = singular[:k] ** 2 / max(1, len(pets) - 1)
    # Shrunk towards the largest variance: a near-empty direction (few pets) is not blown up into noise.
    whiten = vectors[:k].T / (variance + 1e-3 * variance[0] + 1e-12).sqrt()
    return mean, torch.nn.functional.pad(whiten, (0, components - k))


def fit_score(decision, name, x, y, cfg):
    """Fit candidate `name` of the PetDecision on features x (y: 1 = pet), in place."""
    decision.score_name = name
    if name == "distance":
        with torch.no_grad():
            decision.mean[:], decision.whiten[:] = fit_whitening(x[y == 1], decision.whiten.shape[1])
    elif name != "imagenet":
        with torch.no_grad():
            extra = decision.imagenet_log_odds(x) if name == "head+imagenet" else torch.zeros(len(x))
        weight, bias = fit_binary(torch.cat([x, extra[:, None]], 1), y, cfg.pet_l2)
        with torch.no_grad():
            decision.head.weight[0], decision.head.bias[0] = weight, bias


def out_of_fold_scores(decision, name, x, y, cfg, folds=5):
    """Raw score of every row from candidate `name` fitted without it."""
    scores = torch.zeros(len(x))
    for held in np.array_split(np.random.default_rng(cfg.seed).permutation(len(x)), folds):
        kept, held = torch.from_numpy(np.setdiff1d(np.arange(len(x)), held)), torch.from_numpy(held)
        fit_score(decision, name, x[kept], y[kept], cfg)
        with torch.no_grad():
            scores[held] = decision.score(x[held])
    return scores


def fit_platt(scores, y):
    """(scale, shift) so sigmoid(scale * score + shift) is a calibrated pet probability, the
    two classes weighted equally (a 50/50 prior: the not-pets' share in uploads is unknown)."""
    weight, bias = fit_binary(scores[:, None], y, l2=0.0)
    return float(weight[0]), float(bias[0])


def pet_threshold(pet_probs):
    """The pet probability below which catdog.PETS_REJECTED of these (held-out) pets fall, and
    never above 0.5: the probabilities are calibrated, so a photo more likely a pet than not
    stays a pet. With few pets the quantile is their very least score, which a new pet falls
    under as often as not."""
    return min(0.5, float(np.quantile(np.asarray(pet_probs, dtype=np.float64), catdog.PETS_REJECTED)))


def other_rates(pet_probs_of_pets, pet_probs_of_others, kinds, threshold):
    """{pets_as_other, other_as_pet, by_kind: {kind: {photos, as_pet}}} at `threshold`."""
    accepted = np.asarray(pet_probs_of_others) >= threshold
    by_kind = {str(kind): {"photos": int(np.sum(kinds == kind)), "as_pet": float(np.mean(accepted[kinds == kind]))}
               for kind in sorted(set(kinds))}
    return {"pets_as_other": float(np.mean(np.asarray(pet_probs_of_pets) < threshold)),
            "other_as_pet": float(np.mean(accepted)) if len(accepted) else 0.0, "by_kind": by_kind}


def worst_target_ratio(rates):
    """How far a candidate is from the targets: the larger of its two rates over their bar."""
    return max(rates["pets_as_other"] / catdog.GATE["max_pets_as_other"],
               rates["other_as_pet"] / catdog.GATE["max_other_as_pet"])


def decide_other(decision, pets, others, val_kinds, cfg):
    """Choose and fit the PetDecision in place. pets / others: {"train", "val": pooled
    features}. Each candidate is fitted on train and measured on val with the calibration and
    threshold of its out-of-fold training scores; the one furthest inside the targets
    (worst_target_ratio) is refitted on train. Returns (threshold, {candidate: val rates})."""
    x = torch.cat([pets["train"], others["train"]])
    y = torch.cat([torch.ones(len(pets["train"])), torch.zeros(len(others["train"]))])
    candidates = {}
    for name in [n for n in nets.PET_SCORES if decision.imagenet is not None or "imagenet" not in n]:
        held_out = out_of_fold_scores(decision, name, x, y, cfg)
        platt = fit_platt(held_out, y)
        threshold = pet_threshold(torch.sigmoid(held_out[y == 1] * platt[0] + platt[1]))
        fit_score(decision, name, x, y, cfg)
        with torch.no_grad():
            decision.platt[:] = torch.tensor(platt)
            val_pets, val_others = (torch.sigmoid(decision(pets["val"])[0]), torch.sigmoid(decision(others["val"])[0]))
        candidates[name] = {**other_rates(val_pets, val_others, val_kinds, threshold), "threshold": threshold,
                            "platt": platt}
        log(f"  \"other\" candidate {name:13s}: val pets answered other {candidates[name]['pets_as_other']:.4f}, "
            f"non-pets answered cat/dog {candidates[name]['other_as_pet']:.4f} (threshold {threshold:.4f})")
    chosen = min(candidates, key=lambda n: worst_target_ratio(candidates[n]))
    fit_score(decision, chosen, x, y, cfg)
    with torch.no_grad():
        decision.platt[:] = torch.tensor(candidates[chosen]["platt"])
        decision.mean[:], decision.whiten[:] = fit_whitening(pets["train"], decision.whiten.shape[1])  # drift's
    log(f"  \"other\" decision: {chosen}, answered when the pet probability is below "
        f"{candidates[chosen]['threshold']:.4f}")
    return candidates[chosen]["threshold"], candidates


# ---------------------------------------------------------------- metrics (numpy)
def evaluate(probs, labels, bins=15):
    """Accuracy, precision/recall/F1 (dog = positive), ROC-AUC, log-loss and ECE."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    predicted = probs.argmax(1)
    dog = catdog.class_scores(labels, predicted)["dog"]
    return {"accuracy": float(np.mean(predicted == labels)), "precision": dog["precision"],
            "recall": dog["recall"], "f1": dog["f1"],
            "roc_auc": roc_auc(probs[:, 1], labels),
            "log_loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1)))),
            "ece": expected_calibration_error(probs, labels, bins)}


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


def classification_report(probs, labels):
    predicted = probs.argmax(1)
    lines = [f"{'':>10} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>10}"]
    for name, score in catdog.class_scores(labels, predicted).items():
        lines.append(f"{name:>10} {score['precision']:10.4f} {score['recall']:10.4f} {score['f1']:10.4f} "
                     f"{score['support']:10d}")
    lines.append(f"{'accuracy':>10} {'':>10} {'':>10} {np.mean(predicted == labels):10.4f} {len(labels):10d}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots (matplotlib, Agg)
def plots(folder, history, probs, labels, items, title):
    """The report figures of one model's served file on the evaluation set, as PNGs in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    confusion_matrix_plot(folder, probs, labels, title)
    curves_plot(folder, history, title)
    roc_plot(folder, probs, labels, title)
    reliability_plot(folder, probs, labels, title)
    worst_mistakes_plot(folder, probs, labels, items, title)


def confusion_matrix_plot(folder, probs, labels, title):
    import matplotlib.pyplot as plt

    predicted = probs.argmax(1)
    fig, ax = plt.subplots(figsize=(4, 4))
    matrix = np.array([[np.sum((labels == t) & (predicted == p)) for p in range(2)] for t in range(2)])
    ax.imshow(matrix, cmap="Blues")
    for t in range(2):
        for p in range(2):
            ax.text(p, t, matrix[t, p], ha="center", va="center", color="red")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=catdog.CLASSES, yticklabels=catdog.CLASSES,
           xlabel="predicted", ylabel="true", title=f"{title}: confusion matrix")
    save(fig, folder, "confusion_matrix.png")


def curves_plot(folder, history, title):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = np.arange(1, len(history) + 1)
    for key, ax in (("loss", left), ("accuracy", right)):
        for split in ("train", "val"):
            ax.plot(steps, [row[f"{split}_{key}"] for row in history], marker=".", label=split)
        ax.set(xlabel="epoch", ylabel=key, title=f"{title}: {key}")
        ax.legend()
    save(fig, folder, "curves.png")


def roc_plot(folder, probs, labels, title):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    fpr, tpr = roc_points(probs[:, 1], labels)
    ax.plot(fpr, tpr, label=f"AUC {roc_auc(probs[:, 1], labels):.4f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC (dog positive)")
    ax.legend(loc="lower right")
    save(fig, folder, "roc_curve.png")


def reliability_plot(folder, probs, labels, title):
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

    kinds = list(other["by_kind"])
    rows = [("pets answered other", other["pets_as_other"], None)] + [
        (f"{kind} ({v['photos']})", v["as_pet"], v["photos"]) for kind, v in other["by_kind"].items()]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1],
            color=["tab:red" if r[2] is None else "tab:blue" for r in rows][::-1])
    ax.axvline(catdog.GATE["max_other_as_pet_per_kind"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("share answered wrongly (non-pets: cat or dog; pets: other)")
    ax.set_title(f"{title}: \"other\" on photos it never saw ({len(kinds)} kinds)")
    save(fig, folder, "other_by_kind.png")


def save(fig, folder, name):
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------- the evaluation set
@dataclasses.dataclass
class Evaluation:
    """The photos every candidate is measured, reported and gated on: the test split, then the
    extra photos (300 photos alone give an accuracy +-0.9 points wide; 2,300 tell 99.0 from 99.5 %)."""
    items: list          # [(path, class index)], the test split first
    parts: np.ndarray    # "test" or "extra", per item
    hashes: list         # sha256 of each photo's file

    @property
    def labels(self):
        return labels_of(self.items)

    @property
    def test_items(self):
        return [item for item, part in zip(self.items, self.parts) if part == "test"]

    def identity(self):
        """sha256 over (part, file name, label, file sha256): two runs share per-photo answers
        only when this matches."""
        import hashlib

        digest = hashlib.sha256()
        for (path, label), part, sha in zip(self.items, self.parts, self.hashes):
            digest.update(f"{part}\t{os.path.basename(path)}\t{label}\t{sha}\n".encode())
        return digest.hexdigest()


def original_photos(items, data_dir):
    """`items` with each processed copy replaced by the original photo the manifest names,
    where it is on this machine: the service sees originals, of any size, not 224 px copies."""
    manifest = manifest_path(data_dir)
    originals = {row["path"]: row["photo"] for row in catdog.read_manifest(manifest)} if manifest else {}
    return [(originals.get(os.path.normpath(os.path.abspath(path))) or path, label) for path, label in items]


def evaluation_set(test_items, extra_folder, data_dir):
    """The test split, then the photos of extra_folder that decode and are none of the
    manifest's photos (an extra set that overlaps training would flatter the model)."""
    extra = extra_photos(extra_folder, data_dir) if extra_folder and os.path.isdir(extra_folder) else []
    if not extra and extra_folder:
        log(f"no usable extra evaluation photos at {extra_folder}: candidates are measured on the test split only")
    return Evaluation(test_items + [(path, label) for path, label, _ in extra],
                      np.array(["test"] * len(test_items) + ["extra"] * len(extra)),
                      [catdog.sha256_file(path) for path, _ in test_items] + [sha for _, _, sha in extra])


def extra_photos(folder, data_dir):
    """[(path, class index, sha256)] of the usable extra photos; what was left out is logged."""
    manifest = manifest_path(data_dir)
    known = {row["sha256"] for row in catdog.read_manifest(manifest, keep_dropped=True)} if manifest else set()
    kept, dropped = [], {"known to the manifest": 0, "not decodable": 0}
    for path, label in catdog.labelled_photos([folder]):
        sha = catdog.sha256_file(path)
        if sha in known:
            dropped["known to the manifest"] += 1
            continue
        try:
            catdog.open_image(path)
        except catdog.ImageError:
            dropped["not decodable"] += 1
            continue
        kept.append((path, catdog.CLASSES.index(label), sha))
    if any(dropped.values()):
        log(f"extra evaluation photos in {folder}: left out " + ", ".join(f"{n} {why}" for why, n in dropped.items()))
    return kept


def measure(probs, evaluation):
    """Figures of one set of answers: {"test": ..., "extra": ..., "eval": ...} (each of
    `evaluate`), eval covering both with its accuracy's 95 % Wilson interval."""
    labels, figures = evaluation.labels, {}
    for part in ("test", "extra"):
        if np.any(evaluation.parts == part):
            figures[part] = evaluate(probs[evaluation.parts == part], labels[evaluation.parts == part])
    figures["eval"] = evaluate(probs, labels)
    right = int(np.sum(probs.argmax(1) == labels))
    low, high = catdog.wilson_interval(right, len(labels))
    figures["eval"].update(accuracy_low=low, accuracy_high=high, images=len(labels), errors=len(labels) - right)
    return figures


def flat_figures(figures):
    """The test figures under their own names (as every earlier run logged them), the others
    prefixed: accuracy, ..., extra_accuracy, ..., eval_accuracy, eval_accuracy_low, ..."""
    return {f"{part}_{k}" if part != "test" else k: v for part, scores in figures.items() for k, v in scores.items()}


def write_evaluation_csv(path, evaluation, probs):
    """Every photo's answer, so a later candidate is compared with this one photo by photo."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["photo", "part", "label", "p_dog"])
        for (photo, label), part, p in zip(evaluation.items, evaluation.parts, probs[:, 1]):
            writer.writerow([os.path.basename(photo), part, catdog.CLASSES[label], f"{p:.8f}"])


def read_evaluation_csv(path):
    import csv

    with open(path, newline="") as f:
        p_dog = np.array([float(row["p_dog"]) for row in csv.DictReader(f)])
    return np.stack([1 - p_dog, p_dog], axis=1)


# ---------------------------------------------------------------- lineage
def lineage_of(data_dir, test_items, evaluation):
    """Where a model comes from, as MLflow tags (strings, "None" when unknown): the code's
    commit, the data's DVC md5, dvc.lock and manifest, the identity of the test split and of the
    evaluation set."""
    found = {"git_commit": git_commit(), "dvc_md5": dvc_hash(data_dir), "dvc_lock_sha256": dvc_lock_sha256(),
             "manifest_sha256": manifest_sha256(data_dir),
             "test_split_sha256": split_hash(test_items, data_dir), "eval_set_sha256": evaluation.identity()}
    return {k: str(v) for k, v in found.items()}


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


DVC_LOCK = os.path.join(catdog.ROOT, "dvc.lock")


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


def manifest_path(data_dir):
    """The manifest preprocess.py writes beside (or inside) the processed data, if any."""
    parent = os.path.dirname(os.path.abspath(data_dir))
    for path in (os.path.join(parent, "manifest.csv"), os.path.join(data_dir, "manifest.csv")):
        if os.path.isfile(path):
            return path
    return None


def manifest_sha256(data_dir):
    path = manifest_path(data_dir)
    return catdog.sha256_file(path) if path else None


def split_hash(items, root):
    """Identity of a split: sha256 over (relative path, file sha256). Two runs compare test
    accuracy directly only when this matches."""
    import hashlib

    digest = hashlib.sha256()
    for path, label in items:
        digest.update(f"{os.path.relpath(path, root)}\t{label}\t{catdog.sha256_file(path)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- gate
def gate(metrics, champion=None, thresholds=catdog.GATE):
    """(promote?, reasons it may not), on the evaluation set (metrics["eval_*"]).

    Absolute thresholds first. Then the champion, judged on the same photos: refused when
    it is significantly less accurate (one-sided exact McNemar test on the photos only one of
    the two got right, p < thresholds["significance"]); when neither is significantly more
    accurate, the lower log-loss wins. So one photo more or less decides nothing by itself:
    a better-calibrated model with one more mistake goes through, a worse-calibrated one with
    one fewer does not."""
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
        worse_p = catdog.mcnemar_p(only_champion, only_candidate)
        better_p = catdog.mcnemar_p(only_candidate, only_champion)
        if worse_p < thresholds["significance"]:
            reasons.append(f"less accurate than the champion: {only_champion} photos only the champion got right, "
                           f"{only_candidate} only this one (McNemar p = {worse_p:.3f})")
        elif better_p >= thresholds["significance"] and metrics["eval_log_loss"] > champion["log_loss"]:
            reasons.append(f"as accurate as the champion within noise ({only_candidate} vs {only_champion} photos "
                           f"only one got right) and log-loss {metrics['eval_log_loss']:.4f} > champion's "
                           f"{champion['log_loss']:.4f}")
    return not reasons, reasons


def other_gate(metrics, thresholds):
    """Reasons the "other" decision misses its targets (metrics of flat_other)."""
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


def champion_answers(run, run_id, evaluation, eval_hash, download):
    """(The champion's probabilities on the evaluation set, how they were had): from its run's
    evaluation.csv when it was measured on the same photos, else (or when that file cannot be
    had) by running its served file on them here."""
    import mlflow

    if run.data.tags.get("eval_set_sha256") == eval_hash:
        try:
            return read_evaluation_csv(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="reports/evaluation.csv", dst_path=download)), "on the same photos"
        except (OSError, mlflow.exceptions.MlflowException, ValueError) as e:
            log(f"  the champion's answers cannot be read ({e}); measuring its served file instead")
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=download)
    meta = catdog.read_json(os.path.join(folder, "model.json"))
    probs = onnx_probs(os.path.join(folder, "model.onnx"), Images(evaluation.items, meta["preprocess"]))
    return probs, "re-measured on these photos"


def compare_with_champion(client, cfg, evaluation, eval_hash, probs):
    """(How the current champion does against `probs` on the evaluation set, or None when there
    is no champion; what it was compared as). Its answers come from its own run when it was
    measured on the same photos, else its served file is run on them here."""
    import mlflow

    try:
        version = client.get_model_version_by_alias(cfg.registered_name, "champion")
    except mlflow.exceptions.MlflowException:
        return None, "no champion yet"
    run = client.get_run(version.run_id)
    label = f"champion v{version.version} ({run.data.tags.get('arch')})"
    try:
        with tempfile.TemporaryDirectory(prefix="catdog-champion-") as download:
            champion_probs, how = champion_answers(run, version.run_id, evaluation, eval_hash, download)
    except Exception as e:  # noqa: BLE001 -- an unreadable champion cannot block a measured candidate
        log(f"  {label} cannot be loaded ({e}); gating on thresholds only")
        return None, f"{label} unreadable"
    labels = evaluation.labels
    champion_right, candidate_right = champion_probs.argmax(1) == labels, probs.argmax(1) == labels
    figures = evaluate(champion_probs, labels)
    log(f"  {label} {how}: accuracy {figures['accuracy']:.4f}, log-loss {figures['log_loss']:.4f}")
    return {"accuracy": figures["accuracy"], "log_loss": figures["log_loss"],
            "only_champion_right": int(np.sum(champion_right & ~candidate_right)),
            "only_candidate_right": int(np.sum(candidate_right & ~champion_right))}, f"{label}, {how}"


# ---------------------------------------------------------------- export
def onnx_outputs(onnx_path, dataset, batch_size=64):
    """{probs: cat/dog probabilities, pet: pet probability, distance: pet_distance} of every
    item from an ONNX file in ONNX Runtime, as the service computes them."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    runs = [session.run(list(catdog.ONNX_OUTPUTS), {"image": x.numpy()}) for x, _ in DataLoader(dataset, batch_size=batch_size)]
    logits, pet_logits, distances = (np.concatenate([run[i] for run in runs]) if runs else np.zeros(0) for i in range(3))
    return {"probs": catdog.softmax(logits) if len(logits) else np.zeros((0, 2)),
            "pet": 1 / (1 + np.exp(-pet_logits)), "distance": distances}


def onnx_probs(onnx_path, dataset, batch_size=64):
    """Cat/dog probabilities of every item from an ONNX file."""
    return onnx_outputs(onnx_path, dataset, batch_size)["probs"]


def pet_parity(model, path, dataset, count=64):
    """max |difference| of the pet probability, and of pet_distance relative to 1 + itself,
    ONNX file vs PyTorch, on the first `count` items."""
    subset = Subset(dataset, range(min(count, len(dataset))))
    onnx = onnx_outputs(path, subset)
    x = torch.stack([x for x, _ in subset])
    with torch.no_grad():
        _, pet_logit, distance = model.outputs(x)
    return max(float(np.abs(onnx["pet"] - torch.sigmoid(pet_logit).numpy()).max()),
               float((np.abs(onnx["distance"] - distance.numpy()) / (1 + distance.numpy())).max()))


def calibration_batches(items, settings, count, batch_size=16):
    """Up to `count` training images, evenly spaced (so both classes), preprocessed as for
    evaluation: the inputs whose activation ranges int8 quantization must cover."""
    subset = Images(items[::max(1, len(items) // count)][:count], settings)
    return (x.numpy() for x, _ in DataLoader(subset, batch_size=batch_size))


def export_served_model(model, meta, path, test_set, torch_test_probs, train_items, cfg):
    """Write the ONNX file the service will run: fp32 export checked against PyTorch
    (ExportMismatch when they disagree), then (cfg.quantize) int8. Returns the fp32 parity,
    max |p_onnx - p_torch| on test."""
    nets.export_onnx(model, meta, path)
    parity = max(float(np.abs(onnx_probs(path, test_set) - torch_test_probs).max()), pet_parity(model, path, test_set))
    log(f"  ONNX fp32 parity over {len(test_set)} test images: max |p_onnx - p_torch| = {parity:.2e}")
    if not parity <= 1e-4:
        raise ExportMismatch(f"ONNX export of {meta['arch']} disagrees with PyTorch by {parity:.2e} (> 1e-4)")
    if cfg.quantize:
        started = time.time()
        catdog.quantize_onnx(path, calibration_batches(train_items, meta["preprocess"], cfg.calibration_images))
        log(f"  quantized to int8 in {time.time() - started:.1f}s ({cfg.calibration_images} calibration images)")
    return parity


def write_champion(folder, out):
    """Copy a promoted model's files into `out`, each replaced atomically."""
    os.makedirs(out, exist_ok=True)
    for name in ("model.pt", *catdog.SERVED_FILES):
        shutil.copyfile(os.path.join(folder, name), os.path.join(out, name + ".tmp"))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def training_image_stats(items, data_dir, limit=3000):
    """catdog.image_stats of the training photos (up to `limit`, evenly spaced) for the drift
    profile. The service sees original uploads of any size, so each photo is the original
    the manifest names when it is here, else the processed copy (always 224x224); without a
    manifest, the processed `items`."""
    manifest = manifest_path(data_dir)
    rows = catdog.read_manifest(manifest, split="train") if manifest else []
    paths = [row["photo"] for row in rows if row["photo"]] or [path for path, _ in items]
    step = max(1, len(paths) // limit)
    return [catdog.image_stats(catdog.open_image(path)) for path in paths[::step]]


# ---------------------------------------------------------------- one model, end to end
@dataclasses.dataclass
class Trained:
    """A model straight out of training."""
    which: str           # baseline or transfer
    model: torch.nn.Module
    history: list        # per epoch: train/val loss and accuracy
    seconds: float       # training time
    calibration: tuple | None  # (held-out logits, labels) to fit the temperature on; None: val
    pet_threshold: float  # answered "other" below this pet probability
    other_candidates: dict  # {pet decision candidate: its val rates}

@dataclasses.dataclass
class Calibrated:
    """How PyTorch does on test once the temperature is folded into the head."""
    temperature: float
    test_probs: np.ndarray
    test_metrics: dict


@dataclasses.dataclass
class Served:
    """The served file as measured on the evaluation set: what is reported and gated."""
    figures: dict        # measure(): test, extra and eval (both) figures
    checks: dict         # MLflow metrics comparing it with PyTorch, and its calibration on val
    val_probs: np.ndarray
    eval_probs: np.ndarray
    val_distances: np.ndarray  # pet_distance of the val photos, for the drift profile
    other: dict          # other_rates on the evaluation set's pets and the test non-pets


def run_one(which, cfg, splits, others, evaluation, lineage, train_stats, client):
    """Train, calibrate, export and measure, log, register and gate one model; its summary.
    Under torchrun every process trains and calibrates (they share that work) and only rank 0
    goes on (the others return None), in an MLflow run that mlflow's ActiveRun.__exit__ marks
    FAILED when a step raises, with a temporary folder that is removed either way."""
    import mlflow

    log(f"\n== {which}")
    if RANK != 0:
        calibrate(train_model(which, cfg, splits, others, mlflow_log=lambda row, step: None), splits, evaluation, cfg)
        return None
    with (mlflow.start_run(run_name=which) as run,
          tempfile.TemporaryDirectory(prefix=f"catdog-{which}-") as folder):
        trained = train_model(which, cfg, splits, others,
                              mlflow_log=lambda row, step: mlflow.log_metrics(row, step=step))
        calibrated = calibrate(trained, splits, evaluation, cfg)
        meta = catdog.model_meta(which, temperature=calibrated.temperature, run_id=run.info.run_id, backbone=cfg.backbone,
                                 served_as="int8 ONNX" if cfg.quantize else "fp32 ONNX",
                                 data={k: lineage[k] for k in ("test_split_sha256", "eval_set_sha256", "dvc_md5",
                                                                "dvc_lock_sha256", "manifest_sha256")},
                                 git_commit=lineage["git_commit"],
                                 other={"label": catdog.OTHER, "score": trained.model.pet.score_name,
                                        "threshold": trained.pet_threshold})
        served = export_and_measure(trained.model, meta, folder, splits, others, evaluation, calibrated, cfg)
        meta["other"].update(served.other)
        meta["metrics"] = {**flat_figures(served.figures), **flat_other(served.other), "train_seconds": trained.seconds,
                           "extra_images": int(np.sum(evaluation.parts == "extra")),
                           "parameters": sum(p.numel() for p in trained.model.parameters()),
                           "temperature": calibrated.temperature, "served_as": meta["served_as"],
                       "pet_decision": trained.model.pet.score_name, "pet_threshold": trained.pet_threshold}
        logged = log_run(folder, trained, meta, calibrated, served, cfg, splits, evaluation, lineage, train_stats,
                         others)
        promoted, version = register_and_gate(client, cfg, run, trained, meta, folder, evaluation, served,
                                              lineage["eval_set_sha256"], logged)
        return {**meta["metrics"], "promoted": promoted, "version": version}


def train_model(which, cfg, splits, others, mlflow_log):
    """Train the cat/dog model, then its "other" decision on the same pooled features."""
    started = time.time()
    train = train_baseline if which == "baseline" else train_transfer
    model, history, calibration, pets = train(cfg, splits, mlflow_log)
    settings = catdog.preprocess_settings(which, cfg.backbone)

    def pooled(items):
        return predict(model.features, Images(items, settings), cfg.extract_batch_size)

    pets = pets or {split: pooled(splits[split]) for split in ("train", "val")}
    threshold, candidates = decide_other(model.pet, pets, {split: pooled(others.items(split)) for split in ("train", "val")},
                                         others.kinds("val"), cfg)
    return Trained(which, model, history, time.time() - started, calibration, threshold, candidates)


def calibrate(trained, splits, evaluation, cfg):
    """Temperature scaling on the held-out logits training kept (else on val), folded into the
    head; then PyTorch's view of test. Every process takes part (predict shares the images out)."""
    model, settings = trained.model, catdog.preprocess_settings(trained.which, cfg.backbone)
    logits, labels = trained.calibration or (predict(model, Images(splits["val"], settings), 64),
                                             labels_of(splits["val"]))
    temperature = fit_temperature(logits, labels)
    nets.fold_temperature(model, temperature)
    test_items = evaluation.test_items
    test_probs = catdog.softmax(predict(model, Images(test_items, settings), 64).numpy())
    test_metrics = evaluate(test_probs, labels_of(test_items))
    log(f"  temperature {temperature:.3f}; PyTorch test {format_metrics(test_metrics)}")
    return Calibrated(temperature, test_probs, test_metrics)


def export_and_measure(model, meta, folder, splits, others, evaluation, calibrated, cfg):
    """Write the served file, folder/model.onnx, and measure it on val, on the evaluation
    set and on the test non-pets: the service runs this file, so it is what is reported and gated."""
    test_set = Images(evaluation.test_items, meta["preprocess"])
    onnx_path = os.path.join(folder, "model.onnx")
    parity = export_served_model(model, meta, onnx_path, test_set, calibrated.test_probs,
                                 splits["train"] + others.items("train"), cfg)
    started = time.time()
    val = onnx_outputs(onnx_path, Images(splits["val"], meta["preprocess"]))
    on_eval = onnx_outputs(onnx_path, Images(evaluation.items, meta["preprocess"]))
    on_others = onnx_outputs(onnx_path, Images(others.items("test"), meta["preprocess"]))
    val_probs, eval_probs = val["probs"], on_eval["probs"]
    other = other_rates(on_eval["pet"], on_others["pet"], others.kinds("test"), meta["other"]["threshold"])
    log(f"  \"other\": {other['pets_as_other']:.4f} of {len(eval_probs)} pets answered other, "
        f"{other['other_as_pet']:.4f} of {len(on_others['pet'])} test non-pets answered cat or dog; by kind: "
        + ", ".join(f"{k} {v['as_pet']:.3f} of {v['photos']}" for k, v in other["by_kind"].items()))
    figures = measure(eval_probs, evaluation)
    test_probs = eval_probs[evaluation.parts == "test"]  # the test split comes first, in order
    agreement = float(np.mean(test_probs.argmax(1) == calibrated.test_probs.argmax(1)))
    log(f"  served model ({meta['served_as']}) on {len(evaluation.items)} photos in {time.time() - started:.0f}s: "
        f"{describe(figures['eval'])}\n  test {format_metrics(figures['test'])}"
        f"; same label as PyTorch on {agreement:.2%} of test")
    val_metrics = evaluate(val_probs, labels_of(splits["val"]))
    checks = {"onnx_max_abs_prob_diff": parity, "served_torch_label_agreement": agreement,
              "served_torch_max_abs_prob_diff": float(np.abs(test_probs - calibrated.test_probs).max()),
              **{f"val_{k}_calibrated": val_metrics[k] for k in ("accuracy", "log_loss", "ece")}}
    return Served(figures, checks, val_probs, eval_probs, val["distance"], other)


def flat_other(other):
    """other_rates as flat MLflow metrics: eval_pets_as_other, other_as_pet, other_as_pet_<kind>, other_photos_<kind>."""
    flat = {"eval_pets_as_other": other["pets_as_other"], "other_as_pet": other["other_as_pet"]}
    for kind, rates in other["by_kind"].items():
        name = kind.replace(" ", "_")
        flat.update({f"other_as_pet_{name}": rates["as_pet"], f"other_photos_{name}": rates["photos"]})
    return flat


def describe(scores):
    """One line of evaluation-set figures, interval included."""
    return (f"accuracy {scores['accuracy']:.4f} (95 % interval {scores['accuracy_low']:.4f}-"
            f"{scores['accuracy_high']:.4f}, {scores['errors']} wrong of {scores['images']}), "
            f"log-loss {scores['log_loss']:.4f}, ECE {scores['ece']:.4f}")


def format_metrics(metrics):
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def log_run(folder, trained, meta, calibrated, served, cfg, splits, evaluation, lineage, train_stats, others):
    """The active run's params, metrics and tags; the model files as artifacts model/, the
    reports as reports/."""
    import mlflow

    mlflow.log_params({**vars(cfg), "model": trained.which, "processes": WORLD,
                       "parameters": meta["metrics"]["parameters"], "temperature": round(calibrated.temperature, 6),
                       **{f"preprocess_{k}": v for k, v in meta["preprocess"].items()},
                       **{f"{split}_images": len(items) for split, items in splits.items()},
                       "eval_images": len(evaluation.items), "extra_images": int(np.sum(evaluation.parts == "extra")),
                       **{f"non_pets_{split}_images": len(items) for split, items in others.parts.items()},
                       "pet_decision": trained.model.pet.score_name, "pet_threshold": round(trained.pet_threshold, 6),
                       **{f"gate_{k}": v for k, v in catdog.GATE.items()}})
    mlflow.log_metrics({**{f"{part}_{k}": v for part, scores in served.figures.items() for k, v in scores.items()},
                        "train_seconds": trained.seconds,
                        **{f"torch_test_{k}": v for k, v in calibrated.test_metrics.items()}, **served.checks,
                        **flat_other(served.other),
                        **{f"val_{k}_{name.replace('+', '_')}": rates[k] for name, rates in trained.other_candidates.items()
                           for k in ("pets_as_other", "other_as_pet")}})
    mlflow.set_tags({**lineage, "arch": trained.which, "served_as": meta["served_as"]})
    nets.save_model(trained.model, meta, os.path.join(folder, "model.pt"))  # also rewrites model.json with the metrics
    catdog.write_json(os.path.join(folder, "reference_profile.json"),
                      catdog.reference_profile(train_stats, served.val_probs.max(1), served.val_distances))
    mlflow.log_artifacts(folder, "model")
    reports = os.path.join(folder, "reports")  # made after model/ is logged, so not part of it
    write_reports(reports, trained, meta, served, cfg, splits, evaluation, lineage)
    mlflow.log_artifacts(reports, "reports")
    return log_registry_model(folder)


def log_registry_model(folder):
    """The served files as an MLflow model (registry_model.py): what the registry releases and
    mlflow.pyfunc.load_model loads. Its requirements are the serving pins of requirements.txt."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name="catdog", python_model=os.path.join(catdog.ROOT, "registry_model.py"),
        artifacts={name: os.path.join(folder, name) for name in catdog.SERVED_FILES},
        code_paths=[os.path.join(catdog.ROOT, "catdog.py")], pip_requirements=serving_pins())


def serving_pins(names=("onnxruntime", "numpy", "pillow", "pillow-heif", "pandas")):
    """The requirements.txt lines (name==version) of what registry_model.py imports."""
    with open(os.path.join(catdog.ROOT, "requirements.txt")) as f:
        pins = dict(line.strip().split("==", 1) for line in f if "==" in line and not line.startswith("#"))
    return [f"{name}=={pins[name]}" for name in names if name in pins]


def write_reports(reports, trained, meta, served, cfg, splits, evaluation, lineage):
    """Figures, classification report, per-photo answers and model card of the served file on
    the evaluation set."""
    os.makedirs(reports)
    plots(reports, trained.history, served.eval_probs, evaluation.labels, evaluation.items, trained.which)
    other_plot(reports, served.other, trained.which)
    with open(os.path.join(reports, "classification_report.txt"), "w") as f:
        f.write(classification_report(served.eval_probs, evaluation.labels))
    write_evaluation_csv(os.path.join(reports, "evaluation.csv"), evaluation, served.eval_probs)
    with open(os.path.join(reports, "model_card.md"), "w") as f:
        f.write(model_card(trained.which, meta["metrics"], splits, lineage, cfg))


def register_and_gate(client, cfg, run, trained, meta, folder, evaluation, served, eval_hash, logged):
    """A new registry version of the run's logged MLflow model, promoted to champion (and
    written to cfg.out) when it passes the gate, else challenger; (promoted?, version)."""
    import mlflow

    version = client.create_model_version(cfg.registered_name, logged.model_uri, run_id=run.info.run_id,
                                          tags={"arch": trained.which}, model_id=logged.model_id).version
    champion, against = compare_with_champion(client, cfg, evaluation, eval_hash, served.eval_probs)
    promoted, reasons = gate(meta["metrics"], champion)
    verdict = "promoted" if promoted else "refused: " + "; ".join(reasons)
    if promoted:
        client.set_registered_model_alias(cfg.registered_name, "champion", version)
        client.set_model_version_tag(cfg.registered_name, version, "gate", verdict)
        meta.update(registered_model=cfg.registered_name, registry_version=version)
        nets.save_model(trained.model, meta, os.path.join(folder, "model.pt"))  # and model.json
        write_champion(folder, cfg.out)
        log(f"  PROMOTED: {cfg.registered_name} v{version} is the champion ({against}); written to {cfg.out}/")
    else:
        client.set_registered_model_alias(cfg.registered_name, "challenger", version)
        client.set_model_version_tag(cfg.registered_name, version, "gate", verdict)
        log(f"  NOT PROMOTED: {cfg.registered_name} v{version} stays challenger ({against}): " + "; ".join(reasons))
    mlflow.set_tag("gate", verdict)
    return promoted, version


def model_card(which, summary, splits, lineage, cfg):
    description = {"baseline": "a small CNN trained from scratch (reference model)",
                   "transfer": f"{cfg.backbone} (ImageNet weights, frozen) with a linear head"}[which]
    extra = (f"{summary['extra_images']} extra photos from {cfg.eval_extra} (same source, re-encoded, never trained on)"
             if summary["extra_images"] else "no extra photos")
    return f"""# catdog model card: {which}

**Model**: {description}; {summary['parameters']:,} parameters; temperature {summary['temperature']:.3f}
folded into the head. Served as an {summary['served_as']} model; every metric below is of that
file. Input: RGB photo, preprocessing {catdog.preprocess_settings(which, cfg.backbone)} (catdog.preprocess).

**Data**: {cfg.data}: {', '.join(f'{len(v)} {k}' for k, v in splits.items())} images (cats and dogs,
balanced). Test split sha256 {lineage['test_split_sha256']}; DVC md5 {lineage['dvc_md5']}
(dvc.lock sha256 {lineage['dvc_lock_sha256']}); manifest sha256 {lineage['manifest_sha256']}; code {lineage['git_commit']}.

**Evaluation** ({summary['eval_images']:.0f} photos: the test split and {extra}; evaluation set
sha256 {lineage['eval_set_sha256']}): accuracy {summary['eval_accuracy']:.4f}, 95 % interval
{summary['eval_accuracy_low']:.4f}-{summary['eval_accuracy_high']:.4f} ({summary['eval_errors']:.0f} wrong),
log-loss {summary['eval_log_loss']:.4f}, ECE {summary['eval_ece']:.4f}, ROC-AUC {summary['eval_roc_auc']:.4f}.

**Test split alone**: accuracy {summary['accuracy']:.4f}, precision {summary['precision']:.4f},
recall {summary['recall']:.4f}, F1 {summary['f1']:.4f}, ROC-AUC {summary['roc_auc']:.4f},
log-loss {summary['log_loss']:.4f}, ECE {summary['ece']:.4f}. Training took {summary['train_seconds']:.0f} s.

**"other"** (neither a cat nor a dog): answered when the pet probability (decision
"{summary['pet_decision']}", one of {', '.join(nets.PET_SCORES)}, chosen on val) is below
{summary['pet_threshold']:.4f}, the threshold under which {catdog.PETS_REJECTED:.1%} of the training pets
fall. On photos it never saw: pets answered "other" {summary['eval_pets_as_other']:.4f} of the
evaluation set; non-pets answered cat or dog {summary['other_as_pet']:.4f} of the not-pets test part and
generated blanks, noise, documents and screenshots (per kind in reports/other_by_kind.png).

**Intended use**: telling whether a photo shows a cat or a dog, for a pet-adoption workflow
with a human in the loop.

**Limits**: "other" was learnt from the photos in {cfg.not_pets or '(none)'} and generated images;
a kind of photo unlike all of them may still get "cat" or "dog", and a photo with both a cat and a
dog gets one of the two. Evaluation photos come from the
same Kaggle source as training; expect lower accuracy on photos from other cameras and
sources, which the service's drift monitor watches for.
"""


# ---------------------------------------------------------------- main
def main(argv=None):
    """Train, gate and maybe promote the models --arch names; {arch: summary} (None on ranks
    other than 0). Only here does a TrainError become an exit with its message."""
    cfg = catdog.config_parser(globals(), choices={"arch": ARCHS, "backbone": tuple(catdog.BACKBONES)}).parse_args(argv)
    try:
        return train_and_gate(cfg)
    except TrainError as e:
        raise SystemExit(str(e)) from None


def train_and_gate(cfg):
    setup_processes(cfg)
    splits = load_splits(cfg.data)
    log(f"data {cfg.data}: " + ", ".join(f"{len(v)} {k}" for k, v in splits.items())
        + f"; {WORLD} process(es), {torch.get_num_threads()} threads each, device {DEVICE}")
    evaluation = evaluation_set(original_photos(splits["test"], cfg.data), cfg.eval_extra, cfg.data)
    client, lineage, train_stats = None, {}, []
    if RANK == 0:
        client = open_registry(cfg)
        lineage = lineage_of(cfg.data, splits["test"], evaluation)
        train_stats = training_image_stats(splits["train"], cfg.data)
    with tempfile.TemporaryDirectory(prefix="catdog-synthetic-") as synthetic_folder:
        others = non_pets(cfg, synthetic_folder)
        log("non-pets: " + ", ".join(f"{len(v)} {k}" for k, v in others.parts.items()))
        results = {which: run_one(which, cfg, splits, others, evaluation, lineage, train_stats, client)
                   for which in (["baseline", "transfer"] if cfg.arch == "both" else [cfg.arch])}
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()
    if RANK == 0:
        print_table(results)
    return results


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


def print_table(results):
    rows = [("eval photos", "eval_images", "{:.0f}"), ("eval accuracy", "eval_accuracy", "{:.4f}"),
            ("  95 % interval", None, None), ("eval log-loss", "eval_log_loss", "{:.4f}"),
            ("eval ECE", "eval_ece", "{:.4f}"), ("pets -> other", "eval_pets_as_other", "{:.4f}"),
            ("non-pets -> pet", "other_as_pet", "{:.4f}"), ("test accuracy", "accuracy", "{:.4f}"),
            ("test log-loss", "log_loss", "{:.4f}"), ("train time (s)", "train_seconds", "{:.0f}"),
            ("parameters", "parameters", "{:,}"), ("served as", "served_as", "{}"),
            ("registry version", "version", "{}"), ("promoted", "promoted", "{}")]
    names = list(results)
    print("\n" + f"{'':18}" + "".join(f"{n:>16}" for n in names))
    for label, key, fmt in rows:
        cells = [f"{r['eval_accuracy_low']:.4f}-{r['eval_accuracy_high']:.4f}" if key is None else fmt.format(r[key])
                 for r in results.values()]
        print(f"{label:18}" + "".join(f"{c:>16}" for c in cells))
    print(f"\nGate thresholds (on the evaluation set): {catdog.GATE}")


if __name__ == "__main__":
    main(sys.argv[1:])
