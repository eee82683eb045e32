"""``strategy="dp"`` replicates whatever ``nn.DataParallel`` replicates: one test per point of
``torch.nn.parallel.replicate``, each comparing loss and gradients with single-device training (float64).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from lightning_gpupar.dp.replicate import replicate
from tests.helpers.conformance import Batch, Case, assert_same_training, fit, reference

FEATURES, CLASSES = 4, 3


def features_batch(n: int, g: torch.Generator) -> Batch:
    return {
        "x": torch.randn(n, FEATURES, generator=g, dtype=torch.float64),
        "y": torch.randint(0, CLASSES, (n,), generator=g),
    }


def classify(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


@pytest.fixture(params=[2, 3], ids=["2 replicas", "3 replicas"])
def replicas(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def assert_dp_equals_single_device(case: Case, replicas: int) -> torch.nn.Module:
    """7 samples per step (uneven shards); returns the dp-trained LightningModule."""
    trained = fit(case, strategy="dp", devices=replicas)
    assert_same_training(trained, reference(case))
    return trained


# -- None parameters and buffers ------------------------------------------------------------------------


def no_bias() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 8, bias=False), nn.ReLU(), nn.Linear(8, CLASSES))


def test_layers_without_a_bias_train_as_on_one_device(replicas: int) -> None:
    """Issue 10 item 1: a None parameter (``bias=False``) stayed missing in replicas (AttributeError)."""
    assert_dp_equals_single_device(Case("no bias", no_bias, features_batch, classify), replicas)


class InstanceNormNet(nn.Module):
    """InstanceNorm registers ``running_mean`` / ``running_var`` as None buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Linear(FEATURES, 8 * 5)
        self.norm = nn.InstanceNorm1d(8, affine=True)
        self.head = nn.Linear(8 * 5, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.lift(x).view(-1, 8, 5)).flatten(1))


def test_none_buffers_train_as_on_one_device(replicas: int) -> None:
    assert InstanceNormNet().norm.running_mean is None
    assert_dp_equals_single_device(Case("None buffers", InstanceNormNet, features_batch, classify), replicas)


# -- parametrizations -----------------------------------------------------------------------------------


def weight_normed() -> nn.Module:
    return nn.Sequential(
        parametrizations.weight_norm(nn.Linear(FEATURES, 8)), nn.Tanh(), nn.Linear(8, CLASSES, bias=False)
    )


def test_weight_norm_parametrization_trains_as_on_one_device(replicas: int) -> None:
    assert_dp_equals_single_device(Case("weight norm", weight_normed, features_batch, classify), replicas)


def spectral_normed() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 8),
        nn.Tanh(),
        parametrizations.spectral_norm(nn.Linear(8, CLASSES), n_power_iterations=2),
    )


def legacy_spectral_normed() -> nn.Module:
    """``torch.nn.utils.spectral_norm``: a forward pre-hook computes the weight, buffers ``weight_u/v``."""
    return nn.Sequential(
        nn.Linear(FEATURES, 8),
        nn.Tanh(),
        torch.nn.utils.spectral_norm(nn.Linear(8, CLASSES), n_power_iterations=2),
    )


@pytest.mark.parametrize(
    "build", [spectral_normed, legacy_spectral_normed], ids=["parametrization", "legacy hook"]
)
def test_spectral_norm_power_iteration_updates_the_root_as_on_one_device(
    build: Callable[[], nn.Module], replicas: int
) -> None:
    """The power-iteration vectors update in place in training: the first replica shares the root's, as
    ``nn.DataParallel`` does, so the next step starts from the updated vectors (step 2's loss shows it)."""
    case = Case("spectral norm", build, features_batch, classify)
    trained = assert_dp_equals_single_device(case, replicas)
    state, single = trained.state_dict(), reference(case).state_dict()
    vectors = [k for k in state if k.endswith(("._u", "._v", "weight_u", "weight_v"))]
    assert len(vectors) == 2
    torch.manual_seed(0)  # as CaseModule: the vectors the training started from
    initial = build().double().state_dict()
    for key in vectors:
        torch.testing.assert_close(state[key], single[key], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(state[key], initial[key.removeprefix("model.")])


# -- tied parameters ------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight (as GPT-2's ``lm_head``)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def tokens_batch(n: int, g: torch.Generator) -> Batch:
    return {"tokens": torch.randint(0, 11, (n, 5), generator=g)}


def next_token(model: nn.Module, batch: Batch) -> Tensor:
    logits = model(batch["tokens"][:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch["tokens"][:, 1:].flatten())


def test_tied_parameters_stay_tied_in_every_replica(replicas: int) -> None:
    case = Case("tied", TiedLM, tokens_batch, next_token)
    assert_dp_equals_single_device(case, replicas)
    copies = replicate(TiedLM().double(), [torch.device("cpu")] * replicas)
    assert all(r.head.weight is r.embed.weight for r in copies)


def shared_layer() -> nn.Module:
    layer = nn.Linear(FEATURES, FEATURES)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), nn.Linear(FEATURES, CLASSES))


def test_a_submodule_registered_twice_is_one_module_in_every_replica(replicas: int) -> None:
    assert_dp_equals_single_device(Case("shared layer", shared_layer, features_batch, classify), replicas)
    copies = replicate(shared_layer().double(), [torch.device("cpu")] * replicas)
    assert all(r[0] is r[2] for r in copies)


# -- buffers ----------------------------------------------------------------------------------------------


class CountingScale(nn.Module):
    """A non-persistent buffer read in forward, and one updated in place in training (a call counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, CLASSES)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, CLASSES), persistent=False)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.calls.add_(1)
        return self.linear(x) * self.scale * (1 + self.calls / 10)


def test_non_persistent_buffers_are_replicated_and_the_first_replica_updates_the_root(replicas: int) -> None:
    case = Case("non-persistent buffers", CountingScale, features_batch, classify)
    trained = assert_dp_equals_single_device(case, replicas)
    assert "model.calls" not in trained.state_dict()
    assert float(trained.model.calls) == float(reference(case).model.calls) == 2


# -- hooks --------------------------------------------------------------------------------------------------


def hooked() -> nn.Module:
    net = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    net[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    net[0].register_forward_hook(lambda module, args, kwargs, out: out + module.bias, with_kwargs=True)
    net[2].register_forward_pre_hook(
        lambda module, args, kwargs: ((args[0].flip(-1),), kwargs), with_kwargs=True
    )
    net[2].register_forward_hook(lambda module, args, out: out * 3)
    net[2].register_full_backward_pre_hook(lambda module, grad_out: (grad_out[0] * 0.5,))
    net[2].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0].roll(1, -1),))
    return net


def test_forward_and_backward_hooks_run_in_every_replica(replicas: int) -> None:
    case = Case("hooks", hooked, features_batch, classify)
    assert_dp_equals_single_device(case, replicas)
    seen: list[nn.Module] = []
    net = nn.Linear(FEATURES, CLASSES).double()
    net.register_forward_hook(lambda module, args, out: seen.append(module))
    copies = replicate(net, [torch.device("cpu")] * replicas)
    for copy in copies:
        copy(torch.zeros(1, FEATURES, dtype=torch.float64))
    assert [id(m) for m in seen] == [id(c) for c in copies]  # each hook call receives its replica


# -- modules that cache tensors ----------------------------------------------------------------------------


class CachedPositions(nn.Module):
    """Builds a sinusoidal table on first use and keeps it on ``self`` (as rotary embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11)
        self.table: Tensor | None = None

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if self.table is None or self.table.shape[0] < length:
            steps = torch.arange(length, dtype=torch.float64, device=tokens.device)[:, None]
            self.table = torch.sin(steps / 10 ** (torch.arange(6, device=tokens.device) / 6))
        return self.head(self.embed(tokens) + self.table[:length].to(self.embed.weight.dtype))


def test_modules_that_cache_tensors_train_as_on_one_device(replicas: int) -> None:
    case = Case("cache", CachedPositions, tokens_batch, next_token)
    assert_dp_equals_single_device(case, replicas)
    warm = CachedPositions().double()
    warm(
        torch.zeros(1, 4, dtype=torch.long)
    )  # the root holds a cache; replicas read it, their own is dropped
    copies = replicate(warm, [torch.device("cpu")] * replicas)
    assert all(c.table is warm.table for c in copies)
    copies[1](torch.zeros(1, 9, dtype=torch.long))
    assert warm.table is not None and warm.table.shape[0] == 4 and copies[1].table.shape[0] == 9


# -- RNNs ---------------------------------------------------------------------------------------------------


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x.unsqueeze(1).expand(-1, 3, -1))
        return self.head(out[:, -1])


def test_lstm_flat_weights_are_the_replicas_copies(replicas: int) -> None:
    assert_dp_equals_single_device(Case("lstm", LSTMNet, features_batch, classify), replicas)
    root = LSTMNet().double()
    for copy in replicate(root, [torch.device("cpu")] * replicas)[1:]:
        names = copy.lstm._flat_weights_names
        assert len(names) == 8
        assert all(w is getattr(copy.lstm, n) for w, n in zip(copy.lstm._flat_weights, names, strict=True))
        assert all(
            w is not getattr(root.lstm, n) for w, n in zip(copy.lstm._flat_weights, names, strict=True)
        )
