"""The third answer, "other" (neither a cat nor a dog): the photos it is learnt from and the
decision itself.

The photos: the not-pets folder's train and val parts (evaluate.not_pet_photos) and generated
non-pets (blank frames, noise, gradients, documents, screenshots: what staff upload by
mistake). The decision: nets.PetDecision on the cat/dog model's pooled features, one of
nets.PET_SCORES, each candidate fitted on train and measured on val (decide_other), its score
made a calibrated pet probability (Platt scaling) and thresholded so that catdog.PETS_REJECTED
of the training pets fall below.
"""
import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import catdog
import evaluate
import nets

SYNTHETIC_KINDS = ("solid", "noise", "gradient", "document", "screenshot")
GENERATED = "synthetic "  # the kind of a generated non-pet: "synthetic noise", ...


# ---------------------------------------------------------------- the photos
@dataclasses.dataclass
class NonPets:
    """Photos that are neither cats nor dogs: {split: [(path, kind)]}, the not-pets folder's
    parts (evaluate.not_pet_photos) and generated ones (synthetic_non_pets)."""
    parts: dict
    folder: str = ""  # the not-pets folder; "": generated images alone (--synthetic-only)

    def items(self, split):
        """As (path, 0) items for train.Images; the label is unused."""
        return [(path, 0) for path, _ in self.parts[split]]

    def kinds(self, split):
        return np.array([kind for _, kind in self.parts[split]])

    def described(self):
        """Which data "other" is learnt (train, val) and measured (test) on, in one line: the
        MLflow tag other_trained_on and the model card say it."""
        def counts(generated):
            return "/".join(str(sum(kind.startswith(GENERATED) == generated for _, kind in self.parts[split]))
                            for split, _ in evaluate.NOT_PETS_SPLIT)

        photos = [kind for part in self.parts.values() for _, kind in part if not kind.startswith(GENERATED)]
        source = (f"not-pets folder {self.folder} ({len(photos)} photos, {len(set(photos))} kinds)" if self.folder
                  else "no not-pets photos (--synthetic-only)")
        return f"{source} + generated images; train/val/test: {counts(False)} photos + {counts(True)} generated"


def missing_photos(cfg):
    """Why "other" cannot be learnt as asked, or None: without --synthetic-only, the not-pets
    folder (--not-pets) must hold photos, one subfolder per kind. Generated images alone would
    teach it blanks and screenshots, never a bird or a sofa."""
    if cfg.synthetic_only:
        return None
    if not cfg.not_pets:
        problem = "no not-pets folder is given (--not-pets \"\")"
    elif not os.path.isdir(cfg.not_pets):
        problem = f"the not-pets folder {cfg.not_pets} does not exist"
    elif not any(evaluate.not_pet_photos(cfg.not_pets, cfg.seed).values()):
        problem = f"the not-pets folder {cfg.not_pets} holds no photos in kind subfolders ({cfg.not_pets}/<kind>/*.jpg)"
    else:
        return None
    return (f"{problem}: \"other\" (neither a cat nor a dog) would be learnt and measured on generated images "
            "alone. Give --not-pets a folder of such photos, one subfolder per kind, or pass --synthetic-only "
            "if generated images alone are intended")


def non_pets(cfg, folder):
    """NonPets of cfg.not_pets (none with cfg.synthetic_only) plus cfg.synthetic generated images
    for training and half as many for val and for test (written to `folder`), each part from its
    own seed."""
    parts = ({split: [] for split, _ in evaluate.NOT_PETS_SPLIT} if cfg.synthetic_only
             else evaluate.not_pet_photos(cfg.not_pets, cfg.seed))
    for offset, (split, count) in enumerate((("train", cfg.synthetic), ("val", cfg.synthetic // 2),
                                             ("test", cfg.synthetic // 2))):
        for i, (img, kind) in enumerate(synthetic_non_pets(count, [cfg.seed, offset])):
            path = os.path.join(folder, f"{split}-{i:04d}-{kind}.png")
            img.save(path)
            parts[split].append((path, GENERATED + kind))
    return NonPets(parts, "" if cfg.synthetic_only else cfg.not_pets)


def synthetic_non_pet(kind, rng):
    """A generated image of `kind` that is plainly not a pet photo: what staff upload by
    mistake (a blank or black frame, a scan, a screenshot) or a test throws at the service."""
    width, height = (int(v) for v in rng.integers(160, 900, 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if kind == "solid":
        return Image.new("RGB", (width, height), colour)
    if kind == "noise":
        scale = int(rng.choice([1, 4, 16]))
        small = rng.integers(0, 256, (max(1, height // scale), max(1, width // scale), 3), dtype=np.uint8)
        return Image.fromarray(small).resize((width, height), Image.NEAREST)
    if kind == "gradient":
        ramp = np.linspace(0, 1, width)[None, :, None] * np.ones((height, 1, 1))
        other = rng.integers(0, 256, 3)
        return Image.fromarray((np.array(colour) * (1 - ramp) + other * ramp).astype(np.uint8))
    paper = (245, 245, 240) if kind == "document" else colour
    img = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 8)) if kind == "screenshot" else 0):
        box = sorted(rng.integers(0, width, 2)), sorted(rng.integers(0, height, 2))
        draw.rectangle((box[0][0], box[1][0], box[0][1], box[1][1]), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     0123456789"))
    for y in range(8, height - 12, int(rng.integers(12, 24))):
        draw.text((8, y), "".join(rng.choice(letters, width // 7)), fill=(20, 20, 20))
    return img


def synthetic_non_pets(count, seed):
    """[(image, kind)]: `count` synthetic non-pets, the kinds in turn."""
    rng = np.random.default_rng(seed)
    return [(synthetic_non_pet(kind, rng), kind) for kind in np.resize(SYNTHETIC_KINDS, count)]


# ---------------------------------------------------------------- the decision
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
        candidates[name] = {**evaluate.other_rates(val_pets, val_others, val_kinds, threshold), "threshold": threshold,
                            "platt": platt}
    chosen = min(candidates, key=lambda n: worst_target_ratio(candidates[n]))
    fit_score(decision, chosen, x, y, cfg)
    with torch.no_grad():
        decision.platt[:] = torch.tensor(candidates[chosen]["platt"])
        decision.mean[:], decision.whiten[:] = fit_whitening(pets["train"], decision.whiten.shape[1])  # drift's
    return candidates[chosen]["threshold"], candidates


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


def fit_binary(x, y, l2):
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
    return mean, F.pad(whiten, (0, components - k))


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


def worst_target_ratio(rates):
    """How far a candidate is from the targets: the larger of its two rates over their bar."""
    return max(rates["pets_as_other"] / catdog.GATE["max_pets_as_other"],
               rates["other_as_pet"] / catdog.GATE["max_other_as_pet"])
