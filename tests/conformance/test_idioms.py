"""Ordinary idioms of code we did not write, under dp and model_split (issue 20): a loss built on
transformers' ``output_hidden_states`` / ``output_attentions`` (hooks registered lazily), code asking the
model for ``device`` / ``dtype`` / ``next(parameters())``, a list with one name per sample in the batch,
and ``generate()`` in ``predict_step``. Each equals one device (float64 where trained). Slow (whole
transformers models, Trainer runs); the fast checks of the same idioms are in tests/dp/test_replica_idioms.py.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_gpupar import ModelSplitStrategy
from tests.conformance import architectures as arch
from tests.helpers.conformance import Batch, Case, assert_same_training, fit, reference
from tests.helpers.trainer import QUIET

pytestmark = pytest.mark.slow


def by_name(name: str) -> Case:
    return next(c for c in arch.CASES if c.name == name)


def hidden_states_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The classifier's loss plus every hidden state's and attention map's mean square."""
    out = model(input_ids=batch["tokens"], output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2  # embeddings + 2 layers, every step
    states = sum(h.pow(2).mean() for h in out.hidden_states) + sum(a.pow(2).mean() for a in out.attentions)
    return F.cross_entropy(out.logits, batch["y"]) + states


def asks_the_model_about_itself(model: nn.Module, batch: Batch) -> Tensor:
    """Builds its attention mask from ``model.device`` / ``model.dtype`` and ``next(model.parameters())``,
    and checks ``num_parameters()``, as user code and transformers' own helpers do."""
    first = next(model.parameters())
    assert model.dtype == first.dtype == torch.float64 and model.num_parameters() > 0
    mask = torch.ones(batch["tokens"].shape, dtype=first.dtype, device=model.device).long()
    return arch.next_token_loss(model(input_ids=batch["tokens"], attention_mask=mask).logits, batch)


def named_tokens(n: int, g: torch.Generator) -> Batch:
    batch: dict[str, Any] = arch.tokens(n, g)
    batch["names"] = [f"t{int(t)}" for t in batch["tokens"][:, 0]]  # one per sample, as default_collate
    return batch


def names_follow_their_samples(model: nn.Module, batch: Batch) -> Tensor:
    names: Any = batch["names"]
    assert names == [f"t{int(t)}" for t in batch["tokens"][:, 0]], names  # paired with its own sample
    return arch.causal_lm(model, batch)


IDIOMS = [
    Case(
        "bert_hidden_states", arch.bert, arch.labelled_tokens, hidden_states_loss, by_name("bert").placement
    ),
    Case(
        "llama_device_and_dtype",
        arch.llama,
        arch.tokens,
        asks_the_model_about_itself,
        by_name("llama").placement,
    ),
    Case(
        "gpt2_names_per_sample",
        arch.gpt2,
        named_tokens,
        names_follow_their_samples,
        by_name("gpt2").placement,
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in IDIOMS])
@pytest.mark.parametrize("strategy", ["dp-2", "dp-3", "model_split"])
def test_idioms_train_as_on_one_device(case: Case, strategy: str) -> None:
    if strategy == "model_split":
        trained = fit(case, strategy=ModelSplitStrategy(placement=dict(case.placement)), devices=2)
    else:
        trained = fit(case, strategy="dp", devices=int(strategy[-1]))
    assert_same_training(trained, reference(case))


class Generates(pl.LightningModule):
    """Greedy ``generate()`` in ``predict_step`` (4 new tokens, never stopping early)."""

    def __init__(self, build: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build()

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        prompts = batch["tokens"]
        options: dict[str, Any] = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
        return self.model.generate(prompts, attention_mask=torch.ones_like(prompts), **options)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "mixtral"])
def test_generate_in_predict_step_equals_one_device(name: str) -> None:
    case = by_name(name)
    loader = DataLoader([case.batch(5, torch.Generator().manual_seed(3))], batch_size=None)  # type: ignore[arg-type]
    module = Generates(case.build)

    def predict(**kwargs: Any) -> Tensor:
        out = pl.Trainer(**{**QUIET, "accelerator": "cpu", **kwargs}).predict(module, loader)
        assert out is not None and len(out) == 1
        return out[0]  # type: ignore[return-value]

    want = predict(devices=1)
    assert want.shape[1] >= 4
    torch.testing.assert_close(predict(strategy="dp", devices=2), want, rtol=0, atol=0)
    split = ModelSplitStrategy(placement=dict(case.placement))
    torch.testing.assert_close(predict(strategy=split, devices=2), want, rtol=0, atol=0)
