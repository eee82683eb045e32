"""The Lightning side of a :class:`~lightning_gpupar.model_split.ModelSplit`, shared by ``model_split`` and
``ddp_split``: the hooks through which a strategy places its model copy over a list of devices.

How it works: docs/internals.md, section ``lightning_gpupar/strategies/split_mixin.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.init import _EmptyInit
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gpupar.model_split import AppliedSplit, ModelSplit, PlacementError, PlacementPlan
from lightning_gpupar.model_split.precision import stage_autocast, stage_precisions
from lightning_gpupar.strategies.split_schedule import check_one_f_one_b, one_f_one_b_step

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy as _StrategyBase
else:
    _StrategyBase = object


def optimizer_state_to_parameter_devices(optimizer: Optimizer) -> None:
    """Move each parameter's optimizer state (but ``step`` counters) to that parameter's device."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                state[key] = value.to(param.device)


def planning_inputs(module: torch.nn.Module, warn: bool = True) -> dict[str, Any]:
    """What the plan's training-memory estimate can use before placement: the optimizer
    ``configure_optimizers`` returns (its first, when it returns several) and ``example_input_array``.
    When ``configure_optimizers`` cannot run yet, the ``optimizer`` key is missing (the plan assumes
    Adam-style state), with a warning if ``warn``."""
    found: dict[str, Any] = {"example_input": getattr(module, "example_input_array", None)}
    if isinstance(module, pl.LightningModule):
        try:
            optimizers, _, _ = _configure_optimizers(module.configure_optimizers())  # type: ignore[arg-type]
            found["optimizer"] = optimizers[0] if optimizers else None
        except Exception as err:  # a hook that needs the trainer's loop state: fall back to the assumption
            if warn:
                rank_zero_warn(
                    f"configure_optimizers could not run before placement ({type(err).__name__}: {err}); "
                    "the plan assumes Adam-style optimizer state (2 tensors per parameter).",
                    category=UserWarning,
                )
    else:
        found["optimizer"] = None
    return found


def module_signature(module: torch.nn.Module) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """What a plan depends on in the module itself: each parameter's and buffer's name, shape and dtype
    (a layer ``configure_model`` builds, or the precision plugin's conversion, changes it)."""
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    return tuple((name, tuple(t.shape), t.dtype) for name, t in tensors)


@dataclass(frozen=True)
class FitPlan:
    """The plan of one fit, for the module, devices and tensors of ``key``: computed once, then read by
    ``root_device`` before placement and applied by ``model_to_device``.

    ``error``: why planning failed (e.g. layers ``configure_model`` builds later); ``final``: planned with
    everything placement uses (the optimizer from ``configure_optimizers``), so placement need not plan again.
    """

    key: tuple[Any, ...]
    plan: PlacementPlan | None
    error: PlacementError | None = None
    final: bool = True


class SplitStrategyMixin(_StrategyBase):
    """Place one model copy over :attr:`split_devices` as :attr:`split` says; see the module docstring."""

    split: ModelSplit
    applied: AppliedSplit | None = None
    _pipeline_use_checked: bool = False
    #: This fit's plan (see :class:`FitPlan`); forgotten at teardown.
    fit_plan: FitPlan | None = None
    #: The position ``root_device`` answered before placement, during a fit: placement keeps outputs there.
    _promised_position: int | None = None
    #: ``schedule="1f1b"``: the gradients this step's ``training_step`` computed, added in :meth:`backward`
    _step_grads: list[tuple[torch.nn.Parameter, Tensor | None]] | None = None

    @property
    def split_devices(self) -> list[torch.device]:
        """The devices this process splits its model copy over; placement positions index this list."""
        raise NotImplementedError

    @property
    def split_title(self) -> str:
        """How the placement table printed at setup is headed."""
        return type(self).__name__

    @property
    @override
    def root_device(self) -> torch.device:
        """The output device: where batches arrive and outputs, loss and metrics live."""
        if self.applied is not None:
            return self.applied.plan.output_device
        return self._output_device_before_placement()

    def _output_device_before_placement(self) -> torch.device:
        """Where this fit's plan puts outputs, before it is applied, so that the first CUDA call
        (``setup_environment``'s ``set_device``) is on that device rather than on the last one.

        The first answer during a fit is a promise: later reads give the same device, and
        :meth:`model_to_device` keeps outputs there. It comes from this fit's plan (:meth:`planned`, sizes
        and optimizer; nothing moves); while no module exists or its layers are still to be built
        (``configure_model``), from the declared ``output_device`` position, else the last device.
        ``balance="time"`` plans only in :meth:`model_to_device`, on the module Lightning converted to the
        run's precision: before, the declared ``output_device``, else the last device (where its plans put
        the output unless ``max_memory`` leaves the last device empty)."""
        devices = self.split_devices
        module = self.lightning_module
        if self._promised_position is not None and self._promised_position < len(devices):
            return devices[self._promised_position]
        position = self.split.output_device
        position = position if position is not None and position < len(devices) else len(devices) - 1
        if module is not None and not (self.split.balance == "time" and self.split.is_auto):
            fit_plan = self.planned(module, devices, final=False)
            if fit_plan.plan is not None and fit_plan.plan.entries:  # no entries: no layers built yet
                position = fit_plan.plan.output_position
        if module is not None:  # a fit is under way (connect): Lightning sets its device from this answer
            self._promised_position = position
        return devices[position]

    def planned(self, module: torch.nn.Module, devices: list[torch.device], final: bool = True) -> FitPlan:
        """This fit's plan of ``module`` over ``devices``: computed on the first call, then the same one
        while the module, its tensors and the devices stay the same (a changed model plans again).
        ``final``: the plan placement applies (planning errors raise; a plan made while
        ``configure_optimizers`` could not run yet is made again)."""
        key = (id(module), tuple(devices), module_signature(module))
        cached = self.fit_plan
        if cached is not None and cached.key == key and (cached.final or not final):
            if final and cached.error is not None:
                raise cached.error
            return cached
        inputs = planning_inputs(module, warn=final)
        try:
            plan = self.compute_plan(module, devices, **inputs)
        except PlacementError as err:
            if final:
                raise
            self.fit_plan = FitPlan(key, None, err, final=False)
        else:
            self.fit_plan = FitPlan(key, plan, final="optimizer" in inputs)
        return self.fit_plan

    def compute_plan(
        self, module: torch.nn.Module, devices: list[torch.device], **inputs: Any
    ) -> PlacementPlan:
        """Plan ``module`` over ``devices`` with the planning ``inputs`` (optimizer, example input), in the
        run's precision (``balance="time"`` times the stages as training will run them)."""
        return self.split.plan(module, devices, precision=self.precision_plugin, **inputs)

    def check_plan(self, plan: PlacementPlan) -> None:
        """A last check of the plan just before it is applied (ddp_split: the same on every rank)."""

    @override
    def model_to_device(self) -> None:
        """Plan (once per fit), print, check free memory, place; then pipeline the stage sequence if
        ``chunks > 1``."""
        assert self.model is not None
        self._unplace()
        plan = self.make_plan()
        mixed = self.precision_plugin
        if isinstance(mixed, MixedPrecision):
            dtype = torch.bfloat16 if mixed.precision == "bf16-mixed" else torch.float16
            plan = dataclasses.replace(plan, precision=stage_precisions(plan.devices, mixed.device, dtype))
        self.applied = self.split.apply(self.model, self.split_devices, self.split_title, plan=plan)

    def make_plan(self) -> PlacementPlan:
        """The plan :meth:`model_to_device` applies: this fit's (:meth:`planned`), its output on the device
        ``root_device`` already answered before placement, checked by :meth:`check_plan`."""
        assert self.model is not None
        devices = self.split_devices
        fit_plan = self.planned(self.model, devices)
        assert fit_plan.plan is not None
        plan = fit_plan.plan
        promised = self._promised_position
        if promised is not None and promised < len(devices) and devices[promised] != plan.output_device:
            rank_zero_info(
                f"{self.split_title}: outputs go to position {promised} ({devices[promised]}), the device "
                f"the run was set up on before placement, not position {plan.output_position}; declare "
                "output_device to choose it."
            )
            plan = dataclasses.replace(plan, output_position=promised)
        self.check_plan(plan)
        return plan

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """``Trainer.init_module()`` and ``configure_model`` build the model on the CPU, not on
        ``root_device``: the whole model on one GPU is the out-of-memory error splitting exists to avoid;
        placement then moves each part to its device."""
        with _EmptyInit(enabled=bool(empty_init)), self.precision_plugin.tensor_init_context():
            yield

    @contextmanager
    def _stage_autocast(self) -> Iterator[None]:
        """Each stage's own autocast, for device types Lightning's does not cover (a CPU stage by GPUs)."""
        with stage_autocast(self.applied.plan.precision if self.applied is not None else ()):
            yield

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._stage_autocast():
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._stage_autocast():
            return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._stage_autocast():
            return super().predict_step(*args, **kwargs)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            for optimizer in self.optimizers:  # undo Lightning's move of all state to root_device
                optimizer_state_to_parameter_devices(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """torch's ``Optimizer.load_state_dict`` already puts each state on its parameter's device."""
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)

    @override
    def on_train_start(self) -> None:
        """Fail before the first step if the training batches are smaller than ``chunks``."""
        super().on_train_start()
        module = self.lightning_module
        loader = module.trainer.train_dataloader if module is not None else None
        self.split.check_batch_size(getattr(loader, "batch_size", None))
        if module is not None and self.split.schedule == "1f1b":
            check_one_f_one_b(module)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The LightningModule's step; after the first one, warn if ``chunks > 1`` had no effect."""
        staged = self.applied.staged if self.applied is not None else None
        if staged is not None and torch.is_grad_enabled():
            return self._scheduled_training_step(staged, args, kwargs)
        if self._pipeline_use_checked:
            with self._stage_autocast():
                return super().training_step(*args, **kwargs)
        pipeline = self.applied.pipeline if self.applied is not None else None
        calls = pipeline.calls if pipeline is not None else 0
        with self._stage_autocast():
            output = super().training_step(*args, **kwargs)
        if pipeline is not None:
            self._pipeline_use_checked = True
            if pipeline.calls == calls:
                rank_zero_warn(
                    f"chunks={self.split.chunks}, but the first training step never called the forward of "
                    f"{pipeline.owner_name}, so no batch was split into micro-batches: the pipeline only "
                    "replaces that forward, and a training_step that calls the stages itself runs them on "
                    "the whole batch. Call the owner (e.g. self.model(x)) in training_step, or use chunks=1.",
                    category=UserWarning,
                )
        return output

    def _scheduled_training_step(self, staged: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``schedule="1f1b"``: forward and backward of every micro-batch (:mod:`.split_schedule`)."""
        module = self.lightning_module
        assert module is not None
        scaler = getattr(self.precision_plugin, "scaler", None)
        training_step = super().training_step

        def step(*step_args: Any, **step_kwargs: Any) -> Any:
            with self._stage_autocast():
                return training_step(*step_args, **step_kwargs)

        # Lightning zeroes gradients between training_step and backward: this step's gradients are kept
        # aside and added in backward(), so zero_grad and accumulation act on them as usual
        params = [p for p in module.parameters() if p.requires_grad]
        held = [p.grad for p in params]
        for param in params:
            param.grad = None
        try:
            with self.gradient_sync_blocked():
                loss = one_f_one_b_step(
                    module, staged, self.split.chunks, step, args, kwargs, scaler.scale if scaler else None
                )
            self.after_scheduled_backward()
            self._step_grads = [(p, p.grad) for p in params]
        finally:
            for param, grad in zip(params, held, strict=True):
                param.grad = grad
        return loss

    @contextmanager
    def gradient_sync_blocked(self) -> Iterator[None]:
        """Around a 1F1B step: no gradient synchronisation (``ddp_split`` blocks DDP's reducer)."""
        yield

    def after_scheduled_backward(self) -> None:
        """After a 1F1B step's backward (``ddp_split`` averages the gradients over processes here)."""

    @override
    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """After a 1F1B step the backward already ran: the hooks run once with the step's mean loss, and
        the step's gradients are added to ``.grad`` between ``on_before_backward`` and
        ``on_after_backward``, where a backward would add them."""
        if self._step_grads is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        step_grads, self._step_grads = self._step_grads, None
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        self.precision_plugin.pre_backward(closure_loss, module)
        for param, grad in step_grads:
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def teardown(self) -> None:
        self._unplace()
        self.fit_plan, self._promised_position = None, None  # the next fit plans again
        super().teardown()

    def _unplace(self) -> None:
        if self.applied is not None:
            self.applied.remove()
            self.applied = None
