"""Quantized weights stay as they are: placement never moves or casts a Parameter whose class moves itself
(bitsandbytes' Params4bit / Int8Params); on CPU with a recording Parameter subclass, on CUDA with
bitsandbytes 4-bit + LoRA under model_split."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_gpupar.model_split import PlacementError, apply_placement, plan_placement
from lightning_gpupar.model_split.hooks import moves_itself
from tests.helpers.markers import requires_cuda

CPU2 = [torch.device("cpu"), torch.device("cpu")]


class Recording(nn.Parameter):
    """A Parameter that moves its own way, as bitsandbytes' are: every move and cast is recorded."""

    calls: ClassVar[list[str]] = []

    def _record(self, name: str) -> None:
        Recording.calls.append(name)

    def to(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._record("to")
        return super().to(*args, **kwargs)

    def cuda(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._record("cuda")
        return super().cuda(*args, **kwargs)

    def cpu(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._record("cpu")
        return super().cpu(*args, **kwargs)

    def half(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._record("half")
        return super().half(*args, **kwargs)

    def float(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._record("float")
        return super().float(*args, **kwargs)


def quantized_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    net[2].weight = Recording(net[2].weight.detach().clone(), requires_grad=False)
    Recording.calls.clear()
    return net


def test_a_parameter_class_with_its_own_moves_is_recognised() -> None:
    assert moves_itself(Recording(torch.zeros(1)))
    assert not moves_itself(nn.Parameter(torch.zeros(1)))
    assert not moves_itself(torch.zeros(1))


def test_placement_neither_moves_nor_casts_a_parameter_that_moves_itself() -> None:
    net = quantized_net()
    quantized = net[2].weight
    plan = plan_placement(net, CPU2, {"0": 0, "1": 0, "2": 1})
    handle = apply_placement(net, plan)
    out = net(torch.randn(3, 4))
    assert Recording.calls == []
    assert net[2].weight is quantized and type(net[2].weight) is Recording
    out.sum().backward()
    handle.remove()


def test_only_tensors_off_their_device_move_and_each_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices [cpu, meta]: what goes to position 1 really changes device; what stays is not touched."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    net[2].weight = net[1].weight  # tied: one tensor, two modules
    tensors = {id(t): n for n, t in net.named_parameters()} | {id(t): n for n, t in net.named_buffers()}
    moved: list[str] = []
    real_to = torch.Tensor.to

    def counting_to(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if id(self) in tensors:
            moved.append(tensors[id(self)])
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    devices = [torch.device("cpu"), torch.device("meta")]
    apply_placement(net, plan_placement(net, devices, {"0": 0, "1": 1, "2": 1}))
    assert sorted(moved) == ["1.bias", "1.weight", "2.bias"]
    assert net[0].weight.device.type == "cpu" and net[2].weight.is_meta and net[2].weight is net[1].weight


def test_a_quantized_parameter_planned_elsewhere_is_refused_before_anything_moves() -> None:
    net = quantized_net()
    devices = [torch.device("cpu"), torch.device("meta")]
    plan = plan_placement(net, devices, {"0": 1, "1": 1, "2": 1})
    wrong = r"2\.weight \(Recording\) is on cpu, the plan puts it on position 1"
    with pytest.raises(PlacementError, match=wrong):
        apply_placement(net, plan)
    assert Recording.calls == []
    assert all(p.device.type == "cpu" for p in net.parameters())  # nothing moved


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@requires_cuda
def test_bitsandbytes_4bit_lora_trains_under_model_split_with_its_weights_untouched() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lightning_gpupar import ModelSplitStrategy

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    net = transformers.LlamaForCausalLM(config)
    net = bnb_quantize(net, bnb)
    net = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    quantized = {n: (p, p.data_ptr(), p.dtype) for n, p in net.named_parameters() if moves_itself(p)}
    assert quantized, "the model must hold bitsandbytes parameters"

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self.net(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

        def on_train_end(self) -> None:  # before Lightning's teardown moves the whole model to the CPU
            for name, (param, ptr, dtype) in quantized.items():
                now = dict(net.named_parameters())[name]
                assert now is param and now.data_ptr() == ptr and now.dtype == dtype, name
            self.checked = True

    data = torch.randint(0, 64, (8, 16))
    strategy = ModelSplitStrategy(placement={"net.base_model.model": 0})
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False
    )
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert module.checked


def bnb_quantize(net: nn.Module, bnb: Any) -> nn.Module:
    """Every Linear of the decoder layers as a bitsandbytes 4-bit Linear, quantized on cuda:0."""
    for layer in net.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None)
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q)
    return net.to("cuda:0")
