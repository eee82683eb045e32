"""``gpupar-ckpt``: inspect a checkpoint, or export its weights for the plain ``nn.Module``.

    gpupar-ckpt inspect RUN.ckpt
    gpupar-ckpt export RUN.ckpt OUT.pt --submodule model          # net.load_state_dict(torch.load("OUT.pt"))
    gpupar-ckpt export RUN.ckpt OUT.safetensors --submodule model # safetensors: the extension chooses
    gpupar-ckpt export RUN.ckpt ADAPTER_DIR --submodule model --trainable-only --format safetensors
    cat RUN.ckpt | gpupar-ckpt inspect -                          # '-' (or /dev/stdin): read a pipe

OUT's extension chooses the format (.safetensors, or .pt/.pth/.bin/.ckpt for torch.save; others: pt);
``--format`` is for other names, and one that contradicts the extension is refused. Inputs are only
read. Errors print one message and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_gpupar.checkpoint import (
    WRAPPER_SEGMENTS,
    CheckpointError,
    atomic_torch_save,
    canonical_names,
    load_checkpoint_file,
    normalize_state_dict,
    submodule_candidates,
    submodule_state_dict,
)
from lightning_gpupar.checkpoint.adapters import PEFT_CONFIG, trainable_export, write_trainable
from lightning_gpupar.checkpoint.io import atomic_write, load_checkpoint_bytes

_LIGHTNING_SCALARS = ("epoch", "global_step", "pytorch-lightning_version")
#: The format an output file's extension names.
FORMAT_OF_EXTENSION = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt", ".ckpt": "pt"}
#: How to read back what export wrote, per format.
READ_BACK = {"pt": "torch.load", "safetensors": "safetensors.torch.load_file"}
#: The input argument that means "read the checkpoint from stdin".
STDIN = "-"


class UsageError(CheckpointError, ValueError):
    """Arguments that contradict each other (exit status 2, as argparse's usage errors)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as err:
        print(f"gpupar-ckpt: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError) as err:
        print(f"gpupar-ckpt: error: {err}", file=sys.stderr)
        return 1


def inspect(args: argparse.Namespace) -> int:
    """Print the Lightning metadata, then every tensor: key, shape, dtype, saved device."""
    saved_on: dict[int, str] = {}

    def remember_device(storage: Any, location: str) -> Any:
        saved_on[storage.data_ptr()] = location
        return storage

    checkpoint = _load(args.ckpt, remember_device, weights_only=not args.unsafe_unpickle)
    state_dict = _state_dict(checkpoint, args.ckpt)
    if state_dict is not checkpoint:
        print("Lightning checkpoint")
        for name in _LIGHTNING_SCALARS:
            if name in checkpoint:
                print(f"  {name}: {checkpoint[name]}")
        for name in ("optimizer_states", "lr_schedulers"):
            print(f"  {name}: {len(checkpoint.get(name, []))}")
        print(f"  callbacks: {', '.join(map(str, checkpoint.get('callbacks', {}))) or 'none'}")
        print(f"  hyper_parameters: {dict(checkpoint.get('hyper_parameters', {}))}")
        print(f"  top-level entries: {', '.join(map(str, checkpoint))}")
    print(f"state_dict: {len(state_dict)} entries")
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            device = saved_on.get(value.untyped_storage().data_ptr(), str(value.device))
            print(f"  {key}  {tuple(value.shape)}  {str(value.dtype).removeprefix('torch.')}  {device}")
        else:
            print(f"  {key}  {type(value).__name__}")
    renamed = [(k, c) for k, c in canonical_names(state_dict).items() if k != c]
    segments = Counter(s for k, _ in renamed for s in k.split(".")[:-1] if s in WRAPPER_SEGMENTS)
    found = ", ".join(f"{s}. ({n} keys)" for s, n in segments.items()) or "none"
    print(f"wrapper segments: {found}")
    print(f"submodules: {', '.join(submodule_candidates(normalize_state_dict(state_dict))[:12]) or 'none'}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Write the canonical (optionally one submodule's) state dict as a plain file."""
    source, out = Path(args.ckpt), Path(args.out)
    fmt, chosen_by = _output_format(out, args.format)
    if out.exists() and args.ckpt != STDIN and out.resolve() == source.resolve():
        raise CheckpointError(f"OUT {str(out)!r} is the input checkpoint; choose another path.")
    if out.exists() and not args.force:
        raise CheckpointError(f"{str(out)!r} exists; pass --force to replace it.")
    checkpoint = _load(args.ckpt, "cpu", weights_only=not args.unsafe_unpickle)
    state_dict = normalize_state_dict(_state_dict(checkpoint, source))
    if args.submodule:
        candidates = submodule_candidates(state_dict)
        if args.submodule.rstrip(".") not in candidates:
            raise CheckpointError(
                f"No submodule {args.submodule!r} in {str(source)!r}. "
                f"Candidates: {', '.join(candidates[:20]) or 'none (all tensors sit at the top level)'}."
            )
        if args.trainable_only:
            return _export_trainable(checkpoint, state_dict, args.submodule, out, fmt)
        state_dict = submodule_state_dict(state_dict, args.submodule)
    elif args.trainable_only:
        return _export_trainable(checkpoint, state_dict, None, out, fmt)
    if fmt == "safetensors":
        _save_safetensors(state_dict, out)
    else:
        atomic_torch_save(state_dict, out)
    written = f"Wrote {len(state_dict)} tensors to {str(out)!r} as {fmt} ({chosen_by})"
    print(f"{written}; read it with {READ_BACK[fmt]}.")
    return 0


def _export_trainable(
    checkpoint: Any, state_dict: Mapping[str, Any], submodule: str | None, out: Path, fmt: str
) -> int:
    """Only the tensors that train (a PEFT adapter under its own keys, with its config beside it)."""
    tensors, config = trainable_export(checkpoint, state_dict, submodule)
    written = write_trainable(tensors, config, out, fmt)
    extra = f" and {PEFT_CONFIG}" if config is not None else ""
    print(f"Wrote {len(tensors)} trainable tensors to {written}{extra} ({fmt}).")
    return 0


def _output_format(out: Path, given: str | None) -> tuple[str, str]:
    """The format to write ``out`` in, and what chose it: ``--format``, the extension, or the default."""
    named = FORMAT_OF_EXTENSION.get(out.suffix.lower())
    if given is not None and named is not None and given != named:
        raise UsageError(
            f"--format {given} contradicts OUT {out.name!r}, whose extension {out.suffix} names {named}. "
            f"Drop --format to write {named}, or name the file for {given} "
            f"(e.g. {out.stem}.{'safetensors' if given == 'safetensors' else 'pt'})."
        )
    if given is not None:
        return given, f"chosen by --format {given}"
    if named is not None:
        return named, f"chosen by the extension {out.suffix}"
    return (
        "pt",
        f"the default for {out.suffix or 'no'} extension; --format safetensors writes safetensors",
    )


def _load(arg: str, map_location: Any, weights_only: bool) -> Any:
    """The checkpoint named on the command line: a file, a pipe, or stdin for ``-``."""
    if arg != STDIN:
        return load_checkpoint_file(arg, map_location, weights_only=weights_only)
    if sys.stdin.isatty():
        raise CheckpointError(
            "The checkpoint is to be read from stdin ('-'), but stdin is a terminal: pipe a file in "
            "(cat run.ckpt | gpupar-ckpt inspect -) or name the file."
        )
    data = sys.stdin.buffer.read()
    return load_checkpoint_bytes(data, "stdin", map_location, weights_only=weights_only)


def _state_dict(checkpoint: Any, path: str | Path) -> Mapping[str, Any]:
    """The ``state_dict`` entry of a Lightning checkpoint, or the file itself when it is a state dict."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        return checkpoint["state_dict"]
    if (
        isinstance(checkpoint, Mapping)
        and checkpoint
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items())
    ):
        return checkpoint
    held = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise CheckpointError(
        f"{str(path)!r} has no 'state_dict' entry and is not a state dict itself "
        f"(it holds: {held or 'nothing'})."
    )


def _save_safetensors(state_dict: Mapping[str, Any], out: Path) -> None:
    try:
        from safetensors.torch import save
    except ImportError as err:
        raise CheckpointError("--format safetensors needs safetensors: pip install safetensors") from err
    others = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"safetensors holds tensors only; these entries are not: {', '.join(others)}")
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}  # no shared storage
    data = save(tensors, metadata={"format": "pt"})
    atomic_write(out, lambda f: f.write(data))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpupar-ckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    unsafe = argparse.ArgumentParser(add_help=False)
    unsafe.add_argument(
        "--unsafe-unpickle",
        action="store_true",
        help="load with weights_only=False: can run arbitrary code, only for files you trust",
    )
    show = commands.add_parser("inspect", parents=[unsafe], help="keys, shapes, dtypes, devices, metadata")
    show.add_argument("ckpt", help="a Lightning checkpoint or a saved state dict; '-' reads stdin")
    show.set_defaults(run=inspect)
    out = commands.add_parser("export", parents=[unsafe], help="plain state dict for the bare nn.Module")
    out.add_argument("ckpt", help="a Lightning checkpoint or a saved state dict; '-' reads stdin")
    out.add_argument("out", help="where to write the weights; its extension chooses the format")
    out.add_argument("--submodule", help="export only this attribute of the LightningModule, e.g. model")
    out.add_argument(
        "--format",
        choices=("pt", "safetensors"),
        default=None,
        help="pt (torch.save) or safetensors; default: by OUT's extension (.safetensors; else pt)",
    )
    out.add_argument(
        "--trainable-only",
        action="store_true",
        help="only the tensors that train; a PEFT adapter under PEFT's keys, adapter_config.json beside it "
        "(OUT a directory: adapter_model.safetensors/.bin inside, as PeftModel.from_pretrained reads)",
    )
    out.add_argument("--force", action="store_true", help="replace OUT if it exists")
    out.set_defaults(run=export)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
