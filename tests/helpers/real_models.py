"""Tiny, randomly initialised models from libraries we do not write (nothing is downloaded), and helpers
that read a placement plan the way the tests judge it: chain units, contiguity, brute-force balance."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from examples.models import TransformerNet
from lightning_gpupar.model_split import PlacementPlan

VOCAB, SEQ = 100, 16


def tiny_transformers(layers: int = 6) -> dict[str, Callable[[], nn.Module]]:
    """GPT-2 (embedding tied to lm_head), BERT and a Llama-style decoder: width 32, ``layers`` layers."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, n_positions=SEQ, **common)
        ),
        "bert": lambda: transformers.BertModel(
            transformers.BertConfig(
                num_hidden_layers=layers,
                hidden_size=32,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=SEQ,
                **common,
            )
        ),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                num_hidden_layers=layers,
                hidden_size=32,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=SEQ,
                **common,
            )
        ),
    }


def our_transformer(layers: int = 6) -> nn.Module:
    return TransformerNet(VOCAB, 32, 2, layers, 3, SEQ)


def tokens(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(0))


def chain_costs(root: nn.Module, plan: PlacementPlan) -> tuple[list[int], list[int]]:
    """The plan's units in execution order as (training bytes, position); an entry whose parameters are
    all tied to an earlier entry's (GPT-2's lm_head) is folded into that entry: they are one unit."""
    owner: dict[int, int] = {}
    costs: list[int] = []
    positions: list[int] = []
    for entry in plan.entries:
        params = list(root.get_submodule(entry.path).parameters(recurse=not entry.own_only))
        earlier = {owner[id(p)] for p in params if id(p) in owner}
        if params and len(earlier) == 1 and all(id(p) in owner for p in params):
            (index,) = earlier
            assert positions[index] == entry.position, f"{entry.path} is split from its tied parameters"
            costs[index] += entry.memory.total
            continue
        for p in params:
            owner.setdefault(id(p), len(costs))
        costs.append(entry.memory.total)
        positions.append(entry.position)
    return costs, positions


def device_totals(costs: Sequence[int], positions: Sequence[int], devices: int) -> list[int]:
    totals = [0] * devices
    for cost, position in zip(costs, positions, strict=True):
        totals[position] += cost
    return totals


def brute_force_best(costs: Sequence[int], devices: int) -> list[int]:
    """Per-device totals of the contiguous split with the smallest largest total (every split tried)."""
    best: list[int] | None = None
    n = len(costs)
    for cuts in itertools.combinations_with_replacement(range(n + 1), devices - 1):
        bounds = [0, *cuts, n]
        totals = [sum(costs[bounds[i] : bounds[i + 1]]) for i in range(devices)]
        if best is None or max(totals) < max(best):
            best = totals
    assert best is not None
    return best


def spread(totals: Sequence[int]) -> float:
    """How far apart the device totals are: largest / smallest - 1 (``inf`` with an empty device)."""
    return max(totals) / min(totals) - 1 if min(totals) > 0 else float("inf")
