"""gpupar-ckpt: export to the bare network, inspect, and every bad input refused without harm."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_gpupar.cli.ckpt import main
from tests.helpers.checkpoint_support import (
    TinyModule,
    loader,
    make_net,
    quiet_trainer_kwargs,
    saving_as_cuda3,
)


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of a module whose network sits inside nn.DataParallel."""
    tmp = tmp_path_factory.mktemp("run")
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp), max_epochs=1)
    trainer.fit(TinyModule(wrap="dp"), loader())
    trainer.save_checkpoint(tmp / "run.ckpt")
    return tmp / "run.ckpt"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_loads_strictly_into_the_bare_network(run_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "net.pt"
    assert main(["export", str(run_ckpt), str(out), "--submodule", "model"]) == 0
    net = make_net()
    net.load_state_dict(torch.load(out))  # strict, weights_only (torch's default)
    saved = torch.load(run_ckpt)["state_dict"]
    torch.testing.assert_close(net[0].weight, saved["model.module.0.weight"])


def test_export_safetensors(run_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "net.safetensors"
    assert main(["export", str(run_ckpt), str(out), "--submodule", "model", "--format", "safetensors"]) == 0
    make_net().load_state_dict(load_file(out))


def test_inspect_shows_keys_shapes_wrappers_and_metadata(
    run_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(run_ckpt)]) == 0
    shown = capsys.readouterr().out
    assert "model.module.0.weight  (8, 4)  float64  cpu" in shown
    assert "wrapper segments: module. (9 keys)" in shown
    assert "epoch: 1" in shown and "global_step: 4" in shown
    assert "submodules: model, model.0" in shown


@pytest.mark.slow
def test_console_script_runs(run_ckpt: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightning_gpupar.cli.ckpt", "inspect", str(run_ckpt)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "state_dict: 9 entries" in done.stdout


def test_unknown_submodule_lists_candidates(
    run_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(run_ckpt)
    assert main(["export", str(run_ckpt), str(tmp_path / "o.pt"), "--submodule", "encoder"]) == 1
    err = capsys.readouterr().err
    assert "No submodule 'encoder'" in err and "Candidates: model, model.0, model.1, model.3" in err
    assert digest(run_ckpt) == before and not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("kind", ["truncated", "text", "random", "no-state-dict", "pickled", "missing"])
def test_bad_inputs_fail_cleanly_and_leave_the_file(
    run_ckpt: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        bad.write_bytes(run_ckpt.read_bytes()[:500])
    elif kind == "text":
        bad.write_text("epoch: 3\n")
    elif kind == "random":
        bad.write_bytes(bytes(range(256)) * 8)
    elif kind == "no-state-dict":
        torch.save({"epoch": 3, "optimizer_states": []}, bad)
    elif kind == "pickled":
        torch.save({"state_dict": {}, "bad": Namespace(x=1)}, bad)  # any class: needs unpickling
    before = digest(bad) if bad.exists() else None
    for command in (["inspect", str(bad)], ["export", str(bad), str(tmp_path / "o.pt")]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith("gpupar-ckpt: error: ") and "Traceback" not in err
        expected = {
            "truncated": "is truncated",
            "text": "not a readable PyTorch checkpoint",
            "random": "not a readable PyTorch checkpoint",
            "no-state-dict": "no 'state_dict' entry",
            "pickled": "--unsafe-unpickle",
            "missing": "does not exist",
        }[kind]
        assert expected in err
        assert ("--unsafe-unpickle" in err) == (kind == "pickled")
    assert (digest(bad) if bad.exists() else None) == before
    assert not (tmp_path / "o.pt").exists()


def test_export_refuses_to_overwrite_its_input(run_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = digest(run_ckpt)
    assert main(["export", str(run_ckpt), str(run_ckpt), "--force"]) == 1
    assert "is the input checkpoint" in capsys.readouterr().err
    assert digest(run_ckpt) == before


def test_export_keeps_a_module_attribute_that_is_no_wrapper(tmp_path: Path) -> None:
    source = {"module.weight": torch.ones(2, 2), "temperature": torch.ones(1)}
    torch.save(source, tmp_path / "plain.pt")
    assert main(["export", str(tmp_path / "plain.pt"), str(tmp_path / "out.pt")]) == 0
    assert list(torch.load(tmp_path / "out.pt")) == ["module.weight", "temperature"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CUDA checkpoint on a machine without CUDA")
def test_inspect_shows_the_device_a_tensor_was_saved_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with saving_as_cuda3():
        torch.save({"state_dict": {"w": torch.arange(4.0)}}, tmp_path / "gpu.ckpt")
    assert main(["inspect", str(tmp_path / "gpu.ckpt")]) == 0
    assert "w  (4,)  float32  cuda:3" in capsys.readouterr().out


# -- the output format follows OUT's extension; a contradiction with --format is refused -------------------


@pytest.mark.parametrize(
    ("name", "given", "written"),
    [
        ("net.safetensors", None, "safetensors"),
        ("net.SafeTensors", None, "safetensors"),
        ("net.pt", None, "pt"),
        ("net.pth", None, "pt"),
        ("net.bin", None, "pt"),
        ("net.weights", None, "pt"),  # an extension of no format: torch.save, said so
        ("net.weights", "safetensors", "safetensors"),
        ("net.safetensors", "safetensors", "safetensors"),
    ],
)
def test_export_writes_the_format_its_name_says(
    run_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, given: str, written: str
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / name
    extra = ["--format", given] if given else []
    assert main(["export", str(run_ckpt), str(out), "--submodule", "model", *extra]) == 0
    said = capsys.readouterr().out
    if written == "safetensors":
        make_net().load_state_dict(load_file(out))
        assert "safetensors.torch.load_file" in said
    else:
        make_net().load_state_dict(torch.load(out))
        assert "torch.load" in said
    how = "--format" if given else ("the default" if name.endswith(".weights") else "extension")
    assert how in said, said


@pytest.mark.parametrize(("name", "given"), [("net.safetensors", "pt"), ("net.pt", "safetensors")])
def test_export_refuses_a_format_its_name_contradicts(
    run_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, given: str
) -> None:
    assert main(["export", str(run_ckpt), str(tmp_path / name), "--format", given]) == 2
    err = capsys.readouterr().err
    assert f"--format {given}" in err and name in err and "contradict" in err, err
    assert not (tmp_path / name).exists()


# -- a pipe is read; what is neither a regular file nor a pipe is named --------------------------------------


class _Stdin:
    """What ``sys.stdin`` is when a file is piped in: text on top of a binary buffer."""

    def __init__(self, data: bytes, tty: bool = False) -> None:
        import io

        self.buffer = io.BytesIO(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_inspect_and_export_read_stdin_as_dash(
    run_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin(run_ckpt.read_bytes()))
    assert main(["inspect", "-"]) == 0
    assert "model.module.0.weight  (8, 4)  float64  cpu" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", _Stdin(run_ckpt.read_bytes()))
    assert main(["export", "-", str(tmp_path / "net.pt"), "--submodule", "model"]) == 0
    make_net().load_state_dict(torch.load(tmp_path / "net.pt"))


def test_dash_refuses_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin(b"", tty=True))
    assert main(["inspect", "-"]) == 1
    assert "stdin is a terminal" in capsys.readouterr().err


def test_inspect_reads_a_named_pipe(
    run_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(run_ckpt.read_bytes()), daemon=True)
    writer.start()
    try:
        assert main(["inspect", str(fifo)]) == 0
    finally:
        if writer.is_alive():  # nothing read the pipe: open it once, so the writer is not left blocked
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)
    assert "state_dict: 9 entries" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["empty", "truncated"])
def test_a_pipe_that_is_empty_or_cut_short_is_named_so(
    run_ckpt: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    data = b"" if source == "empty" else run_ckpt.read_bytes()[:700]
    monkeypatch.setattr(sys, "stdin", _Stdin(data))
    assert main(["inspect", "-"]) == 1
    err = capsys.readouterr().err
    assert ("is empty" if source == "empty" else "is truncated") in err, err
    assert "stdin" in err and "does not exist" not in err


def test_a_character_device_is_refused_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "/dev/null"]) == 1
    err = capsys.readouterr().err
    assert "is a character device" in err and "a regular file or a pipe" in err, err


@pytest.mark.slow
def test_cat_into_inspect_dev_stdin(run_ckpt: Path) -> None:
    """As the issue's user typed it: cat run.ckpt | gpupar-ckpt inspect /dev/stdin."""
    for arg in ("/dev/stdin", "-"):
        done = subprocess.run(
            f"cat {run_ckpt} | {sys.executable} -m lightning_gpupar.cli.ckpt inspect {arg}",
            shell=True,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0 and "state_dict: 9 entries" in done.stdout, done.stderr


# -- a file cut short is called truncated, not "in neither of torch.save's formats" -------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_a_truncated_checkpoint_is_called_truncated(
    run_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], legacy: bool, fraction: float
) -> None:
    whole = tmp_path / "whole.ckpt"
    torch.save(torch.load(run_ckpt), whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    assert main(["inspect", str(cut)]) == 1
    err = capsys.readouterr().err
    assert "is truncated" in err and f"of {len(data)}" not in err, err
    assert "neither of torch.save's formats" not in err
