"""A tiny random causal LM (transformers' Llama or Qwen2, nothing downloaded) with PEFT LoRA adapters, as a
LightningModule that records its losses and the adapters' gradients, for the LoRA equivalence tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ = 64, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]


def causal_lm(arch: str = "llama", layers: int = 4, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A tiny random Llama / Qwen2 causal LM (width 16), in ``dtype``."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    config = transformers.Qwen2Config(**common) if arch == "qwen2" else transformers.LlamaConfig(**common)
    cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    return cls(config).to(dtype)


def with_lora(model: torch.nn.Module, r: int = 4) -> torch.nn.Module:
    """PEFT LoRA on the attention's q/v and the MLP's down projection; B random too (not zero), so every
    adapter weight has a gradient from the first step."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )
    return peft.get_peft_model(model, config)


class LoraLM(pl.LightningModule):
    """``self.model``: a PEFT ``PeftModel`` over a tiny causal LM; next-token loss, SGD on the adapters."""

    def __init__(self, arch: str = "llama", layers: int = 4, seed: int = 0, lr: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = with_lora(causal_lm(arch, layers))
        self.lr = lr
        self.losses: list[float] = []
        self.grads: list[dict[str, Tensor]] = []
        self.example_input_array = tokens(2)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (input_ids,) = batch
        logits = self(input_ids)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB).double(), input_ids[:, 1:].reshape(-1).to(logits.device)
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))  # dp: the replicas' losses combined, once per step

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads.append(
            {n: p.grad.detach().cpu().clone() for n, p in self.named_parameters() if p.grad is not None}
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


#: What transformers' from_pretrained(device_map=...) leaves on the causal LM: its submodules -> devices
#: (on CPU devices an int is a position in the strategy's devices, or in a ddp_split process's group).
HF_DEVICE_MAP: dict[str, int] = {
    "model.embed_tokens": 0,
    "model.rotary_emb": 0,
    "model.layers.0": 0,
    "model.layers.1": 1,
    "model.norm": 1,
    "lm_head": 1,
}


def dispatch(module: LoraLM, device_map: dict[str, int] | None = None) -> None:
    """Dispatch ``module``'s causal LM as a user would: accelerate's ``dispatch_model`` attaches its hooks
    (all on the CPU here) and the model carries ``device_map`` (default :data:`HF_DEVICE_MAP`) as its
    ``hf_device_map``, as from_pretrained(device_map=...) leaves it on GPUs."""
    accelerate = pytest.importorskip("accelerate")
    device_map = dict(HF_DEVICE_MAP if device_map is None else device_map)
    causal_lm = module.model.base_model.model
    accelerate.dispatch_model(causal_lm, {k: "cpu" for k in device_map}, force_hooks=True)
    causal_lm.hf_device_map = device_map


def tokens(batch: int = 8, seed: int = 0) -> Tensor:
    return torch.randint(1, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def token_loader(n: int = 8, batch: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(tokens(n, seed=1)), batch_size=batch)


def trainable_weights(module: pl.LightningModule) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


class LoraChain(pl.LightningModule):
    """``self.model``: PEFT LoRA (the feed-forward layers) over our TransformerNet, a chain of stages, so it
    pipelines (``chunks > 1``); classifies token sequences, SGD on the adapters."""

    def __init__(self, layers: int = 4, seed: int = 0, lr: float = 0.5) -> None:
        super().__init__()
        peft = pytest.importorskip("peft")
        from examples.models import TransformerNet

        torch.manual_seed(seed)
        net = TransformerNet(VOCAB, 16, 2, layers, 3, SEQ).double()
        config = peft.LoraConfig(r=4, target_modules=["linear1", "linear2"], init_lora_weights=False)
        self.model = peft.get_peft_model(net, config)
        self.lr = lr
        self.losses: list[float] = []
        self.grads: list[dict[str, Tensor]] = []

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (input_ids,) = batch
        labels = (input_ids.sum(dim=1) % 3).to(self.device)
        return torch.nn.functional.cross_entropy(self(input_ids), labels.to(input_ids.device))

    on_train_batch_end = LoraLM.on_train_batch_end
    on_before_optimizer_step = LoraLM.on_before_optimizer_step
    configure_optimizers = LoraLM.configure_optimizers
