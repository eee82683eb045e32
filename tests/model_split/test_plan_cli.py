"""gpupar-plan: the plan of a Hydra config of the example app, printed without training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_gpupar.cli.plan import compose_config, main, plan_for_config
from lightning_gpupar.model_split import PlacementError

ROOT = Path(__file__).resolve().parents[2]


def test_prints_the_plan_of_a_config_with_every_part_of_memory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    overrides = [
        "strategy=model_split",
        "model=transformer",
        "trainer.accelerator=cpu",
        "strategy.device_ids=3",
        "data.num_samples=64",
        "strategy.max_memory={0:8MiB}",
    ]
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "model.blocks.3" in out and "model.head" in out
    for position in ("0    cpu", "1    cpu", "2    cpu"):
        assert position in out
    assert "8.0 MiB cap" in out and "optimizer state: Adam: 2 tensors" in out
    assert "activations: measured on the meta device (example input, batch of" in out


def test_a_strategy_that_places_nothing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match=r"strategy DataParallelStrategy places no submodules"):
        main(["strategy=dp", "trainer.accelerator=cpu", "strategy.device_ids=2"])


@pytest.mark.slow
def test_runs_as_a_module_from_the_command_line() -> None:
    command = [
        sys.executable,
        "-m",
        "lightning_gpupar.cli.plan",
        "strategy=ddp_split",
        "trainer.accelerator=cpu",
    ]
    command += ["strategy.device_ids=4", "strategy.devices_per_process=2", "model=transformer", "--no-data"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    assert "model.blocks.0" in done.stdout and "activations: not counted" in done.stdout


@pytest.mark.slow  # builds a transformers model on the meta device and runs its forward there
def test_a_lora_plan_counts_gradients_and_optimizer_state_for_the_adapters_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Llama shape (width 1024, 4 layers) in bf16 on meta: LoRA r=16 fits under caps that full
    fine-tuning exceeds, and the refusal says what each device would need."""
    monkeypatch.chdir(ROOT)
    shape = ["model=causal_lm", "model.vocab_size=32000", "model.hidden_size=1024", "model.num_heads=8"]
    shape += ["model.intermediate_size=2752", "model.num_layers=4", "model.dtype=bfloat16"]
    common = [*shape, "strategy=model_split", "trainer.accelerator=cpu", "strategy.device_ids=2"]
    caps = "strategy.max_memory={0:200MiB,1:200MiB}"
    assert main([*common, "model.lora_r=16", caps, "--no-data"]) == 0
    out = capsys.readouterr().out
    assert "model.base_model.model.model.layers.3" in out and "200.0 MiB cap" in out
    with pytest.raises(PlacementError, match=r"placement='auto' cannot fit the model under max_memory"):
        main([*common, "model.lora_r=0", caps, "--no-data"])

    config_dir = ROOT / "conf"
    lora = plan_for_config(compose_config(config_dir, "config", [*common, "model.lora_r=16"]), use_data=False)
    full = plan_for_config(compose_config(config_dir, "config", [*common, "model.lora_r=0"]), use_data=False)
    lora_parts, full_parts = lora.memory_per_position(), full.memory_per_position()
    params = sum(p.params for p in full_parts)
    assert sum(p.grads for p in full_parts) == params  # every bf16 weight has a gradient
    adapters = 4 * 16 * (1024 + 1024) * 4 * 4  # q, k, v, o; r=16; 4 layers; float32
    assert sum(p.grads for p in lora_parts) == adapters
    assert sum(p.optimizer for p in lora_parts) == 2 * adapters  # AdamW: two float32 tensors each


def test_prints_the_plan_of_a_device_map(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    overrides = ["strategy=model_split", "model=transformer", "model.num_layers=2", "trainer.accelerator=cpu"]
    overrides += ["strategy.device_ids=2", "--no-data", "--device-map-of", "model", "--device-map"]
    device_map = '{"embed": 0, "blocks.0": 0, "blocks.1": 1, "head": 1}'
    assert main([*overrides, device_map]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    placed = {row[0]: row[1] for row in rows if row and row[0].startswith("model.")}
    assert placed == {"model.embed": "0", "model.blocks.0": "0", "model.blocks.1": "1", "model.head": "1"}
    with pytest.raises(PlacementError, match=r"entry 'blocks\.9': 1: No submodule 'model\.blocks\.9'"):
        main([*overrides, '{"embed": 0, "blocks.0": 0, "blocks.9": 1, "head": 1}'])
