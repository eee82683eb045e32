"""Checks of the app's ``model`` and ``data`` groups and top-level keys, run before anything is built.

Hydra's schemas check types; these check values and how the groups fit together (``model=mlp
data=tokens`` would fail in the first matmul, ``data.batch_size=0`` inside the DataLoader,
``monitor=val_los`` after the first epoch). Each error names the override, what is valid and a fix.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from examples.data import DIGITS_SAMPLES, split_sizes

#: Metrics the example models log: what ``monitor`` can watch.
LOGGED_METRICS = ("val_loss", "val_acc", "train_loss", "train_acc")
#: What ``monitor_mode`` accepts (null: from the metric's name).
MONITOR_MODES = (None, "min", "max")
DIGITS_FEATURES, DIGITS_CLASSES, TOKEN_CLASSES = 64, 10, 2
#: Lightning's seed bounds (``seed_everything`` replaces a seed outside them with a random one).
SEED_RANGE = (0, 2**32 - 1)


class AppConfigError(ValueError):
    """A value of the app's config that cannot work; the message names it, what is valid and a fix."""


def validate_app_config(cfg: DictConfig) -> None:
    """Check ``cfg.data``, ``cfg.model``, their pairing, ``monitor`` and ``seed``."""
    _check_data(cfg.data)
    _check_model(cfg.model)
    _check_pair(_name(cfg.model), cfg.model, _name(cfg.data), cfg.data)
    if cfg.monitor not in LOGGED_METRICS:
        raise AppConfigError(
            f"monitor={cfg.monitor!r} is not a metric the models log: valid are {', '.join(LOGGED_METRICS)}. "
            "Write e.g. monitor=val_loss."
        )
    monitor_mode(cfg)
    _check_split(cfg)
    low, high = SEED_RANGE
    if not low <= cfg.seed <= high:
        raise AppConfigError(f"seed={cfg.seed}: valid seeds are {low}..{high}. Write e.g. seed=0.")


def monitor_mode(cfg: DictConfig) -> str:
    """``min`` or ``max``: whether a lower or a higher ``monitor`` value marks the best checkpoint.

    From the metric's name (``*_acc``: max, ``*_loss``: min) unless ``monitor_mode`` says it; a mode
    that contradicts the metric is refused (the "best" checkpoint would be the worst one).
    """
    given = cfg.get("monitor_mode")
    if given not in MONITOR_MODES:
        raise AppConfigError(
            f"monitor_mode={given!r}: valid are null (from the metric: max for accuracy, min for loss), "
            "min and max. Write e.g. monitor_mode=null."
        )
    metric = str(cfg.monitor)
    known = "max" if metric.endswith("_acc") else "min" if metric.endswith("_loss") else None
    if known is not None and given is not None and given != known:
        better = "higher" if known == "max" else "lower"
        raise AppConfigError(
            f"monitor_mode={given} with monitor={metric}: a {better} {metric} is better, so the "
            f"checkpoint kept as best would be the worst. Write monitor_mode={known}, or leave it null."
        )
    mode = given or known
    if mode is None:
        raise AppConfigError(
            f"monitor={metric}: the app cannot tell whether a higher or a lower value is better. "
            "Write monitor_mode=max or monitor_mode=min."
        )
    return str(mode)


def _check_split(cfg: DictConfig) -> None:
    """Validation must get samples (the best checkpoint is chosen on them), and so must a test run."""
    data = cfg.data
    if "val_fraction" not in data or "test_fraction" not in data:
        return  # a data module of the user's own
    if "num_samples" in data:
        total = int(data.num_samples)
    elif _name(data) == "DigitsDataModule":
        total = DIGITS_SAMPLES
    else:
        return
    _, n_val, n_test = split_sizes(total, data.val_fraction, data.test_fraction)
    held = [("val_fraction", n_val, "validation", "")]
    if cfg.get("test", True):
        held.append(("test_fraction", n_test, "test", " (or test=false to train without a test)"))
    for key, count, use, alternative in held:
        if count == 0:
            fraction = data[key]
            raise AppConfigError(
                f"data.{key}={fraction} leaves 0 of the {total} samples for {use} ({total} x {fraction} "
                f"rounds down to 0). Write data.{key}={_fraction_for_one(total)} or more{alternative}."
            )


def _fraction_for_one(total: int) -> float:
    """The smallest round fraction that gives at least one sample of ``total``."""
    fraction = 0.01
    while int(total * fraction) < 1:
        fraction *= 10
    return round(fraction, 4)


def _name(node: DictConfig) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _check_data(data: DictConfig) -> None:
    _positive(data, "data", "batch_size", 1, "e.g. data.batch_size=64")
    for key in ("val_fraction", "test_fraction"):
        value = data.get(key)
        if value is not None and not 0 < value < 1:
            raise AppConfigError(
                f"data.{key}={value}: the share of the samples held out must lie strictly between 0 and 1. "
                f"Write e.g. data.{key}=0.15."
            )
    held_out = data.get("val_fraction", 0) + data.get("test_fraction", 0)
    if held_out >= 1:
        raise AppConfigError(
            f"data.val_fraction={data.val_fraction} and data.test_fraction={data.test_fraction} hold out "
            f"{held_out:.0%} of the samples, leaving none to train on. Keep their sum below 1, "
            "e.g. 0.15 each."
        )
    if "num_samples" in data:
        _positive(data, "data", "num_samples", 10, "e.g. data.num_samples=4096")
        _positive(data, "data", "seq_len", 1, "e.g. data.seq_len=15")
        _positive(data, "data", "vocab_size", 2, "e.g. data.vocab_size=16")


def _check_model(model: DictConfig) -> None:
    if "lr" in model and not model.lr > 0:
        raise AppConfigError(
            f"model.lr={model.lr}: the learning rate must be > 0. Write e.g. model.lr=0.001."
        )
    _positive(model, "model", "num_classes", 2, "e.g. model.num_classes=10")
    for key in ("in_features", "channels", "d_model", "nhead", "num_layers", "max_len", "vocab_size"):
        _positive(model, "model", key, 1, f"e.g. model.{key}=4")
    hidden = model.get("hidden")
    if hidden is not None and any(h < 1 for h in hidden):
        raise AppConfigError(
            f"model.hidden={list(hidden)}: every hidden layer needs a width >= 1. "
            "Write e.g. model.hidden=[128,128]."
        )
    if "nhead" in model and model.d_model % model.nhead:
        raise AppConfigError(
            f"model.d_model={model.d_model} is not divisible by model.nhead={model.nhead}: each attention "
            "head takes d_model / nhead features. Choose nhead among the divisors of d_model, e.g. "
            f"model.nhead={_divisor_near(model.d_model, model.nhead)}."
        )


def _check_pair(model_name: str, model: DictConfig, data_name: str, data: DictConfig) -> None:
    """The model reads what the data gives: float features, images or token ids, and enough classes."""
    wants = {
        "MLPClassifier": ("DigitsDataModule", False, "model=mlp", "flat 64-feature digits (data=digits)"),
        "CNNClassifier": ("DigitsDataModule", True, "model=cnn", "digit images (data=digits_images)"),
        "TransformerClassifier": (
            "MajorityTokenDataModule",
            None,
            "model=transformer",
            "tokens (data=tokens)",
        ),
    }
    if model_name not in wants or data_name not in ("DigitsDataModule", "MajorityTokenDataModule"):
        return  # a model or data module of the user's own: nothing known about it
    data_class, images, choice, reads = wants[model_name]
    if data_name != data_class or (images is not None and bool(data.get("as_images")) != images):
        given = (
            "token ids (data=tokens)"
            if data_name == "MajorityTokenDataModule"
            else (
                "digit images (data.as_images=true)"
                if data.get("as_images")
                else "flat digits (data.as_images=false)"
            )
        )
        raise AppConfigError(
            f"{choice} reads {reads}, but the data gives {given}. Choose the model without data= (each model "
            "brings its data), or a model for this data: model=mlp for flat digits, model=cnn for digit "
            "images, model=transformer for tokens."
        )
    if data_name == "DigitsDataModule":
        _needs(model, "num_classes", DIGITS_CLASSES, "the digits have 10 classes")
        if model_name == "MLPClassifier" and model.in_features != DIGITS_FEATURES:
            raise AppConfigError(
                f"model.in_features={model.in_features}, but the digits have {DIGITS_FEATURES} features. "
                f"Write model.in_features={DIGITS_FEATURES}."
            )
        return
    _needs(model, "num_classes", TOKEN_CLASSES, "the token task has 2 classes")
    _needs(
        model, "vocab_size", data.vocab_size, f"the data's tokens go up to data.vocab_size={data.vocab_size}"
    )
    _needs(model, "max_len", data.seq_len, f"the sequences have data.seq_len={data.seq_len} tokens")


def _needs(model: DictConfig, key: str, low: int, why: str) -> None:
    if model[key] < low:
        raise AppConfigError(f"model.{key}={model[key]}, but {why}: write model.{key}={low} or more.")


def _positive(node: DictConfig, group: str, key: str, low: int, example: str) -> None:
    value: Any = node.get(key)
    if value is not None and value < low:
        raise AppConfigError(f"{group}.{key}={value}: it must be >= {low}. Write {example}.")


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))
