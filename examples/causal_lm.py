"""Fine-tune a causal language model (transformers) with PEFT LoRA: the example for ``model=causal_lm``.

By default a tiny random Llama (nothing downloaded); ``pretrained=PATH`` loads a local checkpoint instead
(``local_files_only``). ``lora_r=0`` trains every weight (full fine-tuning). ``dtype=bfloat16`` keeps the base
weights in bf16 (PEFT keeps the adapters in float32); ``gradient_checkpointing`` recomputes each layer's
activations in backward. ``device_map`` is handed to ``from_pretrained`` (``"auto"``: accelerate maps the
layers over the GPUs) for ``strategy.placement=device_map``. The batch's first element is the token ids;
the loss is the model's own next-token loss. See docs/finetune.md.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class CausalLM(pl.LightningModule):
    """``self.model``: a transformers causal LM, wrapped by PEFT LoRA unless ``lora_r=0``."""

    def __init__(
        self,
        pretrained: str | None = None,
        arch: str = "llama",
        vocab_size: int = 16,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        max_len: int = 64,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        device_map: Any = None,
        lr: float = 1e-3,
        example_shape: tuple[int, int] = (1, 16),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
        model: Any = _base_model(self.hparams)  # a transformers PreTrainedModel
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model: nn.Module = _with_lora(model, self.hparams) if lora_r > 0 else model
        self.lr = lr
        vocab = int(model.config.vocab_size)
        self.example_input_array = torch.randint(0, vocab, tuple(example_shape))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, batch: Any) -> Tensor:
        input_ids = batch[0] if isinstance(batch, list | tuple) else batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def _base_model(h: Any) -> nn.Module:
    import transformers

    dtype = DTYPES[h.dtype]
    if h.pretrained:
        options: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        if h.device_map is not None:
            options["device_map"] = h.device_map
        return transformers.AutoModelForCausalLM.from_pretrained(h.pretrained, **options)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}.get(h.arch)
    if config_cls is None:
        raise ValueError(f"arch={h.arch!r}: choose llama or qwen2 (or pretrained=PATH for any causal LM).")
    config = config_cls(
        vocab_size=h.vocab_size,
        hidden_size=h.hidden_size,
        intermediate_size=h.intermediate_size,
        num_hidden_layers=h.num_layers,
        num_attention_heads=h.num_heads,
        num_key_value_heads=h.num_kv_heads or h.num_heads,
        max_position_embeddings=h.max_len,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model: nn.Module = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _with_lora(model: nn.Module, h: Any) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=h.lora_r,
        lora_alpha=h.lora_alpha,
        lora_dropout=h.lora_dropout,
        target_modules=list(h.target_modules),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)
