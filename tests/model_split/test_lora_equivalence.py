"""LoRA end to end: tiny random Llama / Qwen2 causal LMs with PEFT LoRA adapters train under model_split
(a map, auto, a model carrying hf_device_map), dp (2 and 3 devices, uneven batches) and ddp_split (2
processes x 2 CPU devices) exactly as on one device, in float64: the same losses, adapter gradients and
adapter weights. A causal LM's forward is no chain of stages (the mask and rotary embeddings are made
between the embedding and the layers), so micro-batches (``chunks=2``) run on a LoRA'd chain, our
TransformerNet. Plans count gradients and optimizer state for the adapters only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.model_split import PipelineError, plan_placement
from tests.helpers.lora import (
    HF_DEVICE_MAP,
    LoraChain,
    LoraLM,
    dispatch,
    token_loader,
    tokens,
    trainable_weights,
)
from tests.helpers.programs import python, run_bounded
from tests.helpers.trainer import TRAINING_ONLY

pytest.importorskip("peft")
RTOL, ATOL = 1e-10, 1e-12
DECODER = "model.base_model.model.model"
#: Embedding and the first layer on position 0, the other layer on 1 (lm_head, norm, rotary: default 1).
MAP = {f"{DECODER}.embed_tokens": 0, f"{DECODER}.layers.0": 0, f"{DECODER}.layers.1": 1}


def fit(module: pl.LightningModule, **trainer: Any) -> pl.LightningModule:
    options: dict[str, Any] = {**TRAINING_ONLY, "accelerator": "cpu", "max_epochs": 2, "devices": 1}
    options.update(trainer)
    pl.Trainer(**options).fit(module, token_loader())
    return module


def assert_equivalent(run: Any, reference: Any) -> None:
    assert len(run.losses) == len(reference.losses) == 4
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(reference.losses), rtol=RTOL, atol=ATOL)
    for got, want in zip(run.grads, reference.grads, strict=True):
        assert got.keys() == want.keys() and all(".lora_" in k for k in want)  # the adapters only
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL, msg=key)
    want_weights = trainable_weights(reference)
    for key, value in trainable_weights(run).items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, want_weights[key], rtol=RTOL, atol=ATOL, msg=key)


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "model_split-auto-2": lambda: {"strategy": "model_split", "devices": 2},
    "model_split-auto-3": lambda: {"strategy": "model_split", "devices": 3},
    "model_split-map": lambda: {"strategy": ModelSplitStrategy(MAP, default_device=1), "devices": 2},
    "dp-2": lambda: {"strategy": "dp", "devices": 2},
    "dp-3": lambda: {"strategy": "dp", "devices": 3},  # a batch of 4 over 3 devices: 2 + 1 + 1
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_trains_as_on_one_device(arch: str, case: str) -> None:
    reference = fit(LoraLM(arch, layers=2))
    run = fit(LoraLM(arch, layers=2), **CASES[case]())
    assert_equivalent(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_device_mapped_lora_model_trains_as_on_one_device(arch: str) -> None:
    reference = fit(LoraLM(arch, layers=2))
    module = LoraLM(arch, layers=2)
    dispatch(module)  # accelerate's hooks on, hf_device_map = HF_DEVICE_MAP
    run = fit(module, strategy=ModelSplitStrategy("device_map"), devices=2)
    assert_equivalent(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [1, 2])
def test_a_lora_chain_trains_as_on_one_device_with_micro_batches(chunks: int) -> None:
    reference = fit(LoraChain(layers=2))
    run = fit(LoraChain(layers=2), strategy=ModelSplitStrategy("auto", chunks=chunks), devices=2)
    assert_equivalent(run, reference)


def test_a_causal_lm_is_no_chain_and_micro_batches_are_refused_before_training() -> None:
    with pytest.raises(PipelineError, match=r"does not receive the forward's one input unchanged"):
        fit(LoraLM(layers=2), strategy=ModelSplitStrategy("auto", chunks=2), devices=2, max_epochs=1)


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["auto", "device_map"])
def test_ddp_split_with_lora_matches_one_device(tmp_path: Path, placement: str) -> None:
    """2 processes x 2 CPU devices, a split LoRA model in each; with ``device_map`` each process's model is
    dispatched by accelerate and carries an hf_device_map (what Accelerate refuses when distributed)."""
    finished = run_bounded(python("lora_ddp_split.py", str(tmp_path), placement), timeout=300, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reference = fit(LoraLM(layers=2), max_epochs=1)
    assert [r["positions"] for r in ranks] == [[0, 1], [0, 1]]  # each copy split over its own 2 devices
    if (
        placement == "device_map"
    ):  # both ranks placed by the map: the handed plan is the one each model carries
        for rank in ranks:
            for key, position in HF_DEVICE_MAP.items():
                assert rank["entries"][f"model.base_model.model.{key}"] == position, key
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(reference.losses), rtol=RTOL, atol=ATOL)
    want = trainable_weights(reference)
    for rank in ranks:
        assert rank["weights"].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(rank["weights"][key], value, rtol=RTOL, atol=ATOL, msg=key)


def test_plans_count_gradients_and_optimizer_state_for_the_adapters_only() -> None:
    module = LoraLM(layers=2)
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    assert 0 < trainable < frozen
    cpus = [torch.device("cpu")] * 2
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    plan = plan_placement(module, cpus, "auto", optimizer=optimizer, example_input=tokens(2))
    parts = plan.memory_per_position()
    assert sum(p.params for p in parts) == trainable + frozen
    assert sum(p.grads for p in parts) == trainable
    assert sum(p.optimizer for p in parts) == 2 * trainable
    full = LoraLM(layers=2).requires_grad_(True)
    full_plan = plan_placement(full, cpus, "auto", example_input=tokens(2))
    assert sum(p.grads for p in full_plan.memory_per_position()) == trainable + frozen
