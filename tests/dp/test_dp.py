"""strategy="dp" on CPU replicas: equivalence with single-device training, and each Lightning 1.x DP bug."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.aggregation import CatMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_gpupar import DataParallelStrategy
from lightning_gpupar.dp.batch import BatchSplitError
from lightning_gpupar.dp.replica_results import merge_metrics
from tests.helpers.dp_models import BatchNormNet, LoggingNet, ManualNet
from tests.helpers.equivalence import ProbeNet, TinyNet, assert_same, make_data, run
from tests.helpers.markers import requires_cuda


def dp(devices: int, **kwargs: Any) -> dict[str, Any]:
    return {"strategy": "dp", "devices": devices, **kwargs}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])])
def device_type(request: pytest.FixtureRequest) -> str:
    """The replicas' device type: tests taking this fixture run on CPU replicas and again on CUDA."""
    return str(request.param)


def dp_on(device_type: str, n: int) -> dict[str, Any]:
    """Trainer arguments for ``n`` dp replicas on ``device_type``.

    On CUDA with fewer than ``n`` GPUs, replicas share GPUs (``[cuda:0, cuda:0]``): the same path as
    several CPU replicas, since the copy primitives use torch's broadcast only for distinct GPUs.
    """
    if device_type == "cpu":
        return dp(n, accelerator="cpu")
    count = torch.cuda.device_count()
    if count >= n:
        return {"accelerator": "gpu", "strategy": "dp", "devices": list(range(n))}
    shared = [torch.device("cuda", i % count) for i in range(n)]
    return {"accelerator": "gpu", "strategy": DataParallelStrategy(parallel_devices=shared)}


def test_importing_registers_dp() -> None:
    assert "dp" in StrategyRegistry
    trainer = pl.Trainer(accelerator="cpu", devices=3, strategy="dp", logger=False)
    assert isinstance(trainer.strategy, DataParallelStrategy)
    assert trainer.strategy.parallel_devices == [torch.device("cpu")] * 3
    assert trainer.world_size == 1


# -- equivalence: loss, gradients and weights equal single-device training (float64) --------------------


@pytest.mark.parametrize(
    ("devices", "batch_size", "n"),
    [
        (2, 8, 64),  # even split
        (3, 7, 35),  # 7 samples over 3 replicas: shards of 3, 2, 2
        (3, 8, 64),  # 8 over 3: 3, 3, 2
        (3, 2, 16),  # batch smaller than the number of devices: 2 replicas
        (2, 5, 21),  # last batch of 1 sample: one replica
    ],
)
def test_loss_gradients_and_weights_equal_single_device(
    device_type: str, devices: int, batch_size: int, n: int
) -> None:
    single = run(batch_size=batch_size, n=n, max_steps=4, devices=1)
    parallel = run(batch_size=batch_size, n=n, max_steps=4, **dp_on(device_type, devices))
    assert len(parallel.losses) == len(single.losses) == 4
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-10, atol=0)
    for g_single, g_parallel in zip(single.grads, parallel.grads, strict=True):
        assert_same(g_parallel, g_single)
    assert_same(parallel.weights, single.weights)


def test_gradient_clipping_and_accumulation_equal_single_device() -> None:
    options = dict(gradient_clip_val=0.05, accumulate_grad_batches=2, batch_size=7, n=35, max_steps=3)
    single = run(devices=1, **options)  # type: ignore[arg-type]
    parallel = run(**dp(3), **options)  # type: ignore[arg-type]
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-10, atol=0)
    assert_same(parallel.weights, single.weights)


def test_logged_epoch_metrics_equal_single_device() -> None:
    kwargs = dict(batch_size=7, n=35, max_steps=-1, max_epochs=2, limit_val_batches=None)
    single = run(devices=1, **kwargs)  # type: ignore[arg-type]
    parallel = run(**dp(3), **kwargs)  # type: ignore[arg-type]
    assert {"train_loss_epoch", "val_loss"} <= single.metrics.keys()
    for key, value in single.metrics.items():
        assert parallel.metrics[key] == pytest.approx(value, rel=1e-10), key


def test_predictions_come_back_in_the_original_order(device_type: str) -> None:
    single = run(batch_size=7, n=30, max_steps=1, predict=True, devices=1)
    parallel = run(batch_size=7, n=30, max_steps=1, predict=True, **dp_on(device_type, 3))
    assert parallel.predictions is not None and single.predictions is not None
    assert parallel.predictions.shape == (30, 3)
    torch.testing.assert_close(parallel.predictions, single.predictions, rtol=1e-10, atol=1e-12)


# -- logging and metrics ----------------------------------------------------------------------------------


def test_values_and_metrics_logged_in_replicas_equal_single_device(device_type: str) -> None:
    kwargs = dict(batch_size=7, n=35, max_steps=-1, max_epochs=1, limit_val_batches=None)
    single = run(LoggingNet(), devices=1, **kwargs)  # type: ignore[arg-type]
    module = LoggingNet()
    parallel = run(module, **dp_on(device_type, 3), **kwargs)  # type: ignore[arg-type]
    # the last training batch has 35 - 4*7 = 7 samples: "count" sums the shards back to the batch size
    assert parallel.metrics["count"] == single.metrics["count"] == 7
    for key in ("acc_step", "train_acc", "loss_mean", "largest", "smallest", "val_acc", "val_loss"):
        assert parallel.metrics[key] == pytest.approx(single.metrics[key], rel=1e-10), key
    assert len(module.threads) == 3, "the replicas ran in worker threads"
    assert module.update_counts == [3, 6, 9, 12, 15], "every replica's update reached the root metric"


def test_a_metric_that_cannot_be_merged_gets_a_clear_error() -> None:
    class FullStateAccuracy(MulticlassAccuracy):
        full_state_update = True

    class Net(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.acc = FullStateAccuracy(3)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.acc(self(batch[0]), batch[1])
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match=r"cannot be merged across data-parallel replicas.*strategy=ddp"):
        run(Net(), **dp(2))


# -- what a replica sees ----------------------------------------------------------------------------------


def test_bf16_autocast_reaches_every_replica_thread() -> None:
    module = ProbeNet()
    run(module, precision="bf16-mixed", max_steps=1, **dp(2))
    assert len(module.seen) == 2
    assert {name for name, *_ in module.seen} == {"gpupar-replica-0", "gpupar-replica-1"}
    assert all(autocast and dtype == torch.bfloat16 for _, _, autocast, dtype in module.seen)


def test_validation_runs_without_grad_in_every_replica() -> None:
    grad_modes: list[bool] = []

    class Net(TinyNet):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            grad_modes.append(torch.is_grad_enabled())
            super().validation_step(batch, batch_idx)

    run(Net(), n=8, max_steps=1, limit_val_batches=1, **dp(2))
    assert grad_modes == [False, False]


def test_errors_in_a_replica_surface_in_the_trainer() -> None:
    class Broken(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if threading.current_thread().name.endswith("1"):
                raise ZeroDivisionError("replica 1 failed")
            return super().training_step(batch, batch_idx)

    with pytest.raises(ZeroDivisionError, match="replica 1 failed"):
        run(Broken(), **dp(2))


def test_explicit_batch_size_weighs_replica_values_as_on_one_device() -> None:
    class Net(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            losses = F.cross_entropy(self(x), y, reduction="none")
            weights = (y + 1).to(losses.dtype)  # e.g. tokens per sample
            value = (weights * losses).sum() / weights.sum()
            self.log("weighted", value, on_step=True, on_epoch=True, batch_size=int(weights.sum()))
            return losses.mean()

    kwargs = dict(batch_size=7, n=35, max_steps=5)
    single = run(Net(), devices=1, **kwargs)  # type: ignore[arg-type]
    parallel = run(Net(), **dp(3), **kwargs)  # type: ignore[arg-type]
    for key in ("weighted_step", "weighted_epoch"):
        assert parallel.metrics[key] == pytest.approx(single.metrics[key], rel=1e-10), key


def test_batch_hooks_see_the_whole_batch_or_each_shard() -> None:
    calls: list[tuple[str, int]] = []

    class Net(TinyNet):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            calls.append(("before_transfer", len(batch[0])))
            return batch

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            calls.append(("after_transfer", len(batch[0])))
            return batch

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            calls.append(("batch_start", len(batch[0])))

    run(Net(), batch_size=7, n=7, max_steps=1, **dp(3))
    assert calls == [("before_transfer", 7), ("batch_start", 7)] + [("after_transfer", n) for n in (3, 2, 2)]


# -- BatchNorm, state on self, sync_batchnorm --------------------------------------------------------------


def test_batchnorm_keeps_the_first_replicas_running_statistics(device_type: str) -> None:
    module = BatchNormNet()
    reference = BatchNormNet()
    run(module, batch_size=8, max_steps=1, **dp_on(device_type, 2))
    x = make_data(64).tensors[0][:8]
    reference.model[1](reference.model[0](x[:4]))  # the first replica's shard
    torch.testing.assert_close(module.model[1].running_mean, reference.model[1].running_mean)
    torch.testing.assert_close(module.model[1].running_var, reference.model[1].running_var)
    assert int(module.model[1].num_batches_tracked) == 1
    assert module.steps_on_self == 0


def test_batchnorm_in_training_fails_on_a_one_sample_shard_as_in_torch() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        run(BatchNormNet(), batch_size=7, n=7, max_steps=1, **dp(4))  # shards of 2, 2, 2, 1


def test_sync_batchnorm_is_refused_when_the_trainer_is_built() -> None:
    with pytest.raises(ValueError, match=r"sync_batchnorm=True.*strategy='ddp'"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="dp", sync_batchnorm=True)


# -- manual optimization --------------------------------------------------------------------------------


def test_manual_optimization_equals_single_device_with_a_data_parallel_forward(device_type: str) -> None:
    single = run(ManualNet(), batch_size=7, n=35, max_steps=3, devices=1)
    module = ManualNet()
    parallel = run(module, batch_size=7, n=35, max_steps=3, **dp_on(device_type, 3))
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-10, atol=0)
    for g_single, g_parallel in zip(single.grads, parallel.grads, strict=True):
        assert_same(g_parallel, g_single)
    assert_same(parallel.weights, single.weights)
    assert sorted(module.forward_sizes) == [2] * 6 + [3] * 3, "forward ran on three replicas per step"


class DirectCallNet(ManualNet):
    """A manual step that calls a submodule directly (as GANs do) instead of ``self(...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.direct_calls: list[tuple[str, int]] = []
        self.model[0].register_forward_hook(
            lambda module, inputs, output: self.direct_calls.append(
                (threading.current_thread().name, len(inputs[0]))
            )
        )

    def logits(self, x: Tensor) -> Tensor:
        return self.model(x)  # not self(x): runs once, on the root device


def test_direct_submodule_calls_in_a_manual_step_run_once_on_the_whole_batch(device_type: str) -> None:
    single = run(DirectCallNet(), batch_size=7, n=35, max_steps=3, devices=1)
    module = DirectCallNet()
    parallel = run(module, batch_size=7, n=35, max_steps=3, **dp_on(device_type, 3))
    assert module.direct_calls == [("MainThread", 7)] * 3, "one call on the root, not per replica"
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-10, atol=0)
    assert_same(parallel.weights, single.weights)


# -- bad input ----------------------------------------------------------------------------------------------


def test_a_batch_without_tensors_names_its_structure(tmp_path: Path) -> None:
    class Net(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            raise AssertionError("never reached")

    loader = DataLoader(["a", "b", "c", "d"], batch_size=2, collate_fn=lambda items: {"names": items})
    with pytest.raises(BatchSplitError, match=r"no tensor in it: dict\(names=list\[str, str\]\)"):
        pl.Trainer(
            accelerator="cpu", devices=2, strategy="dp", max_steps=1, logger=False, default_root_dir=tmp_path
        ).fit(Net(), loader)


def test_tensors_with_different_batch_dims_name_the_structure(tmp_path: Path) -> None:
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.zeros(7, dtype=torch.long)
    loader = DataLoader([0], collate_fn=lambda _: {"x": x, "y": y})
    with pytest.raises(BatchSplitError, match=r"disagree.*\[7, 8\].*dict\(x=Tensor\[8, 6\], y=Tensor\[7\]\)"):
        pl.Trainer(
            accelerator="cpu", devices=2, strategy="dp", max_steps=1, logger=False, default_root_dir=tmp_path
        ).fit(TinyNet(), loader)


def test_an_empty_batch_names_its_structure(tmp_path: Path) -> None:
    batch = (torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    loader = DataLoader([0], collate_fn=lambda _: batch)
    with pytest.raises(
        BatchSplitError, match=r"empty batch \(dim 0 is 0\): tuple\[Tensor\[0, 6\], Tensor\[0\]\]"
    ):
        pl.Trainer(
            accelerator="cpu", devices=2, strategy="dp", max_steps=1, logger=False, default_root_dir=tmp_path
        ).fit(TinyNet(), loader)


def test_output_device_must_be_one_of_the_devices(tmp_path: Path) -> None:
    strategy = DataParallelStrategy(output_device="cuda:5")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=r"cuda:5 is not one of the chosen devices \['cpu', 'cpu'\]"):
        trainer.fit(TinyNet(), DataLoader(make_data(8), batch_size=4))


def test_one_device_is_plain_single_device_training() -> None:
    single = run(batch_size=8, max_steps=2, devices=1)
    parallel = run(batch_size=8, max_steps=2, **dp(1))
    torch.testing.assert_close(parallel.losses, single.losses, rtol=0, atol=0)
    assert_same(parallel.weights, single.weights, rtol=0, atol=0)


def test_non_tensor_items_reach_every_replica(tmp_path: Path) -> None:
    seen: list[str] = []

    class Net(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            seen.append(batch["tag"])
            return F.cross_entropy(self(batch["x"]), batch["y"])

    data = make_data(8)
    loader = DataLoader(
        TensorDataset(*data.tensors),
        batch_size=8,
        collate_fn=lambda s: {
            "x": torch.stack([a for a, _ in s]),
            "y": torch.stack([b for _, b in s]),
            "tag": "hello",
        },
    )
    pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="dp",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(Net(), loader)
    assert seen == ["hello", "hello"]


class TestedNet(TinyNet):
    """test_step logs a loss and two metrics, one of which keeps every prediction (list state)."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAUROC

        self.test_acc = MulticlassAccuracy(3, average="micro")
        self.test_auroc = MulticlassAUROC(3, thresholds=None)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.test_auroc.update(logits.softmax(-1), y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)
        self.log("test_auroc", self.test_auroc)


@pytest.mark.parametrize("devices", [2, 3])
def test_test_epoch_metrics_equal_single_device(device_type: str, devices: int) -> None:
    loader = DataLoader(make_data(40), batch_size=7)
    results = []
    for kwargs in ({"accelerator": "cpu", "devices": 1}, dp_on(device_type, devices)):
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, **kwargs)
        (metrics,) = trainer.test(TestedNet(), loader, verbose=False)
        results.append(metrics)
    single, parallel = results
    assert single.keys() == parallel.keys() == {"test_loss", "test_acc", "test_auroc"}
    for key, value in single.items():
        assert parallel[key] == pytest.approx(value, rel=1e-6), key


# -- merging replica metrics into the root ------------------------------------------------------------------


def test_replica_metric_states_move_to_the_root_metrics_device_before_merging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, copies = SumMetric(), [SumMetric(), SumMetric()]
    root.update(torch.tensor(1.0))
    for index, copy in enumerate(copies, start=1):
        copy.update(torch.tensor(float(index + 1)))
        copy._device = torch.device("cpu", index)  # tagged as living elsewhere, as a copy on another GPU
    merged_devices: list[tuple[torch.device, torch.device]] = []
    merge = SumMetric.merge_state

    def spy(self: SumMetric, incoming: Any) -> None:
        merged_devices.append((self.device, incoming.device))
        merge(self, incoming)

    monkeypatch.setattr(SumMetric, "merge_state", spy)
    merge_metrics([(root, copies)], logged={id(copies[0])})
    assert len(merged_devices) == 2
    assert all(pair == (root.device, root.device) for pair in merged_devices), merged_devices
    assert float(root.compute()) == 6.0 and float(root._forward_cache) == 5.0  # type: ignore[arg-type]


# -- outputs that are not plain tensors ---------------------------------------------------------------------


@dataclasses.dataclass
class Decoded:
    logits: Tensor
    words: list[str]
    tokens: list[Tensor]
    model: str = "tiny"


class DecodingNet(TinyNet):
    """predict_step returns a dataclass of per-sample tensors, strings and variable-length tensors."""

    def predict_step(self, batch: Any, batch_idx: int) -> Decoded:
        x, y = batch
        return Decoded(
            logits=self(x),
            words=[f"{float(v):.4f}" for v in x[:, 0]],
            tokens=[torch.arange(int(label) + 1) for label in y],
        )


def decode(n: int, batch_size: int, **trainer_kwargs: Any) -> list[Decoded]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **trainer_kwargs)
    out = trainer.predict(DecodingNet(), DataLoader(make_data(n), batch_size=batch_size))
    assert out is not None
    return out  # type: ignore[return-value]


@pytest.mark.parametrize(("devices", "batch_size"), [(3, 7), (2, 8)])  # uneven 3, 2, 2 and even 4, 4
def test_predict_returns_dataclasses_of_strings_and_ragged_tensors(devices: int, batch_size: int) -> None:
    single = decode(2 * batch_size + 1, batch_size, devices=1)
    parallel = decode(2 * batch_size + 1, batch_size, **dp(devices))
    assert len(parallel) == len(single) == 3
    for p, s in zip(parallel, single, strict=True):
        assert isinstance(p, Decoded) and p.model == "tiny"
        assert p.words == s.words and len(p.words) == len(s.logits)
        torch.testing.assert_close(p.logits, s.logits, rtol=1e-10, atol=1e-12)
        assert [t.tolist() for t in p.tokens] == [t.tolist() for t in s.tokens]


def test_predict_returning_a_list_of_strings_keeps_every_sample() -> None:
    class Net(TinyNet):
        def predict_step(self, batch: Any, batch_idx: int) -> list[str]:
            return [f"{float(v):.4f}" for v in batch[0][:, 0]]

    loader = DataLoader(make_data(7), batch_size=7)
    results = []
    for kwargs in ({"devices": 1}, dp(3)):
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)
        results.append(trainer.predict(Net(), loader))
    assert results[1] == results[0] and len(results[0][0]) == 7  # type: ignore[index]


class CollectingNet(TinyNet):
    """Collects every test sample's first feature in a CatMetric: its order is the samples' order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = CatMetric()
        self.collected: Tensor | None = None

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.update(batch[0][:, 0])

    def on_test_epoch_end(self) -> None:
        self.collected = self.seen.compute()


def test_merged_metric_states_keep_the_single_device_sample_order() -> None:
    collected = []
    for kwargs in ({"devices": 1}, dp(3)):
        module = CollectingNet()
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)
        trainer.test(module, DataLoader(make_data(21), batch_size=7), verbose=False)  # 3 steps of 3, 2, 2
        collected.append(module.collected)
    single, parallel = collected
    assert single is not None and parallel is not None and single.shape == (21,)
    assert torch.equal(parallel, single)
