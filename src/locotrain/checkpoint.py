"""Checkpoints: the global model's tensors in safetensors (no pickle, so loading runs no code)
plus a small JSON of metadata: the resolved config, the vocabulary and where training was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import Config, config_from_dict, to_toml, tomllib
from .errors import UserError
from .files import atomic_write

FORMAT = 1
WEIGHTS, META = "model.safetensors", "checkpoint.json"


def save_checkpoint(out: Path, params: dict[str, torch.Tensor], cfg: Config, vocab: str,
                    extra: dict) -> None:
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in params.items()}
    atomic_write(out / WEIGHTS, st_save(tensors))
    meta = {"format": FORMAT, "config_toml": to_toml(cfg), "vocab": vocab, **extra}
    atomic_write(out / META, json.dumps(meta, indent=2))


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], Config, str, dict]:
    """(params, config, vocab, metadata) of a finished run; one clear error if anything is off."""
    run_dir = Path(run_dir)
    weights, meta_path = run_dir / WEIGHTS, run_dir / META
    if not run_dir.is_dir():
        raise UserError(f"run folder '{run_dir}' does not exist; give the --out folder of a run")
    if not weights.is_file() or not meta_path.is_file():
        unfinished = (run_dir / STATE_DIR).is_dir()
        raise UserError(f"'{run_dir}' holds no finished model ({WEIGHTS} and {META}); "
                        + (f"the run was interrupted: finish it with `loco resume {run_dir}`"
                           if unfinished else "was the run finished?"))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        cfg = config_from_dict(tomllib.loads(meta["config_toml"]))
        vocab = meta["vocab"]
    except (ValueError, KeyError, TypeError, tomllib.TOMLDecodeError, UnicodeDecodeError, UserError) as e:
        raise UserError(f"checkpoint metadata '{meta_path}' is corrupt ({e}); re-run training "
                        "or restore the file") from None
    try:
        params = st_load(weights.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(f"checkpoint weights '{weights}' are corrupt ({e}); re-run training "
                        "or restore the file") from None
    return params, cfg, vocab, meta


# --------------------------------------------------------------------------- run state
# What a run needs to continue (run.py decides what goes in): tensors in one safetensors
# file, everything else in state.json, which names the file and its SHA-256. The tensors are
# written first under a new name and state.json last, both atomically, so a crash at any
# point leaves the previous checkpoint whole.

STATE_DIR, STATE_META = "checkpoint", "state.json"
STATE_FORMAT = 1


def save_run_state(out: Path, tensors: dict[str, torch.Tensor], meta: dict,
                   name: str = "state") -> None:
    """`name`.json and its tensors (a simulated run has one state; a real run one per rank)."""
    folder = out / STATE_DIR
    prefix, name = name, f"{name}-{meta['events']}.safetensors"
    blob = st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    atomic_write(folder / name, blob)
    meta = {"format": STATE_FORMAT, **meta, "tensors": name,
            "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write(folder / f"{prefix}.json", json.dumps(meta))
    for old in folder.glob(f"{prefix}-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_run_state(out: Path, name: str = "state") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of the run's last checkpoint; one clear error if anything is off."""
    folder = Path(out) / STATE_DIR
    meta_path = folder / f"{name}.json"
    if not Path(out).is_dir():
        raise UserError(f"there is no run folder '{out}'; give the folder a run wrote (its --out)")
    if not meta_path.is_file():
        raise UserError(f"'{out}' holds no checkpoint to resume from ({STATE_DIR}/{meta_path.name}); "
                        "simulated runs write one when interrupted or every "
                        "train.checkpoint_every tokens, real runs (loco launch) only every "
                        "train.checkpoint_every tokens")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        blob = (folder / meta["tensors"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
            raise ValueError(f"{meta['tensors']} does not match its checksum")
        tensors = st_load(blob)
    except (ValueError, KeyError, TypeError, OSError, SafetensorError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint in '{folder}' is corrupt ({e}); re-run training or restore "
                        "the folder") from None
    return tensors, meta
