"""Hugging Face Qwen3-MoE checkpoints: the format between the learner, the actors and users.

A checkpoint directory holds `config.json` (`Qwen3MoeForCausalLM`), `generation_config.json`,
`model.safetensors` (per-expert keys, the Hub layout vLLM and transformers read) and the
tokenizer files. Conversion goes through torchtitan's `Qwen3StateDictAdapter`.

`export_hf` writes into a temporary sibling directory and renames it into place, so a reader
never sees a half-written checkpoint. Nothing is unpickled: weights are safetensors, the config
is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

from async_rl.config import ModelConfig
from async_rl.hf_config import hf_config, read_model_spec
from async_rl.tokenizer import Tokenizer
from async_rl.weights.buckets import gathered_buckets
from learner.model import DTYPES, build_model, titan_config

WEIGHTS = "model.safetensors"


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """A checkpoint's `ModelConfig` (tokenizer = the directory itself), read and checked by
    `async_rl.hf_config.read_model_spec`."""
    return read_model_spec(path).model_config(tokenizer=str(path))


def hf_state_dict(
    model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = 0, keep: bool = True
) -> dict[str, torch.Tensor]:
    """The model's weights in Hugging Face Qwen3-MoE names (per-expert keys), on CPU, in
    `cfg.dtype`: the compute dtype, what actors load (fp32 masters are cast; a copy).

    One process in its own dtype: views of the parameters (copy them before training on).
    Under FSDP the shards are gathered to full tensors a bucket of at most `bucket_bytes` (one
    tensor if it is larger; 0: all at once); collective, every rank calls it, and only a rank
    with `keep` keeps what is gathered (the others return {}), so that no rank ever holds
    more than the model once, and the others at most a bucket.
    """
    adapter, dtype = Qwen3StateDictAdapter(titan_config(cfg), None), DTYPES[cfg.dtype]
    out: dict[str, torch.Tensor] = {}
    for bucket in gathered_buckets(model.state_dict(), bucket_bytes, dtype):
        if keep:
            hf = adapter.to_hf({k: v.detach() for k, v in bucket.items()})
            out.update({k: v.contiguous().cpu() for k, v in hf.items()})
    return out


def export_hf(
    model: torch.nn.Module, cfg: ModelConfig, tokenizer: Tokenizer, out_dir: str | Path
) -> Path:
    """Write `model` as a Hugging Face Qwen3-MoE checkpoint at `out_dir` (replacing it)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    hf_state = hf_state_dict(model, cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(hf_state, tmp / WEIGHTS, metadata={"format": "pt"})
        config = hf_config(cfg, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = tokenizer.generation_config()  # every stop id: transformers stops where we do
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tokenizer.save(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_hf_state(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in torchtitan names, checked against `cfg`'s model."""
    file = Path(path) / WEIGHTS
    try:
        hf_state = load_file(file)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{file}: cannot read safetensors weights ({e})") from None
    adapter = Qwen3StateDictAdapter(titan_config(cfg), None)
    try:
        return adapter.from_hf(hf_state)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{file}: not a Qwen3-MoE checkpoint of this shape ({e})") from None


def import_hf(
    path: str | Path,
    cfg: ModelConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the model a checkpoint describes, in `dtype` (default `cfg.dtype`; the learner
    asks for its master dtype), and load its weights (strictly)."""
    cfg = cfg or model_config_from_hf(path)
    model = build_model(cfg, seed=None, device=device, dtype=dtype)
    state = load_hf_state(path, cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {list(value.shape)}, the config gives "
                f"{list(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model, cfg
