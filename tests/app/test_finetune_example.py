"""The fine-tuning example (``model=causal_lm``, docs/finetune.md) end to end on CPU devices, as a user
runs it: LoRA on a tiny random Llama split by placement='auto' in bf16 with gradient checkpointing, its
adapters exported and loaded by PEFT; ddp_split; a local pretrained checkpoint; a device-mapped one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_gpupar.cli.ckpt import main as ckpt_main
from tests.app.test_train_app import run_app
from tests.helpers.markers import requires_cuda

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

#: One short epoch of the example on the synthetic tokens.
SHORT = (
    "model=causal_lm",
    "data.num_samples=96",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
)


def best_checkpoint(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("best checkpoint: "))
    return Path(line.removeprefix("best checkpoint: "))


@pytest.mark.slow
def test_lora_in_bf16_with_gradient_checkpointing_split_by_auto_and_its_adapters_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    result = run_app(
        run,
        *SHORT,
        "model.dtype=bfloat16",
        "model.gradient_checkpointing=true",
        "strategy=model_split",
        "strategy.placement=auto",
        "strategy.device_ids=2",
    )
    assert "test_loss:" in result.stdout
    assert "model.base_model.model.model.layers.3" in result.stdout + result.stderr  # the plan, by layers
    adapter = tmp_path / "adapter"
    args = ["export", str(best_checkpoint(result.stdout)), str(adapter), "--submodule", "model"]
    assert ckpt_main([*args, "--trainable-only", "--format", "safetensors"]) == 0
    base = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(
            vocab_size=16,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )
    loaded = peft.PeftModel.from_pretrained(base, adapter)
    weight = loaded.get_parameter("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight")
    assert weight.abs().sum() > 0  # trained: LoRA's B starts at zero


@pytest.mark.slow
def test_lora_under_ddp_split_two_processes_of_two_devices(tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        *SHORT,
        "strategy=ddp_split",
        "strategy.device_ids=4",
        "strategy.devices_per_process=2",
    )
    assert "test_loss:" in result.stdout


def save_tiny_pretrained(path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
def test_a_local_pretrained_checkpoint_is_fine_tuned(tmp_path: Path) -> None:
    pretrained = save_tiny_pretrained(tmp_path / "tiny-llama")
    (tmp_path / "run").mkdir()
    result = run_app(
        tmp_path / "run",
        *SHORT,
        f"model.pretrained={pretrained}",
        "strategy=model_split",
        "strategy.device_ids=2",
    )
    assert "test_loss:" in result.stdout


@pytest.mark.slow
@pytest.mark.cuda
@requires_cuda  # on CPU-only machines transformers leaves no hf_device_map (everything is on the CPU)
def test_a_device_mapped_pretrained_model_keeps_its_map(tmp_path: Path) -> None:
    pretrained = save_tiny_pretrained(tmp_path / "tiny-llama")
    gpus = list(range(min(2, torch.cuda.device_count())))
    (tmp_path / "run").mkdir()
    result = run_app(
        tmp_path / "run",
        *[o for o in SHORT if o != "trainer.accelerator=cpu"],
        "trainer.accelerator=gpu",
        f"model.pretrained={pretrained}",
        "model.device_map=auto",
        "strategy=model_split",
        "strategy.placement=device_map",
        f"strategy.device_ids=[{','.join(map(str, gpus))}]",
    )
    assert "test_loss:" in result.stdout
