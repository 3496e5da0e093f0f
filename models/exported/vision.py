"""Vision models: two controls (a BatchNorm CNN, a ViT) and a Paddle-style detector whose BatchNorm survives export.

``resnet-bn`` (control): a small ResNet (BasicBlocks with BatchNorm, as torchvision/timm write them) in plain torch:
the PyPI torchvision wheel does not import beside the CPU torch wheel, and timm imports torchvision. Eval-mode
export folds every BN into its Conv.

``vit`` (control): transformers ``ViTModel`` from a small ``ViTConfig``.

``paddle-bn-detector``: a DB-style text detector (Conv -> BatchNormalization -> Relu stages, a 1x1 head, Sigmoid)
exported the way Paddle2ONNX writes such models: BatchNormalization left unfused (TorchScript with
``training=TrainingMode.PRESERVE``, which skips the Conv-BN fusion of eval-mode export; dynamo with
``optimize=False``, as its optimiser fuses BN too),
inputs declared ``[-1, 3, ?, ?]``, opset 11 (TorchScript). One channel of the second stage is a trained BN's worst
case: its Conv output is ~80 + a signal of ~0.1 and its running variance is ~0, so BN multiplies ``x - mean`` by
~790 (gamma 2.5 / sqrt(eps)). FP16's spacing at 80 (0.0625) swamps the signal before BN sees it: rel L2 ~6e-2 at
the output (FP32 itself is 1e-4-sensitive there: ORT and torch differ by ~6e-5). Folding BN into the Conv removes
the cancellation here (folded weights stay small, ~3); in trained models they can pass 65504 instead.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fp16_rewrite.models.exported.export import import_torch
from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["SPECS"]

_RESNET_SIZE, _VIT_SIZE, _DET_SIZE = (1, 3, 96, 96), (1, 3, 64, 64), (1, 3, 96, 160)
_DET_CHANNEL, _DET_OFFSET, _DET_SHIFT, _DET_GAMMA = 7, 80.0, 0.1, 2.5


def _resnet_bn():
    torch = import_torch()
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
            self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or c_in != c_out:
                self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + shortcut)

    class ResNet(nn.Module):
        def __init__(self, widths=(16, 32, 64), classes: int = 10) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            blocks, c = [], widths[0]
            for i, w in enumerate(widths):
                blocks.append(BasicBlock(c, w, 1 if i == 0 else 2))
                c = w
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(c, classes)

        def forward(self, image):
            x = self.layers(self.stem(image))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    model = ResNet()
    with torch.no_grad():  # trained-looking BN statistics instead of the identity defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _image_feeds(shape: tuple[int, ...]):
    def make() -> list[Feed]:
        return [{"image": np.random.default_rng(0).random(shape, dtype=np.float32)}]

    return make


def _vit():
    torch = import_torch()
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=_VIT_SIZE[-1], patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="eager")
    vit = ViTModel(config, add_pooling_layer=False).eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, image):
            return self.vit(pixel_values=image, return_dict=True).last_hidden_state

    return LastHiddenState().eval()


def _paddle_bn_detector():
    torch = import_torch()
    nn = torch.nn

    def stage(c_in: int, c_out: int, stride: int):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(stage(3, 16, 2), stage(16, 32, 2), stage(32, 32, 1), stage(32, 32, 1))
            self.head = nn.Conv2d(32, 1, 1)

        def forward(self, image):
            return torch.sigmoid(self.head(self.backbone(image)))

    torch.manual_seed(0)
    model = Detector()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        conv, bn = model.backbone[1][0], model.backbone[1][1]
        ch = _DET_CHANNEL
        conv.weight[ch].mul_(0.02)           # a small signal ...
        conv.bias[ch] = _DET_OFFSET          # ... on a large offset
        bn.running_mean[ch] = _DET_OFFSET - _DET_SHIFT
        bn.running_var[ch] = 1e-8            # ~0: BN divides by sqrt(eps)
        bn.weight[ch] = _DET_GAMMA
        bn.bias[ch] = 0.5
    return model.eval()


def _paddle_dims(model: onnx.ModelProto) -> None:
    """Declare the image input as Paddle2ONNX does: batch -1, height and width unnamed (``[-1, 3, ?, ?]``)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    for d in dims[2:]:
        d.Clear()


SPECS = [
    Spec("resnet-bn", _resnet_bn, _image_feeds(_RESNET_SIZE), ("image",), ("logits",), control=True,
         about="small ResNet (BasicBlocks, BatchNorm) in plain torch; control"),
    Spec("vit", _vit, _image_feeds(_VIT_SIZE), ("image",), ("last_hidden_state",), control=True,
         about="transformers ViTModel; control"),
    Spec("paddle-bn-detector", _paddle_bn_detector, _image_feeds(_DET_SIZE), ("image",), ("maps",),
         about="DB-style detector, unfused Conv->BatchNormalization->Relu, [-1,3,?,?] input, one BN with ~0 "
               "running variance", dynamic={"image": {0: "batch", 2: "height", 3: "width"}},
         torchscript_options={"training": "preserve"}, dynamo_options={"optimize": False}, opset=11, post=_paddle_dims),
]
