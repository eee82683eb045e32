"""Hydra-side helpers imported lazily, so a test module that also holds non-Hydra tests (CUDA ones among
them) imports on a machine without hydra-core/omegaconf; its Hydra tests skip there (``compose_app``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def build_trainer(cfg: Any, **kwargs: Any) -> pl.Trainer:
    """:func:`lightning_gpupar.config.build_trainer`, imported on first use (it imports Hydra)."""
    from lightning_gpupar.config import build_trainer as build

    return build(cfg, **kwargs)
