"""ModelSplitStrategy in a Trainer: equivalence with one device, early errors, checkpoints, Hydra."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from examples.models import TransformerNet
from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.devices import GPUInfo
from lightning_gpupar.model_split import ModelSplit, PlacementError
from lightning_gpupar.model_split.pipeline import PipelineError
from lightning_gpupar.strategies.split_mixin import optimizer_state_to_parameter_devices
from tests.helpers.hydra_app import build_trainer
from tests.helpers.markers import GiB, requires_cuda

if TYPE_CHECKING:
    from omegaconf import DictConfig

MAP = {"model.embed": 0, "model.blocks.0-1": 0, "model.blocks.2-3": 1, "model.head": 1}
#: The command line of the issue, exactly as written there.
ISSUE_OVERRIDES = (
    "strategy=model_split",
    "strategy.device_ids=[0,1]",
    "strategy.placement={model.embed:0,model.blocks.0-1:0,model.blocks.2-3:1,model.head:1}",
    "strategy.chunks=4",
    "model=transformer",
)


class TokenNet(pl.LightningModule):
    """A float64 Transformer that records each step's loss and gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TransformerNet(16, 16, 2, 4, 3, 12).double()
        self.losses: list[float] = []
        self.grads: list[dict[str, Tensor]] = []
        self.devices_seen: list[torch.device] = []

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        self.devices_seen.append(self.device)
        return F.cross_entropy(self(tokens), labels)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads.append({k: p.grad.detach().cpu().clone() for k, p in self.named_parameters()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # momentum: state that must stay with its parameters; not scale-invariant: clipping shows in weights
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n: int = 25, batch_size: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 16, (n, 12), generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def fit(
    module: TokenNet,
    strategy: Any = "auto",
    devices: int = 1,
    ckpt_path: str | None = None,
    samples: int = 25,
    **kwargs: Any,
) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.05,
    )
    trainer = pl.Trainer(devices=devices, strategy=strategy, **{**options, **kwargs})
    trainer.fit(module, loader(samples), ckpt_path=ckpt_path)
    return trainer


def assert_same_training(a: TokenNet, b: TokenNet) -> None:
    assert len(a.losses) == len(b.losses) == 3
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-10, atol=1e-12)
    for ga, gb in zip(a.grads, b.grads, strict=True):
        for key in ga:
            torch.testing.assert_close(ga[key], gb[key], rtol=1e-10, atol=1e-12, msg=key)
    for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa.cpu(), pb.cpu(), rtol=1e-10, atol=1e-12, msg=key)  # clipped + stepped


@pytest.fixture(scope="module")
def single() -> TokenNet:
    module = TokenNet()
    fit(module)
    return module


@pytest.mark.parametrize(("placement", "chunks"), [(MAP, 1), (MAP, 4), ("auto", 3)])
def test_split_training_equals_single_device(
    single: TokenNet, placement: Any, chunks: int, recwarn: pytest.WarningsRecorder
) -> None:
    # batches of 10, 10, 5: with chunks=4 micro-batches of 3,3,2,2 and then 2,1,1,1
    split = TokenNet()
    head_calls: list[int] = []
    split.model.head.register_forward_hook(lambda m, a, o: head_calls.append(len(o)))
    trainer = fit(split, ModelSplitStrategy(placement, chunks=chunks), devices=2)
    # every batch ran as `chunks` micro-batches (the first micro-batch once more, through the chain check)
    assert len(head_calls) == 3 * chunks + (chunks > 1)
    assert_same_training(single, split)
    assert split.devices_seen == [trainer.strategy.root_device] * 3
    assert not [w for w in recwarn if "never called the forward" in str(w.message)]


class StageCaller(TokenNet):
    """Calls the stages itself: the pipelined forward of ``model`` never runs."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        hidden = self.model.embed(tokens)
        for block in self.model.blocks:
            hidden = block(hidden)
        return F.cross_entropy(self.model.head(hidden), labels)


def test_a_training_step_that_bypasses_the_pipeline_warns_once() -> None:
    message = r"chunks=2, but the first training step never called the forward of model \(TransformerNet\)"
    with pytest.warns(UserWarning, match=message) as record:
        fit(StageCaller(), ModelSplitStrategy(MAP, chunks=2), devices=2)
    assert sum("never called the forward" in str(w.message) for w in record) == 1  # 3 steps, one warning


def test_registered_name_plans_and_documents_the_root_device() -> None:
    module = TokenNet()
    trainer = fit(module, "model_split", devices=2, max_steps=1)
    strategy = trainer.strategy
    assert isinstance(strategy, ModelSplitStrategy)
    plan = strategy.plan_for(module)
    assert {e.position for e in plan.entries} == {0, 1}
    assert strategy.root_device == plan.output_device == torch.device("cpu")
    assert "forward" not in module.model.__dict__  # teardown gave the model back unhooked
    assert not module.model.embed._forward_pre_hooks


@pytest.mark.parametrize(
    ("strategy", "error", "message"),
    [
        (lambda: ModelSplitStrategy({"model.embd": 0}), PlacementError, r"Did you mean 'model\.embed'"),
        (lambda: ModelSplitStrategy({"model": 3}), PlacementError, r"position 3 is out of range"),
        (lambda: ModelSplitStrategy(MAP, chunks=16), PlacementError, r"chunks=16 .* hold 10 samples"),
        (
            lambda: ModelSplitStrategy({"model.embed": 0, "model.head": 1}, chunks=2, default_device=0),
            PipelineError,
            r"model\.blocks holds parameters and is in no stage",
        ),
    ],
)
def test_bad_input_fails_before_the_first_step(
    strategy: Callable[[], ModelSplitStrategy], error: type[Exception], message: str
) -> None:
    module = TokenNet()
    with pytest.raises(error, match=message):
        fit(module, strategy(), devices=2)
    assert module.losses == []


@pytest.mark.parametrize("chunks", [0, -1, 1.5])
def test_chunks_must_be_a_positive_int(chunks: Any) -> None:
    with pytest.raises(PlacementError, match="must be an int >= 1"):
        ModelSplitStrategy(MAP, chunks=chunks)


def test_split_checkpoint_loads_unsplit_and_under_another_placement(tmp_path: Path) -> None:
    uninterrupted = TokenNet()
    fit(uninterrupted, ModelSplitStrategy(MAP, chunks=2), devices=2, max_steps=3, samples=20)
    module = TokenNet()
    trainer = fit(module, ModelSplitStrategy(MAP, chunks=2), devices=2, max_steps=2, samples=20)  # 1 epoch
    path = tmp_path / "split.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    plain = TokenNet()
    plain.load_state_dict(saved["state_dict"])  # strict: canonical keys, no wrapper prefixes
    for key, value in module.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=0, atol=0, msg=key)

    resumed = TokenNet()
    other = ModelSplitStrategy({"model.embed": 0, "model.blocks": 1, "model.head": 1})
    trainer = fit(resumed, other, devices=2, max_steps=3, ckpt_path=str(path), samples=20)
    assert trainer.global_step == 3 and len(resumed.losses) == 1
    # weights and momentum came back: the resumed step is the uninterrupted run's third (epoch 1, batch 0)
    torch.testing.assert_close(resumed.losses, uninterrupted.losses[2:], rtol=1e-10, atol=1e-12)
    for (key, value), expected in zip(
        resumed.state_dict().items(), uninterrupted.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12, msg=key)
    state = trainer.optimizers[0].state
    assert len(state) == len(list(resumed.parameters()))
    assert all(s["momentum_buffer"].device == p.device for p, s in state.items())


def test_optimizer_state_is_loaded_onto_each_parameters_device() -> None:
    """meta stands in for a second accelerator; Lightning would move all state to root_device (the CPU)."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    trained = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    trained.step()  # state (exp_avg, exp_avg_sq, step) on the CPU, as a checkpoint loads it
    model[0].to(meta)
    strategy = ModelSplitStrategy({"0": 0, "1": 1}, parallel_devices=[meta, cpu])
    strategy.optimizers = [torch.optim.Adam(model.parameters())]
    assert strategy.root_device == cpu
    strategy.load_optimizer_state_dict({"optimizer_states": [trained.state_dict()]})
    state = strategy.optimizers[0].state
    for param in model.parameters():
        assert state[param]["exp_avg"].device == state[param]["exp_avg_sq"].device == param.device
    assert {p.device for p in state} == {meta, cpu}


def test_optimizer_state_follows_its_parameters_after_lightnings_move() -> None:
    param = nn.Parameter(torch.zeros(3, device="meta"))
    optimizer = torch.optim.Adam([param])
    optimizer.state[param] = {
        "step": torch.tensor(1.0),
        "exp_avg": torch.zeros(3),
        "exp_avg_sq": torch.zeros(3),
    }
    optimizer_state_to_parameter_devices(optimizer)  # what setup runs after Lightning moved it to the root
    state = optimizer.state[param]
    assert state["exp_avg"].is_meta and state["exp_avg_sq"].is_meta
    assert state["step"].device.type == "cpu"  # torch keeps Adam's step counter on the CPU


def test_hydra_split_config_with_dotted_placement_keys(compose_app: Callable[..., DictConfig]) -> None:
    cfg = compose_app(
        *ISSUE_OVERRIDES,
        "trainer.accelerator=cpu",
    )
    trainer = build_trainer(cfg, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, ModelSplitStrategy)
    assert strategy.placement == MAP and list(strategy.placement) == list(MAP)  # order = stage order
    assert strategy.chunks == 4 and len(strategy.devices) == 2
    auto = build_trainer(
        compose_app("strategy=model_split", "strategy.placement=auto", "trainer.accelerator=cpu")
    )
    assert isinstance(auto.strategy, ModelSplitStrategy) and auto.strategy.placement == "auto"


@pytest.mark.slow
def test_the_transformer_example_trains_split_and_pipelined(
    compose_app: Callable[..., DictConfig], tmp_path: Path
) -> None:
    from examples.train import train

    cfg = compose_app(
        *ISSUE_OVERRIDES,
        "model.d_model=32",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "data.num_samples=192",
    )
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["test_loss"] > 0


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("second", ["cuda:0", "cpu"])
def test_two_stages_on_a_gpu_equal_single_device(single: TokenNet, second: str) -> None:
    """Both stages on cuda:0, or the second on the CPU (activations and gradients cross devices)."""
    cuda = torch.device("cuda", 0)
    split = TokenNet()
    devices = [cuda, torch.device(second)]
    strategy = ModelSplitStrategy(MAP, chunks=4, output_device=0, parallel_devices=devices)
    fit(split, strategy, accelerator="gpu", devices=1)
    assert_same_training(single, split)
    assert split.devices_seen == [cuda] * 3


def test_auto_pipeline_with_a_parameter_free_stage_equals_single_device() -> None:
    """TinyNet is Linear, Tanh, Linear: the Tanh stage holds no tensors and runs where its input is."""
    from tests.helpers.equivalence import assert_same, run

    single = run(batch_size=7, n=35, max_steps=3, devices=1)
    split = run(batch_size=7, n=35, max_steps=3, devices=2, strategy=ModelSplitStrategy(chunks=3))
    torch.testing.assert_close(split.losses, single.losses, rtol=1e-10, atol=0)
    assert_same(split.weights, single.weights)


def test_a_plan_that_exceeds_free_gpu_memory_fails_before_training(
    fake_gpus: Callable[..., list[GPUInfo]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus(40, 40)
    free = {0: 80 * GiB, 1: 1024}  # bytes free per GPU: cuda:1 cannot take its half
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device: (free[torch.device(device).index], 80 * GiB)
    )
    monkeypatch.setattr(CUDAAccelerator, "setup_device", lambda self, device: None)  # the GPUs are fake
    module = TokenNet()
    # training memory: cuda:1's 51.9 KiB of parameters, as much for gradients and for SGD's momentum
    message = (
        r"(?s)does not fit: cuda:1 needs 155\.7 KiB but has 1\.0 KiB free.*model\.blocks\.2\s+1\s+cuda:1"
    )
    with pytest.raises(PlacementError, match=message):
        fit(module, ModelSplitStrategy(MAP), accelerator="gpu", devices=2)
    assert module.losses == [] and module.grads == []  # no step ran
    assert all(p.device.type == "cpu" for p in module.parameters())  # nothing was moved


CPU_META = [torch.device("cpu"), torch.device("meta")]  # meta stands in for a second accelerator


def test_the_issues_placement_pipelines_across_a_real_device_change() -> None:
    """Each move to meta makes a new tensor, as between two GPUs: the chain check must still pass."""
    module = TokenNet()
    strategy = ModelSplitStrategy(MAP, chunks=4, parallel_devices=CPU_META)
    strategy.connect(module)
    strategy.model_to_device()
    assert (
        module.model.blocks[1].linear1.weight.device.type == "cpu" and module.model.head.linear.weight.is_meta
    )
    out = module(torch.randint(0, 16, (10, 12)))
    assert out.is_meta and out.shape == (10, 3)


@pytest.mark.parametrize("chunks", [1, 2])
def test_a_declared_output_device_holds_outputs_and_is_self_device(chunks: int) -> None:
    module = TokenNet()
    placement = {"model.embed": 0, "model.blocks": 0, "model.head": 0}
    strategy = ModelSplitStrategy(placement, chunks, output_device=1, parallel_devices=CPU_META)
    assert strategy.root_device == torch.device("meta")  # where batches arrive, before and after placing
    strategy.connect(module)
    strategy.model_to_device()
    assert module.device == strategy.root_device == torch.device("meta")
    assert all(p.device.type == "cpu" for p in module.parameters())
    out = module(torch.randint(0, 16, (4, 12)))
    assert out.is_meta and out.shape == (4, 3)


class Encode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.linear(batch["x"]) * batch["mask"], {"mask": batch["mask"]}


class Decode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: list[set[torch.device]] = []

    def forward(self, pair: tuple[Tensor, dict[str, Tensor]]) -> dict[str, Tensor]:
        hidden, extra = pair
        self.seen.append({hidden.device, extra["mask"].device})
        return {"y": self.linear(hidden), "mask": extra["mask"]}


class NestedNet(nn.Module):
    """Stages that take and return dicts and tuples: every tensor in them must move."""

    def __init__(self) -> None:
        super().__init__()
        self.encode, self.decode = Encode(), Decode()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.decode(self.encode(batch))


@pytest.mark.parametrize("chunks", [1, 3])
def test_nested_inputs_and_activations_move_to_each_stage(chunks: int) -> None:
    model = NestedNet()
    ModelSplit({"encode": 0, "decode": 1}, chunks=chunks).apply(model, CPU_META, "test")
    out = model({"x": torch.randn(6, 3), "mask": torch.ones(6, 1)})
    assert set(out) == {"y", "mask"} and out["y"].is_meta and out["mask"].is_meta
    assert out["y"].shape == (6, 2) and out["mask"].shape == (6, 1)  # micro-batch outputs concatenated
    assert model.decode.seen == [{torch.device("meta")}] * (chunks + (chunks > 1))  # + the chain check
