"""Adapters out of a checkpoint: which tensors train, and PEFT's own names for them.

Every checkpoint our strategies (or :class:`~.lightning.NormalizeCheckpointKeys`) write carries
:data:`TRAINABLE_KEY` (the canonical state-dict keys of parameters that require grad) and, for each PEFT
``PeftModel`` inside the LightningModule, :data:`ADAPTERS_KEY`: its active adapter's name, config and the
map from canonical keys to the keys ``peft.get_peft_model_state_dict`` gives (computed by PEFT itself at
save time). :func:`trainable_export` selects those tensors for ``gpupar-ckpt export --trainable-only``;
:func:`write_trainable` writes them where ``PeftModel.from_pretrained`` finds them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_gpupar.checkpoint.io import atomic_torch_save, atomic_write
from lightning_gpupar.checkpoint.keys import CheckpointError, normalize_state_dict

log = logging.getLogger(__name__)

TRAINABLE_KEY = "gpupar_trainable"
ADAPTERS_KEY = "gpupar_adapters"
#: The file names ``PeftModel.from_pretrained`` reads from a directory.
PEFT_FILES = {"safetensors": "adapter_model.safetensors", "pt": "adapter_model.bin"}
PEFT_CONFIG = "adapter_config.json"


def adapter_record(module: nn.Module) -> dict[str, Any]:
    """The checkpoint entries describing ``module``'s trainable tensors and PEFT adapters (see the doc)."""
    state = module.state_dict(keep_vars=True)
    canonical = normalize_state_dict(state, module)
    name_of = {id(v): k for k, v in reversed(canonical.items())}  # the first canonical key of each tensor
    trainable = [k for k, v in canonical.items() if isinstance(v, nn.Parameter) and v.requires_grad]
    record: dict[str, Any] = {TRAINABLE_KEY: trainable}
    adapters = {}
    for path, sub in _peft_models(module):
        try:
            adapters[path] = _adapter_entry(sub, name_of)
        except Exception as err:  # a PEFT version whose internals differ: the checkpoint itself still saves
            log.warning(
                "No PEFT adapter record for %r in the checkpoint (%s: %s)", path, type(err).__name__, err
            )
    if adapters:
        record[ADAPTERS_KEY] = adapters
    return record


def _peft_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    if "peft" not in sys.modules:  # never imported: no PeftModel can exist
        return []
    from peft import PeftModel

    return [(path, m) for path, m in module.named_modules() if isinstance(m, PeftModel)]


def _adapter_entry(peft_model: Any, name_of: Mapping[int, str]) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    adapter = peft_model.active_adapter
    state = peft_model.state_dict(keep_vars=True)
    saved = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter)
    keys = {name_of[id(tensor)]: peft_key for peft_key, tensor in saved.items() if id(tensor) in name_of}
    config = json.loads(json.dumps(peft_model.peft_config[adapter].to_dict(), default=_jsonable))
    return {"adapter_name": adapter, "config": config, "keys": keys}


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(value, key=str)
    return str(value)


def trainable_export(
    checkpoint: Mapping[str, Any], state_dict: Mapping[str, Any], submodule: str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The trainable tensors of ``state_dict`` (canonical keys) under ``submodule``, and the PEFT adapter
    config when ``submodule`` is a ``PeftModel`` (then the keys are PEFT's; otherwise relative to
    ``submodule``)."""
    if TRAINABLE_KEY not in checkpoint:
        raise CheckpointError(
            f"The checkpoint does not say which tensors train (no {TRAINABLE_KEY!r} entry: it was not "
            "written by a lightning-gpupar strategy or with the NormalizeCheckpointKeys callback). Export "
            "it whole (without --trainable-only), or save it again under one of them."
        )
    prefix = f"{submodule.rstrip('.')}." if submodule else ""
    trainable = [k for k in checkpoint[TRAINABLE_KEY] if k.startswith(prefix) and k in state_dict]
    adapter = checkpoint.get(ADAPTERS_KEY, {}).get(submodule.rstrip(".") if submodule else "")
    if adapter is None:
        return {k[len(prefix) :]: state_dict[k] for k in trainable}, None
    renamed = adapter["keys"]
    missing = [k for k in trainable if k not in renamed]
    if missing:
        raise CheckpointError(
            f"{len(missing)} trainable tensors are not part of PEFT adapter {adapter['adapter_name']!r} "
            f"(e.g. {missing[0]!r}); PEFT would not load them. Train only the adapter's parameters, or "
            "export without --trainable-only."
        )
    return {renamed[k]: state_dict[k] for k in trainable}, adapter["config"]


def write_trainable(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, out: Path, file_format: str
) -> Path:
    """Write the tensors to ``out`` (a directory: PEFT's file name inside it) and, with a PEFT config,
    ``adapter_config.json`` beside them; return the tensor file's path."""
    target = out / PEFT_FILES[file_format] if out.is_dir() or not out.suffix else out
    target.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "safetensors":
        from safetensors.torch import save

        data = save(
            {k: v.detach().clone().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}
        )
        atomic_write(target, lambda f: f.write(data))
    else:
        atomic_torch_save(dict(tensors), target)
    if config is not None:
        text = json.dumps(dict(config), indent=2, sort_keys=True).encode()
        atomic_write(target.parent / PEFT_CONFIG, lambda f: f.write(text))
    return target
