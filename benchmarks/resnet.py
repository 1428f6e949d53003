"""A small NHWC ResNet whose normalization and convolution are swappable.

``ResNet10`` (BasicBlock, stages 1-1-1-1, widths 16-32-64-128, CIFAR-style
3×3 stem) is small enough to time on a CPU. ``ResNet50`` (Bottleneck,
3-4-6-3, widths 64-128-256-512 ×4, 7×7/2 stem and 3×3/2 max-pool: the ImageNet
model at 224×224) is what ``benchmarks/aot_resnet.py`` hands the TPU
compiler. ``norm=None`` builds the
deployment form: every convolution carries a bias and no norm layer follows,
which is what :func:`mabn_jax.fold_params` produces from a trained model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn


def _conv_norm(block, h, feats, kernel, strides, name, train):
    """conv → norm (the conv keeps its bias only when the block has no norm)."""
    conv = block.conv(feats, kernel, strides, use_bias=block.norm is None, name=f"{name}_conv")
    h = conv(h)
    if block.norm is not None:
        h = block.norm(use_running_average=not train, name=f"{name}_norm")(h)
    return h


class BasicBlock(nn.Module):
    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module] | None

    @nn.compact
    def __call__(self, x, train: bool):
        def conv_norm(h, feats, kernel, strides, name):
            return _conv_norm(self, h, feats, kernel, strides, name, train)

        h = nn.relu(conv_norm(x, self.features, (3, 3), self.strides, "a"))
        h = conv_norm(h, self.features, (3, 3), 1, "b")
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv_norm(x, self.features, (1, 1), self.strides, "proj")
        return nn.relu(h + x)


class BottleneckBlock(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 (4× wider), as in ResNet-50 v1.5."""

    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module] | None

    @nn.compact
    def __call__(self, x, train: bool):
        def conv_norm(h, feats, kernel, strides, name):
            return _conv_norm(self, h, feats, kernel, strides, name, train)

        h = nn.relu(conv_norm(x, self.features, (1, 1), 1, "a"))
        h = nn.relu(conv_norm(h, self.features, (3, 3), self.strides, "b"))
        h = conv_norm(h, 4 * self.features, (1, 1), 1, "c")
        if x.shape[-1] != 4 * self.features or self.strides != 1:
            x = conv_norm(x, 4 * self.features, (1, 1), self.strides, "proj")
        return nn.relu(h + x)


class ResNet(nn.Module):
    """``conv``: nn.Conv-like class; ``norm``: nn.BatchNorm-like class or None."""

    conv: Callable[..., nn.Module] = nn.Conv
    norm: Callable[..., nn.Module] | None = nn.BatchNorm
    stage_sizes: Sequence[int] = (1, 1, 1, 1)
    widths: Sequence[int] = (16, 32, 64, 128)
    num_classes: int = 10
    dtype: Any = jnp.float32
    block: Callable[..., nn.Module] = BasicBlock
    imagenet_stem: bool = False  # 7×7/2 conv + 3×3/2 max-pool instead of one 3×3

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(self.conv, padding="SAME", dtype=self.dtype)
        norm = None if self.norm is None else functools.partial(self.norm, dtype=self.dtype)
        kernel, stride = ((7, 7), 2) if self.imagenet_stem else ((3, 3), 1)
        x = conv(self.widths[0], kernel, stride, use_bias=norm is None, name="stem_conv")(x)
        if norm is not None:
            x = norm(use_running_average=not train, name="stem_norm")(x)
        x = nn.relu(x)
        if self.imagenet_stem:
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(n):
                x = self.block(
                    w, 2 if i > 0 and j == 0 else 1, conv, norm, name=f"stage{i}_block{j}"
                )(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet50 = functools.partial(
    ResNet,
    stage_sizes=(3, 4, 6, 3),
    widths=(64, 128, 256, 512),
    num_classes=1000,
    block=BottleneckBlock,
    imagenet_stem=True,
)


def conv_norm_pairs(batch_stats) -> list[tuple[str, str]]:
    """Every ``(…/name_conv, …/name_norm)`` pair in a :class:`ResNet`'s batch_stats."""
    pairs = []

    def walk(node, prefix):
        for key, sub in node.items():
            if key.endswith("_norm"):
                pairs.append((prefix + key[: -len("_norm")] + "_conv", prefix + key))
            else:
                walk(sub, prefix + key + "/")

    walk(batch_stats, "")
    return pairs
