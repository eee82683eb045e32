"""Ordinary idioms of user and library code inside a dp replica (issue 20): ``next(self.parameters())``,
``self.dtype``, a ``StopIteration`` escaping a step, hooks registered during a step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar.dp.parallel_apply import ReplicaStopIterationError
from lightning_gpupar.dp.replicate import replicate
from tests.helpers.trainer import QUIET

CPU2 = [torch.device("cpu"), torch.device("cpu")]


def data(n: int = 16, batch_size: int = 4) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g)), batch_size=batch_size)


def trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {**QUIET, "accelerator": "cpu", "strategy": "dp", "devices": 2, "max_epochs": 1}
    return pl.Trainer(**{**options, **kwargs})


class FirstParameterNet(pl.LightningModule):
    """Casts its input to ``next(self.parameters()).dtype``; ``stop_in``: that stage's step raises
    StopIteration."""

    def __init__(self, stop_in: str | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.stop_in = stop_in

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.to(next(self.parameters()).dtype))

    def loss(self, batch: Any, step: str) -> Tensor:
        if self.stop_in == step:
            next(iter(()))  # a StopIteration escaping user code
        return self(batch[0]).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch, "fit")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch, "validate"))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch, "test"))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.loss(batch, "predict")
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


# -- point 1: no StopIteration from our threads is read as "data exhausted" ------------------------------


def run_stage(stage: str, module: pl.LightningModule, **kwargs: Any) -> Any:
    t = trainer(**kwargs)
    if stage == "fit":
        t.fit(module, data(), data())
        return t
    return getattr(t, stage)(module, data())


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_a_stop_iteration_in_a_replica_is_an_error_naming_the_replica(stage: str) -> None:
    with pytest.raises(ReplicaStopIterationError, match=r"replica 0 on cpu") as raised:
        run_stage(stage, FirstParameterNet(stop_in=stage), num_sanity_val_steps=0)
    assert isinstance(raised.value, RuntimeError)
    assert isinstance(raised.value.__cause__, StopIteration)


class StopInTransfer(FirstParameterNet):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer.training:
            next(iter(()))
        return batch


def test_a_stop_iteration_in_a_batch_transfer_hook_is_an_error() -> None:
    with pytest.raises(ReplicaStopIterationError, match=r"on_after_batch_transfer.*replica 0 on cpu"):
        trainer().fit(StopInTransfer(), data())


def test_a_stop_iteration_in_a_pipeline_stage_is_an_error_naming_the_stage() -> None:
    from lightning_gpupar.model_split import plan_placement
    from lightning_gpupar.model_split.pipeline import install_pipeline

    class Stop(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            next(iter(()))
            return x

    model = nn.Sequential(nn.Linear(3, 3), Stop())
    install_pipeline(model, plan_placement(model, CPU2, {"0": 0, "1": 1}), ["0", "1"], chunks=2)
    with pytest.raises(ReplicaStopIterationError, match=r"pipeline stage 1 \(Stop\) on cpu") as raised:
        model(torch.randn(4, 3))
    assert isinstance(raised.value.__cause__, StopIteration)


# -- point 2: a replica answers parameters() like its module ----------------------------------------------


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_next_parameters_works_in_every_replica(stage: str) -> None:
    result = run_stage(stage, FirstParameterNet(), num_sanity_val_steps=0)
    if stage == "fit":
        assert result.global_step == 4  # one device: 4 steps; before, a replica's StopIteration ended it at 0
    elif stage == "predict":
        assert len(result) == 4 and all(out.shape == (4, 2) for out in result)
    else:
        assert len(result) == 1 and f"{stage[:4].replace('vali', 'val')}_loss" in result[0]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight


def test_replicas_hold_their_own_copies_as_parameters_and_gradients_reach_the_root() -> None:
    root = Tied()
    replicas = replicate(root, CPU2)
    names = [n for n, _ in root.named_parameters()]
    buffer_names = [n for n, _ in root.named_buffers()]
    for replica in replicas:
        params = dict(replica.named_parameters())
        assert list(params) == names  # the tied weight once, as on the root
        assert params["embed.weight"] is replica.embed.weight is replica.head.weight
        assert next(replica.head.parameters()) is replica.head.weight  # submodules answer too
        assert [n for n, _ in replica.named_buffers()] == buffer_names
        assert replica.norm.running_mean is dict(replica.named_buffers())["norm.running_mean"]
    copy = replicas[1].embed.weight
    assert copy is not root.embed.weight and not copy.is_leaf  # a differentiable copy, not a new leaf
    (copy.sum() * 2).backward()
    assert root.embed.weight.grad is not None and torch.equal(root.embed.weight.grad, torch.full((5, 4), 2.0))
    assert all(p.is_leaf for p in root.parameters())  # the root's parameters stay the optimizer's leaves
    assert dict(root.named_parameters())["embed.weight"] is root.embed.weight


def test_a_replica_of_an_rnn_runs_on_its_own_weights() -> None:
    root = nn.LSTM(3, 4, batch_first=True)
    replica = replicate(root, CPU2)[1]
    assert all(a is b for a, b in zip(replica._flat_weights, replica.parameters(), strict=True))
    out, _ = replica(torch.randn(2, 5, 3))
    out.sum().backward()
    assert all(p.grad is not None for p in root.parameters())


# -- transformers: generate(), hidden states and attentions under dp equal one device ---------------------


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class Generator(pl.LightningModule):
    """``predict_step`` greedily generates 4 tokens with a transformers model, and reports what the model
    says of itself (``device``, ``dtype``, ``num_parameters()``) in the replica that ran it."""

    def __init__(self, build: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build()

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        (prompts,) = batch
        out = self.model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
        n = len(prompts)
        about = f"{self.model.device.type}/{self.model.dtype}/{self.model.num_parameters()}"
        return {"tokens": out, "about": [about] * n}


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_generate_in_predict_step_equals_one_device(build: Any) -> None:
    prompts = torch.randint(3, 32, (5, 3), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(prompts), batch_size=5)
    module = Generator(build)
    want = trainer(devices=1, strategy="auto").predict(module, loader)
    got = trainer(devices=2).predict(module, loader)
    assert got is not None and want is not None and len(got) == len(want) == 1
    assert torch.equal(got[0]["tokens"], want[0]["tokens"])
    assert got[0]["about"] == want[0]["about"] == [f"cpu/torch.float32/{module.model.num_parameters()}"] * 5


def tiny_distilbert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(
        vocab_size=32, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16, dropout=0.0,
        attention_dropout=0.0, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return transformers.DistilBertModel(config)


class HiddenStates(pl.LightningModule):
    """A loss over every hidden state and attention map; logs how many of each the model returned."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_distilbert().double()
        self.losses: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        out = self.model(input_ids=tokens, output_hidden_states=True, output_attentions=True)
        self.log("hidden_states", float(len(out.hidden_states)), reduce_fx="max")
        self.log("attentions", float(len(out.attentions)), reduce_fx="max")
        return sum(h.pow(2).mean() for h in out.hidden_states) + sum(a.pow(2).mean() for a in out.attentions)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        assert self.trainer.callback_metrics["hidden_states"] == 3  # embeddings + 2 layers, every step
        assert self.trainer.callback_metrics["attentions"] == 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def hooks(module: nn.Module) -> dict[str, int]:
    kinds = [
        k for k in vars(nn.Module()) if k.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called"))
    ]
    return {kind: sum(len(getattr(m, kind)) for m in module.modules()) for kind in kinds}


def test_hidden_states_and_attentions_under_dp_equal_one_device_step_after_step() -> None:
    tokens = torch.randint(1, 32, (8, 5), generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(tokens), batch_size=4)
    single, parallel = HiddenStates(), HiddenStates()
    trainer(devices=1, strategy="auto").fit(single, loader)
    before = hooks(parallel.model)
    trainer().fit(parallel, loader)
    assert hooks(parallel.model) == before  # replicas' lazily registered hooks died with them
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-10, atol=1e-12)
    out = parallel.model(input_ids=tokens[:2], output_hidden_states=True)
    assert len(out.hidden_states) == 3  # the root alone afterwards


def test_hooks_registered_in_a_replica_stay_there_and_root_hooks_run_in_every_replica() -> None:
    root = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    seen: list[str] = []
    root[0].register_forward_hook(lambda m, a, o: seen.append("root hook"))
    root[0].register_forward_pre_hook(lambda m, a, kwargs: None, with_kwargs=True)
    root.register_full_backward_hook(lambda m, gi, go: None)
    root.register_state_dict_post_hook(lambda m, sd, prefix, local: None)
    before = hooks(root)
    for replica in replicate(root, CPU2):
        replica[0].register_forward_hook(lambda m, a, o: seen.append("replica hook"))
        replica[0].register_forward_hook(lambda m, a, o: None, always_call=True)
        replica.register_full_backward_hook(lambda m, gi, go: None)
        replica(torch.randn(2, 3))
    assert seen == ["root hook", "replica hook"] * 2
    assert hooks(root) == before


# -- point 4: a list with one item per sample travels with its samples ------------------------------------


class Named(pl.LightningModule):
    """Samples ``(x, name)``; ``default_collate`` makes the names a tuple beside the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)

    def predict_step(self, batch: Any, batch_idx: int) -> list[str]:
        x, names = batch
        assert len(names) == len(x)
        return [f"{name}={int(value)}" for name, value in zip(names, x, strict=True)]


def test_per_sample_names_reach_the_replica_of_their_samples() -> None:
    samples = [(torch.tensor([float(i)]), f"s{i % 3}") for i in range(10)]
    loader = DataLoader(samples, batch_size=5)  # type: ignore[arg-type]
    want = trainer(devices=1, strategy="auto").predict(Named(), loader)
    got = trainer(devices=2).predict(Named(), loader)
    assert got == want == [["s0=0", "s1=1", "s2=2", "s0=3", "s1=4"], ["s2=5", "s0=6", "s1=7", "s2=8", "s0=9"]]
