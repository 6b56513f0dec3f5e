"""catdog core: configuration, image loading, THE preprocessing function, model meta.

Training, evaluation and serving all import this file. The serving path uses only numpy
and Pillow from it, and it never imports torch: the torch networks, save / load and the
ONNX export are in nets.py.
"""
import argparse
import ast
import csv
import hashlib
import io
import json
import math
import os
import time
import tokenize
import warnings

import numpy as np
import pillow_heif
from PIL import Image, ImageOps

pillow_heif.register_heif_opener()  # HEIC/HEIF, the iPhone camera's default format

# ---------------------------------------------------------------- configuration
CLASSES = ("cat", "dog")
SEED = 42

# Paths are anchored at the project root, so scripts and tests work from any folder.
ROOT = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(ROOT, "data")
PROCESSED_DIR = os.path.join(DATA_DIR, "processed")
MANIFEST = os.path.join(DATA_DIR, "manifest.csv")
MODELS_DIR = os.path.join(ROOT, "models")
SHARED_SAMPLE = os.path.join(ROOT, "..", "shared", "datasets", "dogs-vs-cats-3k")
# 1,999 more Kaggle photos (re-encoded): measured beside the test split, never trained on.
EXTRA_SAMPLE = os.path.join(ROOT, "..", "shared", "datasets", "dogs-vs-cats-extra-2k")
# Photos that are neither cats nor dogs, one folder per kind (bird, food, people_face, ...).
NOT_PETS_SAMPLE = os.path.join(ROOT, "..", "shared", "datasets", "not-pets")
TRACKING_URI = "sqlite:///" + os.path.join(ROOT, "mlflow.db")  # when MLFLOW_TRACKING_URI is unset
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))

# How preprocess.py stores images: STORE_SIZE x STORE_SIZE RGB JPEGs.
# "shorter_crop" (resize shorter side, centre crop) keeps aspect ratio and is
# about a point more accurate downstream than "squash" (plain resize).
STORE_SIZE = 224
STORE_RESIZE = "shorter_crop"
STORE_QUALITY = 95
MIN_SIDE = 32  # smaller images carry no usable signal

# What a model sees. Saved with every model, so serving always matches training:
# resize the shorter side to `resize`, centre-crop `crop`, then (x - mean) / std.
# The transfer model's input is its backbone's ImageNet size, the shorter side first resized
# to crop / 0.875 as in ImageNet evaluation; inputs (x - 127) / 128 as the weights expect.
BACKBONES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}  # name -> crop
BACKBONE = "efficientnet-lite2"  # the transfer model's, chosen by measurement (README, "Training")


def preprocess_settings(arch, backbone=BACKBONE):
    if arch == "baseline":
        return {"resize": 128, "crop": 128, "mean": 127.0, "std": 128.0}
    crop = BACKBONES[backbone]
    return {"resize": round(crop / 0.875), "crop": crop, "mean": 127.0, "std": 128.0}


# Limits for images from the outside world (uploads, raw datasets).
MAX_PIXELS = 40_000_000  # JPEG: beyond this Pillow's decompression-bomb guard refuses; big ones decode at 1/2-1/8 scale
# Every other format decodes at full size, and mode conversions copy it: 16 MP of RGBA is 64 MB.
LOSSLESS_MAX_PIXELS = 16_000_000
# WebP's decoder holds about 24 bytes a pixel at its peak (decoding_bytes): 16 MP took 390 MiB,
# more than serve.py's whole decode budget (256 MB) on its own; 10 MP fits inside it.
WEBP_MAX_PIXELS = 10_000_000
# A file cannot hold a whole image in fewer bytes than these bounds: deflate (PNG) never
# compresses more than 1032:1, and a baseline or progressive JPEG spends at least a bit per
# 8x8 block (here with a 4x margin). Less data is a truncated file or a lying header.
DEFLATE_MAX_RATIO = 1032
JPEG_MIN_BYTES_PER_PIXEL = 1 / 2048
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO", "HEIF")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif")

# Promotion gate: a candidate becomes champion only if it meets all of these on the
# evaluation set (test split + extra photos) and is not significantly less accurate than the
# current champion on the same photos (one-sided McNemar p below `significance`); within
# that noise, the lower log-loss wins (promote.gate).
# The "other" targets, on photos the decision never saw: pets (evaluation set) answered
# "other", non-pets (the not-pets test part) answered cat or dog, overall and in every kind
# with at least kind_min_photos test photos.
GATE = {"min_accuracy": 0.97, "max_log_loss": 0.10, "max_ece": 0.05, "significance": 0.05,
        "max_pets_as_other": 0.003, "max_other_as_pet": 0.02, "max_other_as_pet_per_kind": 0.05,
        "kind_min_photos": 20, "slice_min_photos": 30}

# "other": neither a cat nor a dog. A photo is answered "other" when the model's pet
# probability is below the threshold saved in its model.json, which train.py sets so that
# this share of the training pets (each scored by a decision fitted without it) falls below.
OTHER = "other"
ANSWERS = (*CLASSES, OTHER)
PETS_REJECTED = 0.001


# ---------------------------------------------------------------- script configuration
def config_parser(namespace, choices=None):
    """argparse for a script's plain config values, nanoGPT style.

    Every module-level line `name = value  # help` of the script whose name is lower case and
    whose value is a str, int, float or bool becomes `--name` (underscores as dashes), with
    that default, its type and the comment as help; booleans take --name / --no-name.
    `choices` maps a name to its allowed values. Returns the parser, so the script can add
    positional arguments; scripts call parse_args() in main() only."""
    with open(namespace["__file__"]) as f:
        source = f.read()
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    tree = ast.parse(source)
    doc = (ast.get_docstring(tree) or "").strip()
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for node in tree.body:
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        name = getattr(targets[0], "id", "") if len(targets) == 1 else ""
        value = namespace.get(name)
        if not name.islower() or node.end_lineno not in comments or type(value) not in (str, int, float, bool):
            continue
        help_text = f"{comments[node.end_lineno]} (default: {value})".replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=help_text,
                                choices=(choices or {}).get(name))
    return parser


# ---------------------------------------------------------------- the manifest
def read_manifest(path=MANIFEST, split=None, keep_dropped=False):
    """Rows of preprocess.py's manifest: the kept ones (no drop reason) unless keep_dropped,
    of one split or all. `source` (the original) and `path` (the processed copy) are stored
    relative to the manifest's folder and come back as full paths; `photo` is the original
    when it is on this machine (what a client would send), else the processed copy, else None."""
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if (row.get("drop_reason") and not keep_dropped) or (split and row.get("split") != split):
                continue
            for key in ("source", "path"):
                row[key] = os.path.normpath(os.path.join(base, row[key])) if row.get(key) else ""
            row["photo"] = next((row[k] for k in ("source", "path") if row[k] and os.path.isfile(row[k])), None)
            row["label"] = row.get("label") or label_from_name(row["photo"] or row["path"])
            rows.append(row)
    return rows


def labelled_photos(paths):
    """[(path, label)] of the image files in the given files and folders, labelled by name
    (cat.12.jpg) or folder (cat/12.jpg), sorted; unlabelled files are left out."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                found += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        else:
            found.append(path)
    pairs = [(p, label_from_name(p)) for p in sorted(found)]
    return [(p, label) for p, label in pairs if label]


# ---------------------------------------------------------------- image loading
class ImageError(ValueError):
    """An input that is not a usable image. `reason` is a short machine-readable tag."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def open_image(source, max_pixels=MAX_PIXELS, min_side=None):
    """Decode a path or bytes fully into an upright RGB PIL image, or raise ImageError.

    The whole image is decoded here (not lazily), so truncated files fail now and
    not later in the middle of a batch. With `min_side`, a JPEG at least twice that size
    on both sides is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), both sides
    staying >= min_side: a 12 MP phone photo then costs about 3x less CPU, for a picture
    that is resized to a few hundred pixels anyway. img.info["original_size"] keeps the
    upright size of the file, which is what the drift statistics compare.
    """
    return decode_header_checked(open_checked(source, max_pixels, min_side))


def open_checked(source, max_pixels=MAX_PIXELS, min_side=None):
    """The image of a path or bytes with its header checked and nothing decoded yet (its
    size is the decoded one: a big JPEG's draft scale is set); ImageError when refused.
    decoding_bytes tells what decoding it will take, decode_header_checked decodes it."""
    data = source if isinstance(source, (bytes, bytearray)) else open(source, "rb").read()
    if not data:
        raise ImageError("empty", "the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from None
    except Exception:
        raise ImageError("not_an_image", "the content is not a recognised image format") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageError("unsupported_format", f"image format {img.format} is not supported")
    width, height = img.size
    limit = pixel_limit(img.format, max_pixels)
    if width * height > limit:
        raise ImageError("too_many_pixels", f"{width}x{height} exceeds the {limit} pixel limit of {img.format}")
    if min(width, height) < MIN_SIDE:  # before decoding: a 1 x 40,000,000 PNG is refused at once
        raise ImageError("too_small", f"{width}x{height} is smaller than {MIN_SIDE} px on a side")
    check_enough_data(img, len(data))
    decode_scale(img, min_side)
    img.info["original_size"] = (width, height)
    return img


def decode_scale(img, min_side):
    """Let a JPEG at least twice min_side on both sides decode at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling), both sides staying >= min_side."""
    if min_side and img.format == "JPEG":
        img.draft(None, (min_side, min_side))


def decode_header_checked(img):
    """open_checked's image decoded, upright and RGB."""
    width, height = img.info["original_size"]
    decoded_size = img.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:
        raise ImageError("corrupt", f"the image could not be decoded ({type(e).__name__})") from None
    img = upright_rgb(img)
    img.info["original_size"] = (width, height) if img.size == decoded_size else (height, width)
    return img


def decoding_bytes(img):
    """Memory that decoding `img` (its size after any draft) and converting it to RGB takes at
    the peak: the decoded image, at up to 4 bytes per sample for 16- and 32-bit modes, plus the
    RGB copy. WebP's decoder keeps about three more RGBA canvases until the image is dropped
    (measured: a 16 MP lossless RGBA WebP took 390 MiB)."""
    if img.format == "WEBP":
        return img.width * img.height * 24
    sample = 4 if img.mode in ("I", "F", "I;16", "I;16B", "I;16L") else 1
    return img.width * img.height * (len(img.getbands()) * sample + 3)


def pixel_limit(fmt, max_pixels=MAX_PIXELS):
    """The most pixels a file of this format may declare: JPEG max_pixels, WebP WEBP_MAX_PIXELS
    and others LOSSLESS_MAX_PIXELS at most."""
    if fmt in ("JPEG", "MPO"):
        return max_pixels
    return min(max_pixels, WEBP_MAX_PIXELS if fmt == "WEBP" else LOSSLESS_MAX_PIXELS)


def check_enough_data(img, size):
    """ImageError "truncated" when a PNG or JPEG file of `size` bytes is too small to hold the
    image its header declares: Pillow would fill the missing rows and answer for them."""
    width, height = img.size
    if img.format == "PNG":
        raw = height * (1 + width * len(img.getbands()))  # at least a byte per sample, one filter byte per row
        enough = size * DEFLATE_MAX_RATIO >= raw
    elif img.format in ("JPEG", "MPO"):
        enough = size >= width * height * JPEG_MIN_BYTES_PER_PIXEL
    else:
        return
    if not enough:
        raise ImageError("truncated", f"{size} bytes cannot hold the {width}x{height} image the header declares "
                                      "(a truncated file or a lying header)")


def upright_rgb(img):
    """A decoded image turned as its EXIF orientation says, in 8-bit RGB."""
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to turn
    return to_rgb(img)


def to_rgb(img):
    """Any Pillow mode (L, P, CMYK, RGBA, 16-bit, ...) to 8-bit RGB; transparency over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow would clip 16-bit values to 255 (a white image); scale them instead.
        # Integers, not float64: a 16 MP image would take 128 MB as float64.
        arr = np.asarray(img)
        shift = 8 if arr.max() > 255 else 0
        img = Image.fromarray(np.clip(arr >> shift, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # one copy at most: 16 MP RGBA is 64 MB
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_shorter_center_crop(img, resize, crop):
    """Resize so the shorter side is `resize` (keeping aspect), then centre-crop crop x crop."""
    width, height = img.size
    scale = resize / min(width, height)
    new_w, new_h = max(crop, round(width * scale)), max(crop, round(height * scale))
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    # Resample only the source region that lands in the crop: the same pixels as resizing
    # the whole image then cropping (within 1 grey level), for less than half the work.
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), Image.BILINEAR, box=box, reducing_gap=None)


def fit_for_storage(img, size=STORE_SIZE, mode=STORE_RESIZE):
    """The processed-dataset form of an image: size x size RGB."""
    if mode == "shorter_crop":
        return resize_shorter_center_crop(img, size, size)
    if mode == "squash":
        return img.resize((size, size), Image.BILINEAR)
    raise ValueError(f"unknown resize mode {mode!r}")


# ---------------------------------------------------------------- THE preprocessing
def preprocess(img, settings):
    """RGB PIL image -> float32 array (3, crop, crop), normalised as the model expects.

    The one preprocessing function: training (after augmentation), evaluation and
    serving all call it, with the settings saved beside the model.
    """
    img = resize_shorter_center_crop(img, settings["resize"], settings["crop"])
    arr = np.asarray(img).transpose(2, 0, 1).astype(np.float32)  # HWC -> CHW in the one copy
    arr -= settings["mean"]
    arr /= settings["std"]
    return arr


# ---------------------------------------------------------------- the preprocessing contract
# What a decoded upload goes through before the model sees it: serving decodes at reduced scale
# (decode_scale), turns it upright in RGB, then preprocess. A model records the fingerprint of
# this code (model.json "preprocess_fingerprint") beside its settings ("preprocess"); serve.py
# and `make image` refuse a model whose fingerprint is not their code's, so a change to any of
# these functions cannot ship with a model trained before it. Comments and docstrings do not count.
PREPROCESSING = ("decode_scale", "upright_rgb", "to_rgb", "resize_shorter_center_crop", "preprocess")


def preprocessing_fingerprint(source=None):
    """sha256 of the code of the PREPROCESSING functions, in that order, in `source` (the text
    of a catdog.py; by default this file's)."""
    if source is None:
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            source = f.read()
    functions = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    digest = hashlib.sha256()
    for name in PREPROCESSING:
        digest.update(code_of(source, functions[name]).encode() + b"\0")
    return digest.hexdigest()


def code_of(source, function):
    """The lines of a top-level function (its ast node in `source`) without its docstring,
    comments, trailing spaces and blank lines."""
    start = function.lineno
    lines = source.splitlines()[start - 1:function.end_lineno]
    for token in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            lines[row - 1] = lines[row - 1][:column]
    if ast.get_docstring(function, clean=False) is not None:
        docstring = function.body[0]
        lines[docstring.lineno - start:docstring.end_lineno - start + 1] = []
    return "\n".join(line.rstrip() for line in lines if line.strip())


def preprocessing_mismatch(meta, where):
    """Why the model of model.json `meta` (read from `where`) must not be served by this code,
    or None: it records no preprocessing fingerprint, or not this code's."""
    trained, ours = meta.get("preprocess_fingerprint"), preprocessing_fingerprint()
    code = f"catdog.py's {', '.join(PREPROCESSING)}"
    if trained is None:
        return (f"{where} was trained before models recorded their preprocessing code (its model.json has no "
                f"preprocess_fingerprint), so nothing shows that this code ({code}, fingerprint {ours[:12]}) "
                "prepares photos as its training did; retrain it with this code (`make train`)")
    if trained != ours:
        return (f"{where} was trained with preprocessing code of fingerprint {trained[:12]} (its model.json), "
                f"this code's is {ours[:12]}: what a photo becomes before the model sees it ({code}) is not what "
                f"it was trained on (code at commit {meta.get('git_commit', 'unknown')}); retrain it with this "
                "code (`make train`), or deploy the code it was trained with")
    return None


def softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def label_from_name(path, labels=CLASSES):
    """'cat.12.jpg' or '.../cat/12.jpg' or '.../Cat/12.jpg' -> 'cat'; None when not one of `labels`."""
    parts = os.path.normpath(path).split(os.sep)
    for candidate in (parts[-1].split(".")[0], parts[-2] if len(parts) > 1 else ""):
        if candidate.lower() in labels:
            return candidate.lower()
    return None


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- model meta
# The torch networks, save / load and the ONNX export live in nets.py (torch stays out of here).
# What the served ONNX file outputs, from one pass over a batch "image" (n, 3, crop, crop):
# cat/dog logits (n, 2), the pet logit (n,) of the "other" decision, and pet_distance (n,),
# how far the image's features are from the training pets (drift).
ONNX_OUTPUTS = ("logits", "pet_logit", "pet_distance")
SERVED_FILES = ("model.onnx", "model.json", "reference_profile.json")  # what the service needs of a model
MODEL_CARD = "MODEL_CARD.md"  # the model card, beside the served files (training writes it)


def answer(outputs, meta):
    """(label, confidence, cat/dog probabilities, pet probability, pet_distance) of one image's
    ONNX outputs: "other" below the model's pet threshold (confidence 1 - pet probability), else
    the likelier of cat and dog (its probability). The service and the registry's model both
    answer with it."""
    logits, pet_logit, distance = outputs
    probabilities = softmax(logits)
    pet_probability = float(1 / (1 + np.exp(-float(pet_logit))))
    if pet_probability < float(meta["other"]["threshold"]):
        label, confidence = OTHER, 1 - pet_probability
    else:
        best = int(np.argmax(probabilities))
        label, confidence = meta["classes"][best], float(probabilities[best])
    return (label, confidence, {c: float(p) for c, p in zip(meta["classes"], probabilities)},
            pet_probability, float(distance))


def model_meta(arch, metrics=None, temperature=1.0, version=None, backbone=BACKBONE, **extra):
    """Everything serving needs to reproduce training's view of an image."""
    return {"arch": arch, "backbone": backbone if arch == "transfer" else "simple-cnn",
            "classes": list(CLASSES), "preprocess": preprocess_settings(arch, backbone),
            "preprocess_fingerprint": preprocessing_fingerprint(), "temperature": temperature, "metrics": metrics or {},
            "version": version or time.strftime("%Y%m%d-%H%M%S"), **extra}


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- monitoring: input statistics and drift
# Cheap per-image statistics, computed on the decoded upright RGB image (before the
# model's preprocessing). train.py stores their reference distribution beside the
# model; the service compares a rolling window of live inputs against it with PSI.
# Drift is judged on what matters to the model, not on raw sizes (phone photos are 4032x3024,
# the training photos at most 500 px: every phone user would look like drift):
# - the PSI of each DRIFT_FEATURES distribution against the training photos', pet_distance
#   being how far the model's own features are from the training pets (PetDecision.distance);
# - the rise of each DRIFT_SHARES share above the reference's: photos so small they are
#   upscaled to the model's input, so elongated that the centre crop drops most of them,
#   and answers of "other".
DRIFT_FEATURES = ("brightness", "contrast", "saturation", "red", "green", "blue", "pet_distance")
DRIFT_SHARES = ("undersized", "elongated", OTHER)
PSI_BINS = 10
DRIFT_THRESHOLD = 0.25  # PSI above 0.25 is the usual "significant shift" rule of thumb; for a share, +25 points
UNDERSIZED_SIDE = 112   # a shorter side below half the model's input
ELONGATED_ASPECT = 2.5  # long side / short side: the square centre crop keeps under 40 % of the photo
CONFIDENCE_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def image_stats(img):
    """Per-image statistics used for drift: size, brightness, contrast, saturation, colour means."""
    small = img.reduce(max(1, math.ceil(max(img.size) / 64)))  # box average to <= 64 px: cheap, no copy
    # One row per channel: numpy is slow along a 3-long axis and fast along a long one.
    red, green, blue = np.asarray(small, dtype=np.float32).reshape(-1, 3).T
    gray = 0.299 * red + 0.587 * green + 0.114 * blue
    saturation = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    width, height = img.info.get("original_size", img.size)  # a JPEG may have been decoded smaller
    return {"width": width, "height": height, "brightness": float(gray.mean()),
            "contrast": float(gray.std()), "saturation": float(saturation.mean()),
            "red": float(red.mean()), "green": float(green.mean()), "blue": float(blue.mean()),
            "undersized": float(min(width, height) < UNDERSIZED_SIDE),
            "elongated": float(max(width, height) > ELONGATED_ASPECT * min(width, height))}


def reference_profile(stats, confidences=(), distances=()):
    """Reference distribution of each feature (decile bin edges and the fraction per bin) and
    share; `distances` (pet_distance of held-out pets) may come from other photos than `stats`."""
    values = {name: [s[name] for s in stats if name in s] for name in DRIFT_FEATURES}
    values["pet_distance"] = list(distances)
    profile = {"features": {}, "shares": {}, "count": len(stats)}
    for name, column in values.items():
        if len(column):
            column = np.array(column, dtype=np.float64)
            edges = np.unique(np.quantile(column, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
            profile["features"][name] = {"edges": edges.tolist(), "fractions": bin_fractions(edges, column)}
    for name in DRIFT_SHARES:
        profile["shares"][name] = float(np.mean([s.get(name, 0.0) for s in stats])) if stats else 0.0
    if len(confidences):
        edges = np.array(CONFIDENCE_EDGES[1:-1])
        profile["confidence"] = {"edges": edges.tolist(), "fractions": bin_fractions(edges, confidences)}
    return profile


def bin_fractions(edges, values):
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return (counts / max(1, counts.sum())).tolist()


def psi(reference, values, eps=1e-4):
    """Population Stability Index of `values` against a reference {edges, fractions}."""
    expected = np.clip(np.array(reference["fractions"]), eps, None)
    actual = np.clip(np.array(bin_fractions(np.array(reference["edges"]), values)), eps, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def drift_scores(profile, stats, confidences=()):
    """A window of live inputs against the profile: PSI per feature (and for confidence),
    rise of each share. Features or shares the profile lacks are left out."""
    scores = {name: psi(reference, [s[name] for s in stats if name in s])
              for name, reference in profile["features"].items() if name in DRIFT_FEATURES
              and any(name in s for s in stats)}
    for name, reference in profile.get("shares", {}).items():
        scores[name] = float(np.mean([s.get(name, 0.0) for s in stats])) - reference if stats else 0.0
    if len(confidences) and "confidence" in profile:
        scores["confidence"] = psi(profile["confidence"], confidences)
    return scores
