"""Privacy-preserving data fingerprints: a small summary of a peer's training data for peer matching.

Raw statistics never leave the peer; only these transforms of them do:

- label distribution -> one bucket level per class (0 absent, 1 low: p < 0.5/C, 2 medium: p < 1.5/C,
  3 high), C = number of classes;
- feature moments -> the input features are split into at most ``moment_groups`` contiguous groups; for each
  group the mean of its features' means and the mean of its features' variances, each with Gaussian noise of
  standard deviation ``noise`` times the group's standard deviation (resp. variance). The noise is calibrated to
  the data's own spread, so ``noise=0.1`` hides moments below a tenth of a standard deviation; it is a
  scale-relative obfuscation, not an epsilon-DP guarantee. The noise is drawn from the operating system's secure
  source unless a ``noise_seed`` is given (the simulator, for reproducible runs): a seed derived from public
  values (swarm and node ids) would let any peer regenerate the noise and subtract it;
- sample count -> a decade bucket ("<10", "10-100", "100-1k", ..., ">=1M");
- gradient moments (off by default: gradients leak inputs) -> per group of parameters, the mean and standard
  deviation of one mini-batch gradient at the initial model, noised the same way;
- label entropy -> the Shannon entropy in bits of the bucketed label distribution (representative proportions
  0, 0.25/C, 1/C, 2/C renormalized), so it says nothing the buckets do not. EntropyWeightedAvg uses it.

Wire format (a control-message body, every value a str/int/float so it signs and travels as is):

    {"fp": 1, "labels": "3320000000", "entropy": 1.459, "samples": "100-1k",
     "moments": "0.1234:0.0456,0.2:0.01", "grad": "0.001:0.02,..."}   # "grad" only when enabled

``labels`` is "" for tasks without class labels; ``moments`` entries are mean:variance pairs in %.4g.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quinkgl_cli.batches import batch_parts

FORMAT_VERSION = 1
# Control-message kind under which a peer sends its fingerprint body (the node routes it to the topology).
MESSAGE_KIND = "fingerprint"
SAMPLE_BUCKETS = ("<10", "10-100", "100-1k", "1k-10k", "10k-100k", "100k-1M", ">=1M")
_REPRESENTATIVE = (0.0, 0.25, 1.0, 2.0)  # bucket level -> proportion times C
_MAX_CLASSES = 4096
_MAX_GROUPS = 256

# Default weights of the combined similarity (the description's label/moment/gradient split, without history).
DEFAULT_WEIGHTS = {"label": 0.4, "moments": 0.3, "gradient": 0.15}


@dataclass(frozen=True)
class Fingerprint:
    labels: tuple[int, ...]
    entropy: float
    samples: str
    moments: tuple[tuple[float, float], ...]
    gradient: tuple[tuple[float, float], ...] | None = None

    def to_body(self) -> dict[str, str | int | float]:
        body: dict[str, str | int | float] = {
            "fp": FORMAT_VERSION,
            "labels": "".join(str(level) for level in self.labels),
            "entropy": self.entropy,
            "samples": self.samples,
            "moments": _encode_pairs(self.moments),
        }
        if self.gradient is not None:
            body["grad"] = _encode_pairs(self.gradient)
        return body


def _encode_pairs(pairs: Iterable[tuple[float, float]]) -> str:
    return ",".join(f"{a:.4g}:{b:.4g}" for a, b in pairs)


def _decode_pairs(text: object, what: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(text, str):
        raise ValueError(f"fingerprint {what} must be a string")
    if not text:
        return ()
    items = text.split(",")
    if len(items) > _MAX_GROUPS:
        raise ValueError(f"fingerprint {what} has {len(items)} groups (max {_MAX_GROUPS})")
    out = []
    for item in items:
        a, sep, b = item.partition(":")
        try:
            pair = (float(a), float(b))
        except ValueError:
            raise ValueError(f"fingerprint {what} entry {item[:32]!r} is not mean:variance") from None
        if not sep or not all(math.isfinite(v) for v in pair):
            raise ValueError(f"fingerprint {what} entry {item[:32]!r} is not two finite numbers")
        out.append(pair)
    return tuple(out)


def parse_fingerprint(body: Mapping[str, Any]) -> Fingerprint:
    """Validate a received fingerprint body; unknown keys are ignored, malformed ones raise ValueError."""
    if body.get("fp") != FORMAT_VERSION:
        raise ValueError(f"fingerprint format {body.get('fp')!r} is not {FORMAT_VERSION}")
    labels = body.get("labels", "")
    if not isinstance(labels, str) or len(labels) > _MAX_CLASSES or any(ch not in "0123" for ch in labels):
        raise ValueError("fingerprint labels must be a string of bucket levels 0-3")
    samples = body.get("samples")
    if samples not in SAMPLE_BUCKETS:
        raise ValueError(f"fingerprint sample bucket {samples!r} is not one of {', '.join(SAMPLE_BUCKETS)}")
    entropy = body.get("entropy")
    if isinstance(entropy, bool) or not isinstance(entropy, int | float) or not math.isfinite(entropy) or not 0 <= entropy <= 16:
        raise ValueError("fingerprint entropy must be a number of bits in [0, 16]")
    grad = body.get("grad")
    return Fingerprint(
        labels=tuple(int(ch) for ch in labels),
        entropy=float(entropy),
        samples=str(samples),
        moments=_decode_pairs(body.get("moments", ""), "moments"),
        gradient=None if grad is None else _decode_pairs(grad, "grad"),
    )


def _as_fingerprint(fp: Fingerprint | Mapping[str, Any]) -> Fingerprint:
    return fp if isinstance(fp, Fingerprint) else parse_fingerprint(fp)


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def label_buckets(counts: Iterable[int]) -> tuple[int, ...]:
    """Quantize per-class counts into bucket levels 0 (absent), 1 (low), 2 (medium), 3 (high)."""
    counts = [int(c) for c in counts]
    total = sum(counts)
    k = len(counts)
    if total <= 0 or k == 0:
        return tuple(0 for _ in counts)
    levels = []
    for c in counts:
        share = c / total * k  # 1.0 = the uniform share
        levels.append(0 if c == 0 else 1 if share < 0.5 else 2 if share < 1.5 else 3)
    return tuple(levels)


def bucket_entropy(levels: Iterable[int]) -> float:
    """Shannon entropy (bits) of the distribution the buckets stand for, rounded to 0.001."""
    weights = [_REPRESENTATIVE[level] for level in levels]
    total = sum(weights)
    if total <= 0:
        return 0.0
    h = -sum(w / total * math.log2(w / total) for w in weights if w > 0)
    return round(h, 3)


def label_entropy(counts: Iterable[int]) -> float:
    """Label entropy as peers attach it to updates (``meta["label_entropy"]``): from the quantized buckets."""
    return bucket_entropy(label_buckets(counts))


def sample_bucket(n: int) -> str:
    if n < 10:
        return SAMPLE_BUCKETS[0]
    return SAMPLE_BUCKETS[min(int(math.log10(n)), len(SAMPLE_BUCKETS) - 1)]


def _round4(value: float) -> float:
    """What the wire carries (%.4g), so a local Fingerprint equals the one its peers parse."""
    return float(f"{value:.4g}")


def _group_index(d: int, groups: int) -> tuple[torch.Tensor, int]:
    g = max(1, min(groups, d))
    return torch.div(torch.arange(d) * g, d, rounding_mode="floor"), g


def _noisy_moments(mean: torch.Tensor, var: torch.Tensor, groups: int, noise: float, gen: torch.Generator | None) -> tuple[tuple[float, float], ...]:
    """Per-group (mean of means, mean of variances) with noise scaled to each group's spread."""
    d = mean.numel()
    if d == 0:
        return ()
    index, g = _group_index(d, groups)
    size = torch.bincount(index, minlength=g).to(torch.float64)
    g_mean = torch.zeros(g, dtype=torch.float64).index_add_(0, index, mean.to(torch.float64)) / size
    g_var = torch.zeros(g, dtype=torch.float64).index_add_(0, index, var.to(torch.float64)) / size
    if noise > 0:
        g_mean = g_mean + noise * g_var.sqrt() * torch.randn(g, generator=gen, dtype=torch.float64)
        g_var = (g_var + noise * g_var * torch.randn(g, generator=gen, dtype=torch.float64)).clamp(min=0.0)
    return tuple((_round4(m), _round4(v)) for m, v in zip(g_mean.tolist(), g_var.tolist(), strict=True))


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch_parts(batch)


def _class_labels(y: torch.Tensor | None) -> torch.Tensor | None:
    if y is None:
        return None
    if y.dim() >= 2 and y.shape[-1] > 1:  # one-hot or probabilities
        return y.reshape(-1, y.shape[-1]).argmax(dim=1)
    if y.is_floating_point():
        return None  # regression targets: no label distribution
    return y.reshape(-1).to(torch.long)


def compute_fingerprint(
    loader: Iterable[Any],
    *,
    num_classes: int | None = None,
    noise: float = 0.1,
    moment_groups: int = 8,
    gradient_moments: bool = False,
    model: nn.Module | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Fingerprint:
    """One pass over ``loader`` (batches of (inputs, labels)) -> a Fingerprint; ``.to_body()`` for the wire.

    ``num_classes`` comes from the manifest's task (else the largest label seen + 1). Gradient moments need
    ``gradient_moments=True`` and a ``model`` and ``loss_fn``; they use one batch and leave the model unchanged.
    """
    if noise < 0:
        raise ValueError("fingerprint noise must be >= 0")
    n = 0
    feat_sum: torch.Tensor | None = None
    feat_sq: torch.Tensor | None = None
    label_counts = torch.zeros(num_classes or 0, dtype=torch.long)
    has_labels = False
    first_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    for batch in loader:
        x, y = _split_batch(batch)
        x2 = x.detach().reshape(x.shape[0], -1).to(torch.float64)
        feat_sum = x2.sum(0) if feat_sum is None else feat_sum + x2.sum(0)
        feat_sq = (x2 * x2).sum(0) if feat_sq is None else feat_sq + (x2 * x2).sum(0)
        n += x2.shape[0]
        labels = _class_labels(y)
        if labels is not None:
            has_labels = True
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError("class labels must be non-negative integers")
            top = int(labels.max()) + 1 if labels.numel() else 0
            if num_classes is not None and top > num_classes:
                raise ValueError(f"label {top - 1} out of range for {num_classes} classes")
            if top > label_counts.numel():
                label_counts = torch.cat([label_counts, torch.zeros(top - label_counts.numel(), dtype=torch.long)])
            label_counts += torch.bincount(labels, minlength=label_counts.numel())
        if first_batch is None and y is not None:
            first_batch = (x, y)
    if n == 0 or feat_sum is None or feat_sq is None:
        raise ValueError("training loader yielded no samples: cannot fingerprint an empty data set")
    if label_counts.numel() > _MAX_CLASSES:
        raise ValueError(f"{label_counts.numel()} classes exceed the fingerprint limit of {_MAX_CLASSES}")
    mean = feat_sum / n
    var = (feat_sq / n - mean * mean).clamp(min=0.0)
    buckets = label_buckets(label_counts.tolist()) if has_labels else ()
    gradient = None
    if gradient_moments:
        if model is None or loss_fn is None or first_batch is None:
            raise ValueError("gradient moments need a model, a loss function and labelled data")
        gradient = _gradient_moments(model, loss_fn, first_batch, moment_groups, noise, generator)
    return Fingerprint(
        labels=buckets,
        entropy=bucket_entropy(buckets),
        samples=sample_bucket(n),
        moments=_noisy_moments(mean, var, moment_groups, noise, generator),
        gradient=gradient,
    )


def fingerprint_for(
    manifest: Any,
    loader: Iterable[Any],
    *,
    model: nn.Module | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    noise_seed: int | None = None,
) -> Fingerprint:
    """The node's own fingerprint under the manifest's rules: classes from the task, ``privacy.fingerprint_noise``,
    ``privacy.gradient_moments``; noise from ``noise_seed`` when given, else from the OS. Compute it once at
    start-up, only when ``manifest.privacy.fingerprint`` is true (the entropy is a statistic of the buckets), and

    - attach ``fp.entropy`` as ``meta["label_entropy"]`` to every update (and to the local PeerUpdate), so
      EntropyWeightedAvg has real weights;
    - send ``fp.to_body()`` as a ``MESSAGE_KIND`` control message to each discovered peer and pass it to
      ``topology.observe_fingerprint(self_id, body)`` (AffinityTopology compares every peer's fingerprint with its
      own).
    """
    task = manifest.task
    num_classes = None
    if task.type == "classification" and task.label_type in ("integer", "one_hot"):
        num_classes = math.prod(task.output_shape)
    privacy = manifest.privacy
    return compute_fingerprint(
        loader,
        num_classes=num_classes,
        noise=privacy.fingerprint_noise,
        gradient_moments=privacy.gradient_moments,
        model=model,
        loss_fn=loss_fn,
        generator=torch.Generator().manual_seed(noise_seed if noise_seed is not None else secrets.randbits(63)),
    )


def _gradient_moments(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    groups: int,
    noise: float,
    gen: torch.Generator | None,
) -> tuple[tuple[float, float], ...]:
    params = [q for q in model.parameters() if q.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(q)).reshape(-1) for g, q in zip(grads, params, strict=True)]).detach()
    index, g = _group_index(flat.numel(), groups)
    size = torch.bincount(index, minlength=g).to(torch.float64)
    f64 = flat.to(torch.float64)
    g_mean = torch.zeros(g, dtype=torch.float64).index_add_(0, index, f64) / size
    g_sq = torch.zeros(g, dtype=torch.float64).index_add_(0, index, f64 * f64) / size
    g_std = (g_sq - g_mean * g_mean).clamp(min=0.0).sqrt()
    if noise > 0:
        g_mean = g_mean + noise * g_std * torch.randn(g, generator=gen, dtype=torch.float64)
        g_std = (g_std + noise * g_std * torch.randn(g, generator=gen, dtype=torch.float64)).clamp(min=0.0)
    return tuple((_round4(m), _round4(s)) for m, s in zip(g_mean.tolist(), g_std.tolist(), strict=True))


# ----------------------------------------------------------------------------------------------------------------
# Similarity


def _label_similarity(a: tuple[int, ...], b: tuple[int, ...]) -> float | None:
    """1 - total variation distance between the bucketed distributions."""
    if not a or not b or len(a) != len(b):
        return None
    pa = [_REPRESENTATIVE[x] for x in a]
    pb = [_REPRESENTATIVE[x] for x in b]
    sa, sb = sum(pa), sum(pb)
    if sa <= 0 or sb <= 0:
        return None
    return 1.0 - 0.5 * sum(abs(x / sa - y / sb) for x, y in zip(pa, pb, strict=True))


def _moment_similarity(a: tuple[tuple[float, float], ...], b: tuple[tuple[float, float], ...]) -> float | None:
    """exp(-mean standardized distance): mean gap in pooled standard deviations plus half the log variance ratio."""
    if not a or not b or len(a) != len(b):
        return None
    eps = 1e-12
    total = 0.0
    for (ma, va), (mb, vb) in zip(a, b, strict=True):
        pooled = math.sqrt(max((va + vb) / 2.0, 0.0) + eps)
        total += abs(ma - mb) / pooled + 0.5 * abs(math.log((max(va, 0.0) + eps) / (max(vb, 0.0) + eps)))
    return math.exp(-total / len(a))


def _gradient_similarity(a: tuple[tuple[float, float], ...] | None, b: tuple[tuple[float, float], ...] | None) -> float | None:
    """(1 + cosine) / 2 between the per-group gradient means."""
    if not a or not b or len(a) != len(b):
        return None
    va = [m for m, _ in a]
    vb = [m for m, _ in b]
    na = math.sqrt(sum(x * x for x in va))
    nb = math.sqrt(sum(x * x for x in vb))
    if na == 0 or nb == 0:
        return None
    return (1.0 + sum(x * y for x, y in zip(va, vb, strict=True)) / (na * nb)) / 2.0


def component_similarities(fp_a: Fingerprint | Mapping[str, Any], fp_b: Fingerprint | Mapping[str, Any]) -> dict[str, float | None]:
    """Per-signal similarities in [0, 1]; None where either side lacks the signal or the shapes differ."""
    a, b = _as_fingerprint(fp_a), _as_fingerprint(fp_b)
    return {
        "label": _label_similarity(a.labels, b.labels),
        "moments": _moment_similarity(a.moments, b.moments),
        "gradient": _gradient_similarity(a.gradient, b.gradient),
    }


def similarity(
    fp_a: Fingerprint | Mapping[str, Any],
    fp_b: Fingerprint | Mapping[str, Any],
    weights: Mapping[str, float] | None = None,
) -> float:
    """Weighted mean of the available component similarities, in [0, 1]; 0.5 (no information) if none apply."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    parts = component_similarities(fp_a, fp_b)
    num = den = 0.0
    for key, value in parts.items():
        w = weights.get(key, 0.0)
        if value is not None and w > 0:
            num += w * value
            den += w
    return num / den if den > 0 else 0.5
