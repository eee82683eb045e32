"""placement="device_map": the plan read from a transformers / accelerate hf_device_map, validated like a
placement map; a model dispatched with accelerate's hooks trains under model_split, its hooks replaced by
ours, every tensor moved at most once; float64 equivalence with one device on a tiny random Llama."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.model_split import ModelSplit, PlacementError, apply_placement, plan_placement
from tests.helpers.lora import SEQ, VOCAB, causal_lm
from tests.helpers.markers import requires_cuda
from tests.helpers.trainer import TRAINING_ONLY

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

CPU2 = [torch.device("cpu"), torch.device("cpu")]


def tiny_llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return causal_lm("llama", layers)


def llama_device_map(model: nn.Module) -> dict[str, int]:
    """What accelerate's own planner makes of the model over two equal devices, decoder layers kept whole."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={0: int(size * 0.6), 1: size}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert set(device_map.values()) == {0, 1}, device_map
    return dict(device_map)


def dispatched(model: nn.Module, device_map: dict[str, Any], entries: list[str] | None = None) -> nn.Module:
    """``model`` as accelerate dispatches it (hooks on every entry), every entry on the CPU; then the
    ``hf_device_map`` set to ``device_map``, whose ints are positions in the CPU test devices."""
    keys = entries if entries is not None else list(device_map)
    accelerate.dispatch_model(model, {key: "cpu" for key in keys}, force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    model.hf_device_map = dict(device_map)
    return model


class CausalLM(pl.LightningModule):
    """Next-token loss computed here in float64 (transformers' own loss casts logits to float32)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.losses: list[float] = []
        self.grads: list[dict[str, Tensor]] = []

    def forward(self, ids: Tensor) -> Tensor:
        out = self.net(ids)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (ids,) = batch
        logits = self(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads.append({n: p.grad.detach().cpu().clone() for n, p in self.named_parameters()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def token_data(n: int = 8) -> TensorDataset:
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1)))


def fit(module: CausalLM, devices: int = 1, **strategy: Any) -> CausalLM:
    kwargs: dict[str, Any] = {**TRAINING_ONLY, "accelerator": "cpu", "max_steps": 2, "devices": devices}
    if strategy:
        kwargs["strategy"] = ModelSplitStrategy(**strategy)
    pl.Trainer(**kwargs).fit(module, DataLoader(token_data(), batch_size=4))
    return module


def assert_equivalent(a: CausalLM, b: CausalLM) -> None:
    assert a.losses == pytest.approx(b.losses, rel=1e-10)
    for ga, gb in zip(a.grads, b.grads, strict=True):
        assert ga.keys() == gb.keys()
        for key in ga:
            torch.testing.assert_close(ga[key], gb[key], rtol=1e-10, atol=1e-12, msg=key)


# --------------------------------------------------------------------------------------------- reading


def test_the_plan_follows_the_device_map_with_keys_relative_to_its_submodule() -> None:
    net = tiny_llama()
    device_map = llama_device_map(net)
    net.hf_device_map = device_map
    plan = plan_placement(CausalLM(net), CPU2, "device_map")
    positions = {e.path: e.position for e in plan.entries}
    assert positions == {f"net.{key}": position for key, position in device_map.items()}
    assert all(e.source == "map" for e in plan.entries)
    assert plan.output_position == device_map["lm_head"]


def test_a_peft_wrapper_forwarding_hf_device_map_is_not_mistaken_for_its_owner() -> None:
    peft = pytest.importorskip("peft")
    net = tiny_llama()
    net.hf_device_map = llama_device_map(net)
    lora = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert lora.hf_device_map == net.hf_device_map  # forwarded by __getattr__ through two wrappers
    plan = plan_placement(CausalLM(lora), CPU2, "device_map")
    owner = "net.base_model.model."
    assert {e.path for e in plan.entries} == {owner + key for key in net.hf_device_map}


def test_cuda_indices_name_the_strategys_gpus_and_cpu_names_the_cpu_stage() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    net.hf_device_map = {"0": 3, "1": "cuda:1", "2": "cpu"}
    devices = [torch.device("cuda", 1), torch.device("cuda", 3), torch.device("cpu")]
    plan = plan_placement(net, devices, "device_map")  # plans only: no GPU is touched
    assert [(e.path, e.position) for e in plan.entries] == [("0", 1), ("1", 0), ("2", 2)]
    assert plan.output_device == torch.device("cpu")


@pytest.mark.parametrize(
    ("device_map", "devices", "expected"),
    [
        ({"0": 0, "1": 2}, CPU2, "entry '1': 2: on CPU devices an int is a position .* there are 2 "),
        ({"0": 0, "1": 0, "nope": 1}, CPU2, r"entry 'nope': 1: No submodule 'nope'.*Submodules of the"),
        ({"0": 0, "1": 1}, CPU2, r"These submodules hold parameters .* in no placement entry: 2"),
        ({"0": 0, "1": 1, "2": "disk"}, CPU2, r"entry '2': 'disk': placement trains each part on a device"),
        (
            {"0": 0, "1": 1, "2": 1},
            [torch.device("cuda", 0), torch.device("cpu")],
            r"entry '1': 1: cuda:1 is not among the strategy's devices \(0: cuda:0, 1: cpu\)",
        ),
        (
            {"0": 0, "1": "cpu", "2": 1},
            [torch.device("cuda", 0), torch.device("cuda", 1)],
            r"entry '1': 'cpu': the strategy's devices \(0: cuda:0, 1: cuda:1\) include no CPU",
        ),
    ],
)
def test_a_bad_device_map_is_refused_naming_the_entry_and_what_is_valid_with_the_model_untouched(
    device_map: dict[str, Any], devices: list[torch.device], expected: str
) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    dispatched(net, device_map, entries=["0", "1", "2"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PlacementError, match=expected):
        ModelSplit("device_map").apply(net, devices, "test")
    assert all(hasattr(m, "_hf_hook") for m in net)  # accelerate's hooks are still on: nothing was applied
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_tied_parameters_split_by_the_device_map_are_refused() -> None:
    net = tiny_llama(layers=2)
    net.lm_head.weight = net.model.embed_tokens.weight  # tied, as GPT-2 / small Llamas tie them
    device_map = {key: (0 if key != "lm_head" else 1) for key in llama_device_map(net)}
    net.hf_device_map = device_map
    with pytest.raises(PlacementError, match=r"device_map.*same \(tied\) parameter.*positions 0 and 1"):
        plan_placement(CausalLM(net), CPU2, "device_map")


def test_no_device_map_anywhere_says_how_to_get_one() -> None:
    with pytest.raises(PlacementError, match="no submodule of the LightningModule has an hf_device_map"):
        plan_placement(CausalLM(nn.Linear(2, 2)), CPU2, "device_map")
    with pytest.raises(PlacementError, match="'device_map'"):
        ModelSplit("device_mapp")


# ------------------------------------------------------------------------------------ accelerate's hooks


def test_accelerates_hooks_are_replaced_and_no_tensor_moves_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_llama()
    device_map = llama_device_map(net)
    ids = token_data()[:4][0]
    expected = net(ids).logits
    dispatched(net, device_map)
    sends = []
    real_send = accelerate.hooks.send_to_device
    monkeypatch.setattr(
        accelerate.hooks, "send_to_device", lambda *a, **k: [sends.append(1), real_send(*a, **k)][1]
    )
    net(ids)
    assert sends, "the test must see accelerate's hooks move inputs"

    tensors = {id(t) for t in [*net.parameters(), *net.buffers()]}
    moved: list[int] = []
    real_to = torch.Tensor.to

    def counting_to(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if id(self) in tensors:
            moved.append(id(self))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    plan = plan_placement(net, CPU2, "device_map")
    handle = apply_placement(net, plan)
    assert moved == []  # every tensor already sits on its device: no call at all, let alone a second one
    assert not any(hasattr(m, "_hf_hook") for m in net.modules())
    sends.clear()
    torch.testing.assert_close(net(ids).logits, expected, rtol=1e-12, atol=1e-12)
    assert sends == []  # our hooks alone move activations
    handle.remove()


def test_a_dispatched_llama_trains_as_on_one_device_in_float64() -> None:
    single = fit(CausalLM(tiny_llama()))
    net = tiny_llama()
    split = fit(CausalLM(dispatched(net, llama_device_map(net))), devices=2, placement="device_map")
    assert not any(hasattr(m, "_hf_hook") for m in net.modules())
    assert_equivalent(split, single)


def test_micro_batches_run_where_the_device_map_is_a_chain() -> None:
    def chain() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, VOCAB)).double()

    single = fit(CausalLM(chain()))
    net = dispatched(chain(), {"0": 0, "1": 0, "2": 1, "3": 1})
    strategy = ModelSplitStrategy(placement="device_map", chunks=2)
    trainer = pl.Trainer(**TRAINING_ONLY, accelerator="cpu", devices=2, max_steps=2, strategy=strategy)
    split = CausalLM(net)
    trainer.fit(split, DataLoader(token_data(), batch_size=4))
    assert_equivalent(split, single)


@pytest.mark.cuda
@requires_cuda
def test_a_model_dispatched_over_a_gpu_and_the_cpu_trains_as_on_one_device() -> None:
    """accelerate offloads the 'cpu' entries (weights on meta, moved to the GPU per call); model_split
    makes them a CPU stage: the hooks come off, the weights come back to the CPU, and nothing moves twice."""
    single = fit(CausalLM(tiny_llama()))
    net = tiny_llama()
    device_map: dict[str, Any] = {key: 0 for key in llama_device_map(net)}
    device_map["lm_head"] = "cpu"
    accelerate.dispatch_model(net, device_map)
    strategy = ModelSplitStrategy(
        placement="device_map", parallel_devices=[torch.device("cuda", 0), torch.device("cpu")]
    )
    split = CausalLM(net)
    trainer = pl.Trainer(**TRAINING_ONLY, accelerator="gpu", devices=[0], max_steps=2, strategy=strategy)
    trainer.fit(split, DataLoader(token_data(), batch_size=4))
    assert not any(hasattr(m, "_hf_hook") for m in net.modules())
    assert split.losses == pytest.approx(single.losses, rel=1e-7)
    for ga, gb in zip(split.grads, single.grads, strict=True):
        for key in ga:
            torch.testing.assert_close(ga[key], gb[key], rtol=1e-6, atol=1e-9, msg=key)


class HeadFirst(nn.Module):
    """Registers its head before its body; the forward runs the body first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, VOCAB).double()
        self.body = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh()).double()

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.body(ids))


def test_stages_follow_execution_order_not_the_maps_or_registrations() -> None:
    single = fit(CausalLM(HeadFirst()))
    net = HeadFirst()
    net.hf_device_map = {"head": 1, "body": 0}
    module = CausalLM(net)
    module.example_input_array = token_data()[:2][0]
    plan = plan_placement(module, CPU2, "device_map", example_input=module.example_input_array)
    assert [e.path for e in plan.entries] == ["net.body", "net.head"]
    split = fit(module, devices=2, placement="device_map", chunks=2)  # pipelined body -> head
    assert_equivalent(split, single)


def test_the_hooks_of_a_dispatched_model_inside_a_peft_wrapper_come_off() -> None:
    """PEFT's wrappers forward unknown attributes to the model they wrap, so they seem to carry its
    ``_hf_hook`` though they own none: removing it from the wrapper must not be tried."""
    from tests.helpers.lora import LoraLM, dispatch, tokens

    module = LoraLM(layers=2)
    ids = tokens(2)
    expected = module(ids)
    dispatch(module)
    handle = apply_placement(module, plan_placement(module, CPU2, "device_map"))
    assert not any("_hf_hook" in m.__dict__ for m in module.modules())
    torch.testing.assert_close(module(ids), expected, rtol=1e-12, atol=1e-12)
    handle.remove()
