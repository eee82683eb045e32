"""Hydra schemas of the example app: the top-level config and the ``model`` and ``data`` groups.

Each YAML file in ``conf/model`` and ``conf/data`` extends one of these through its defaults list, so
``model.lr=abc`` or ``data.batch_sz=8`` fails at composition with Hydra's own message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lightning_gpupar.config import StrategyConfig, TrainerConfig, register_configs


@dataclass
class MLPConfig:
    _target_: str = "examples.models.MLPClassifier"
    in_features: int = 64
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    num_classes: int = 10
    lr: float = 3e-3


@dataclass
class CNNConfig:
    _target_: str = "examples.models.CNNClassifier"
    channels: int = 32
    num_classes: int = 10
    lr: float = 3e-3


@dataclass
class TransformerConfig:
    _target_: str = "examples.models.TransformerClassifier"
    vocab_size: int = 16
    d_model: int = 64
    nhead: int = 4
    num_layers: int = 4
    num_classes: int = 2
    max_len: int = 64
    lr: float = 1e-3


@dataclass
class CausalLMConfig:
    """A causal LM fine-tuned with LoRA (examples/causal_lm.py); ``lora_r: 0`` trains every weight."""

    _target_: str = "examples.causal_lm.CausalLM"
    pretrained: str | None = None
    arch: str = "llama"
    vocab_size: int = 16
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    max_len: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    device_map: Any = None
    lr: float = 1e-3
    example_shape: list[int] = field(default_factory=lambda: [1, 16])


@dataclass
class DigitsDataConfig:
    _target_: str = "examples.data.DigitsDataModule"
    as_images: bool = False
    batch_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


@dataclass
class TokensDataConfig:
    _target_: str = "examples.data.MajorityTokenDataModule"
    num_samples: int = 4096
    seq_len: int = 15
    vocab_size: int = 16
    batch_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


@dataclass
class AppConfig:
    """Top level: what to train, on what, how; ``seed`` seeds everything; ``test`` runs the test set.

    ``ckpt_path`` continues a run: ``last`` (this run directory's newest checkpoint; none yet: start
    fresh) or a checkpoint file. ``checkpoint_every_n_steps`` also saves ``last.ckpt`` mid-epoch.
    ``monitor_mode`` (null: from the metric, max for ``*_acc``, min for ``*_loss``) picks the best
    checkpoint. ``stop_on_nonfinite_loss`` stops training at the first NaN or infinite training loss.
    """

    model: Any = MISSING
    data: Any = MISSING
    strategy: StrategyConfig = MISSING
    trainer: TrainerConfig = MISSING
    seed: int = 0
    test: bool = True
    monitor: str = "val_loss"
    monitor_mode: str | None = None
    ckpt_path: str | None = None
    checkpoint_every_n_steps: int | None = None
    stop_on_nonfinite_loss: bool = True


def register_app_configs() -> None:
    """Register every schema the app's YAML files extend."""
    store = ConfigStore.instance()
    register_configs(store)
    store.store(name="app_schema", node=AppConfig)
    store.store(group="schema/model", name="mlp", node=MLPConfig)
    store.store(group="schema/model", name="cnn", node=CNNConfig)
    store.store(group="schema/model", name="transformer", node=TransformerConfig)
    store.store(group="schema/model", name="causal_lm", node=CausalLMConfig)
    store.store(group="schema/data", name="digits", node=DigitsDataConfig)
    store.store(group="schema/data", name="tokens", node=TokensDataConfig)
