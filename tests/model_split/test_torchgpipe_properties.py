"""torchgpipe's test properties (v0.0.7, ``tests/``), decided on CPU devices through ModelSplitStrategy.

Ported (the property, not the code): ``test_transparency`` (simple linears); from ``test_gpipe``: the
parameters and names stay the user's (``parameters``, ``public_attrs``, ``sequential_like``,
``named_children``), ``chunks_less_than_1``, ``too_few_devices``, ``batch_size_indivisible``,
``batch_size_small``, ``checkpoint_mode``, ``checkpoint_mode_invalid``, ``checkpoint_mode_when_chunks_1``,
``checkpoint_eval``, ``no_grad``, ``exception``, ``exception_early_stop_asap``, ``input_pair``,
``input_singleton``, ``input_varargs``, ``non_tensor``, ``non_tensor_tuple``, ``deferred_batch_norm``,
``deferred_batch_norm_params``, ``devices``, ``empty_module``, ``verify_module_*``; from
``test_deferred_batch_norm``: ``running_stats``, ``eval``, ``conv_bn``, ``input_requiring_grad``; from
``test_checkpoint``: ``random_in_checkpoint``, ``not_requires_grad_with_parameter``; from ``test_balance``:
``not_training``, ``balance_by_time_tuple``; ``test_inplace``; ``test_bugs`` (``python_autograd_function``,
``exception_no_hang``); ``test_microbatch``'s gather order (outputs equal the unsplit model's).

Where we differ on purpose (docs/pipeline.md): training batches smaller than ``chunks`` are refused before
training; ``checkpoint=`` with ``chunks=1`` warns; an empty stage sequence is refused; a module under two
names trains (one device); an in-place op at the start of a recomputed partition trains (torchgpipe raises
or, for ``add_``, computes a wrong gradient); ``balance="time"`` keeps gradients a model already has.

Not applicable: ``test_copy``, ``test_stream``, ``test_worker``, ``test_phony``, ``test_dependency``,
``test_pipeline.forward_lockstep``, ``test_checkpoint``'s ``Checkpointing``/``is_recomputing`` internals
(torchgpipe's threads, phony tensors and autograd plumbing; our CUDA streams have their own CUDA tests);
``test_pipeline.clock_cycles`` is tests/model_split/test_pipeline.py's schedule test; ``skip/*``:
``@skippable`` skip connections are no API of ours; ``deny_moving``, ``partitions``,
``balance_wrong_length``, ``recommend_auto_balance``: there is no GPipe wrapper module and no ``balance``
list (placement maps and ``placement="auto"``); ``test_microbatch`` internals; ``balance_by_size``:
``balance="memory"`` has its own tests; ``already_has_grad``: see above.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.model_split import PlacementError
from lightning_gpupar.model_split.pipeline import PipelineError
from tests.helpers.split_user import Wrapped, assert_same_step, fit, reference

F64 = torch.float64


def linears(n: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(4, 4) for _ in range(n))).double()


def halves(n: int = 4) -> dict[str, int]:
    return {f"model.{i}": int(i >= n // 2) for i in range(n)}


class Counter(nn.Module):
    """Passes its input on; counts its calls and the samples they held."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(len(x))
        return x


# ---------------------------------------------------------------------------------------- transparency


@pytest.mark.parametrize("chunks", [1, 4, 3])  # 3: uneven micro-batches of 8 samples
def test_transparency_split_gradients_equal_the_unsplit_models(chunks: int) -> None:
    model, x = linears(), torch.rand(8, 4, dtype=F64)
    loss, grads = reference(model, x)
    assert_same_step(fit(model, ModelSplitStrategy(halves(), chunks=chunks), x=x), loss, grads)


def test_the_model_keeps_its_parameters_names_and_children() -> None:
    model = linears()
    children = list(model)
    names = [name for name, _ in model.named_parameters()]
    split = fit(model, ModelSplitStrategy(halves(), chunks=2))
    assert list(split.model) == children and split.model[-1] is children[-1]
    assert [name for name, _ in split.model.named_parameters()] == names
    assert set(split.grads) == {f"model.{n}" for n in names}


# ----------------------------------------------------------------------------------------- options


def test_chunks_below_1_and_positions_beyond_the_devices_are_refused() -> None:
    for chunks in (0, -1, 2.0):
        with pytest.raises(PlacementError, match="chunks="):
            ModelSplitStrategy(halves(), chunks=chunks)  # type: ignore[arg-type]
    with pytest.raises(PlacementError, match="position"):
        fit(linears(), ModelSplitStrategy({**halves(), "model.3": 2}, chunks=2))


def test_an_indivisible_batch_trains_without_a_warning() -> None:
    model, x = linears(), torch.rand(7, 4, dtype=F64)
    loss, grads = reference(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        split = fit(model, ModelSplitStrategy(halves(), chunks=4), x=x)
    assert_same_step(split, loss, grads)


def test_training_batches_smaller_than_chunks_are_refused_before_training() -> None:
    with pytest.raises(PlacementError, match=r"chunks=4 micro-batches, but the training batches hold 2"):
        fit(linears(), ModelSplitStrategy(halves(), chunks=4), x=torch.rand(2, 4, dtype=F64))


@pytest.mark.parametrize(("checkpoint", "recomputed"), [("all", True), (None, False), ("never", False)])
def test_checkpoint_modes(checkpoint: str | None, recomputed: bool) -> None:
    model = nn.Sequential(Counter(), *linears(2)).double()
    fit(
        model, ModelSplitStrategy({"model.0": 0, "model.1": 0, "model.2": 1}, chunks=2, checkpoint=checkpoint)
    )
    assert model[0].calls == ([2, 2, 2, 2] if recomputed else [2, 2])  # forward (+ once more in backward)


def test_an_invalid_checkpoint_value_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"checkpoint names \['INVALID'\], which are not stages"):
        fit(linears(), ModelSplitStrategy(halves(), chunks=2, checkpoint="INVALID"))


def test_checkpoint_with_chunks_1_trains_and_warns_that_it_does_nothing() -> None:
    model, x = linears(), torch.rand(4, 4, dtype=F64)
    loss, grads = reference(model, x)
    with pytest.warns(UserWarning, match="chunks=1 runs no pipeline"):
        split = fit(model, ModelSplitStrategy(halves(), chunks=1, checkpoint="all"), x=x)
    assert_same_step(split, loss, grads)


class Evaluated(Wrapped):
    """Runs a forward and backward in validation (eval mode), with gradients on."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.enable_grad():
            self.output = self(batch[0])
            self.output.sum().backward()

    def val_dataloader(self) -> Any:
        return self.trainer.fit_loop._data_source.instance  # the training batches


def test_checkpointing_is_off_in_eval_mode_and_without_gradients() -> None:
    counter = Counter()
    model = Evaluated(nn.Sequential(counter, *linears(2)).double())
    strategy = ModelSplitStrategy({"model.0": 0, "model.1": 0, "model.2": 1}, chunks=2, checkpoint="all")
    fit(model, strategy, inference_mode=False, limit_val_batches=1, num_sanity_val_steps=0)
    assert counter.calls == [2, 2, 2, 2, 2, 2]  # training: forward + recompute; validation: forward only
    assert model.output.requires_grad
    with torch.no_grad():
        assert model(torch.rand(4, 4, dtype=F64)).grad_fn is None


# ------------------------------------------------------------------------------------------ failures


class Expected(Exception):
    pass


class Raise(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise Expected


def test_an_exception_in_a_stage_propagates_and_stops_the_pipeline_early() -> None:
    counter = Counter()
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity(), counter, Raise()).double()
    placement = {f"model.{i}": i for i in range(4)}
    with pytest.raises(Expected):
        fit(model, ModelSplitStrategy(placement, chunks=3), devices=4, x=torch.rand(3, 4, dtype=F64))
    assert len(counter.calls) <= 2  # the stage before the failing one stopped before its third micro-batch
    with pytest.raises(Expected):
        fit(nn.Sequential(nn.Linear(4, 4), Raise()).double(), ModelSplitStrategy({"model.0": 0}, chunks=1))


# -------------------------------------------------------------------------------------------- inputs


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, pair: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(layer(x) for layer, x in zip((self.a, self.b), pair, strict=False))


class PairInput(Wrapped):
    """Feeds ``model`` a tuple of inputs requiring gradients and keeps their gradients."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.inputs = tuple(batch[0].clone().requires_grad_() for _ in range(self.width))
        output = self(self.inputs)
        loss = sum(t.mean() for t in output)
        for x in self.inputs:
            x.retain_grad()
        return loss  # type: ignore[return-value]


@pytest.mark.parametrize("width", [2, 1])
def test_tuple_inputs_pass_through_and_get_gradients(width: int) -> None:
    torch.manual_seed(0)
    module = PairInput(nn.Sequential(Pair()).double())
    module.width = width
    fit(module, ModelSplitStrategy({"model.0": 0}, chunks=2), devices=1)
    assert all(x.grad is not None for x in module.inputs)
    assert (module.model[0].a.weight.grad is not None) and (
        (module.model[0].b.weight.grad is not None) == (width == 2)
    )


def test_a_second_positional_argument_is_a_type_error() -> None:
    class TwoArgs(Wrapped):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self.model(batch[0], batch[0]).sum()

    with pytest.raises(TypeError):
        fit(TwoArgs(linears()), ModelSplitStrategy(halves(), chunks=2))


class Tagged(nn.Module):
    """Returns a tensor and a string."""

    def forward(self, x: Tensor) -> tuple[Tensor, str]:
        return x, "hello"


def test_non_tensor_outputs_pass_through_and_tensorless_inputs_are_refused() -> None:
    class Strings(Wrapped):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.output = self(batch[0])
            with pytest.raises(PipelineError, match="no tensor"):
                self.model("hello")
            return self.output[0].sum()

    module = Strings(nn.Sequential(nn.Linear(4, 4), Tagged()).double())
    fit(module, ModelSplitStrategy({"model.0": 0}, chunks=2), devices=1)
    assert module.output[1] == "hello" and module.output[0].shape == (4, 4)


# ---------------------------------------------------------------------------------------- BatchNorm


def tilted(n: int = 16) -> Tensor:
    """Samples whose channels have very different scales, and whose means grow along the batch: micro-batch
    statistics differ from each other and from the batch's."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 4, 4, generator=g, dtype=F64) * torch.tensor([1.0, 10.0, 100.0], dtype=F64).view(
        3, 1, 1
    )
    return x + torch.arange(n, dtype=F64).view(n, 1, 1, 1)


def conv_bn(momentum: float | None = 0.1) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, momentum=momentum), nn.Flatten()).double()


SPLIT, ALONE = {"model.0": 0, "model.1": 1, "model.2": 1}, {"model.0": 0}  # conv | bn, or the bn alone


@pytest.mark.parametrize(
    ("checkpoint", "momentum", "placement"),
    [(None, 0.1, SPLIT), ("all", None, SPLIT), ("all", 0.1, ALONE), (None, None, ALONE)],
)
def test_deferred_batchnorm_tracks_the_unsplit_running_statistics(
    checkpoint: str | None, momentum: float | None, placement: dict[str, int]
) -> None:
    model, x = conv_bn(momentum), tilted()
    if placement is ALONE:
        model = nn.Sequential(model[1]).double()  # the BatchNorm alone
    unsplit = copy.deepcopy(model).train()
    unsplit(x)
    split = fit(model, ModelSplitStrategy(placement, chunks=4, checkpoint=checkpoint), x=x)
    for ours, theirs in zip(split.model.modules(), unsplit.modules(), strict=True):
        if isinstance(ours, nn.BatchNorm2d):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-10, atol=1e-10)
            assert int(ours.num_batches_tracked) == 1
            assert not ours.running_mean.requires_grad and ours.running_mean.grad_fn is None
    split.eval(), unsplit.eval()
    torch.testing.assert_close(split(x), unsplit(x), rtol=1e-10, atol=1e-10)  # eval uses them


def test_batchnorm_with_chunks_1_is_the_unsplit_layer() -> None:
    model, x = conv_bn(), tilted()
    loss, grads = reference(model, x)
    for checkpoint in (None, "all"):
        split = fit(model, ModelSplitStrategy({"model": 0}, chunks=1, checkpoint=checkpoint), devices=1, x=x)
        assert_same_step(split, loss, grads)


def test_each_micro_batch_is_normalised_on_its_own_statistics() -> None:
    model, x = nn.Sequential(nn.BatchNorm2d(3)).double(), tilted()
    per_micro_batch = torch.cat([copy.deepcopy(model)(part) for part in x.chunk(4)])
    outputs: list[Tensor] = []
    model.register_forward_hook(lambda m, a, o: outputs.append(o.detach()))

    class Whole(Wrapped):
        def forward(self, x: Tensor) -> Tensor:
            return self.model(x)

    fit(Whole(model), ModelSplitStrategy({"model": 0}, chunks=4), devices=1, x=x)
    torch.testing.assert_close(outputs[-1], per_micro_batch, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------- checkpoint


def test_dropout_draws_the_same_mask_when_recomputed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    x = torch.rand(8, 4, dtype=F64)
    torch.manual_seed(1)
    plain = fit(copy.deepcopy(model), ModelSplitStrategy(halves(3), chunks=2), x=x)
    torch.manual_seed(1)
    recomputed = fit(model, ModelSplitStrategy(halves(3), chunks=2, checkpoint="all"), x=x)
    assert_same_step(recomputed, plain.loss, plain.grads)  # type: ignore[arg-type]


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class Through(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return Identity.apply(x)


def test_python_autograd_functions_and_inputs_without_gradients_train() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(Through(), nn.Linear(4, 4), Through()).double(), torch.rand(4, 4, dtype=F64)
    loss, grads = reference(model, x)
    placement = {"model.0": 0, "model.1": 0, "model.2": 1}
    split = fit(model, ModelSplitStrategy(placement, chunks=2, checkpoint="all"), x=x)
    assert_same_step(split, loss, grads)


class AddInPlace(nn.Module):
    """``foo * (bar + 1)``, the ``+ 1`` in place on ``bar``: not idempotent, so a recomputation that ran on
    the modified ``bar`` would give ``foo`` a wrong gradient (torchgpipe's ``inplace_incorrect_grad``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, dtype=F64))

    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        foo, bar = pair
        bar.add_(1)
        return foo * bar * self.scale


def test_in_place_operations_in_recomputed_stages_give_the_unsplit_gradients() -> None:
    model, x = linears(3), torch.rand(4, 4, dtype=F64)
    model.insert(1, nn.ReLU(inplace=True))
    model.insert(0, nn.ReLU(inplace=True))  # on the input, which needs no gradient
    loss, grads = reference(model, x.clone())
    placement = {f"model.{i}": int(i >= 2) for i in range(5)}  # the second ReLU right after the hand-off
    split = fit(model, ModelSplitStrategy(placement, chunks=2, checkpoint="all"), x=x)
    assert_same_step(split, loss, grads)

    class Pairs(Wrapped):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.foo = batch[0].clone().requires_grad_()
            return self((self.foo, torch.ones_like(batch[0]))).sum()

    module = Pairs(nn.Sequential(AddInPlace()))
    fit(module, ModelSplitStrategy({"model.0": 0}, chunks=2, checkpoint="all"), devices=1)
    assert torch.equal(module.foo.grad, torch.full_like(module.foo, 2.0))


# ------------------------------------------------------------------------------------ module checks


def test_unused_devices_hold_nothing() -> None:
    model, x = linears(3), torch.rand(4, 4, dtype=F64)
    loss, grads = reference(model, x)
    strategy = ModelSplitStrategy({"model.0": 0, "model.1": 1, "model.2": 1}, chunks=2)
    assert_same_step(fit(model, strategy, devices=3, x=x), loss, grads)


def test_an_empty_stage_sequence_is_refused() -> None:
    with pytest.raises(PipelineError, match="names none"):
        ModelSplitStrategy({}, chunks=2)


class Chain(nn.Module):
    """Not an nn.Sequential, but its forward is the chain of its children."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


def test_a_chain_that_is_not_a_sequential_trains_and_shared_modules_stay_on_one_device() -> None:
    model, x = Chain().double(), torch.rand(4, 4, dtype=F64)
    loss, grads = reference(model, x)
    assert_same_step(fit(model, ModelSplitStrategy({"model.a": 0, "model.b": 1}, chunks=2), x=x), loss, grads)
    shared = nn.Linear(4, 4).double()
    model = nn.Sequential(shared, shared)
    loss, grads = reference(model, x)
    assert_same_step(fit(model, ModelSplitStrategy("auto", chunks=2), devices=1, x=x), loss, grads)
    with pytest.raises(PlacementError, match=r"same \(tied\) parameter"):
        fit(nn.Sequential(shared, shared), ModelSplitStrategy({"model.0": 0, "model.1": 1}, chunks=2))


# ------------------------------------------------------------------------------------------- balance


class TrainingOnly(nn.Module):
    """Fails unless in training mode; returns a pair, one half detached."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.training, "timed outside training mode"
        return x, x.detach()


class Add(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        return self.linear(pair[0] + pair[1])


def test_balance_by_time_times_tuples_in_training_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), TrainingOnly(), Add()).double()
    x = torch.rand(4, 4, dtype=F64)
    loss, grads = reference(model, x)
    split = fit(model, ModelSplitStrategy("auto", chunks=2, balance="time"), x=x, example=x)
    assert_same_step(split, loss, grads)
    evaluated = Wrapped(model, example=x).eval()  # timed in training mode all the same, left in eval mode
    strategy = ModelSplitStrategy("auto", chunks=2, balance="time")
    strategy.connect(evaluated)
    strategy.split.plan(evaluated, [torch.device("cpu")] * 2)
    assert not evaluated.training and not model[1].training
