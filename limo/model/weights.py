"""Hugging Face weights in and out: config.json + safetensors (one file, or shards + index).

Reading is lazy: `HFCheckpoint` opens the safetensors headers, checks every tensor's name, shape
and dtype against the model before a byte of data is read, and hands out row slices, so a
sharded model reads only the rows it owns (limo/engine/sharding.py). Writing streams tensors into
size-limited shards inside a temporary folder that is renamed into place at the end: a failed or
interrupted save never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from limo.model.init import init_weights
from limo.model.qwen2 import ModelArgs, Qwen2, build_model
from limo.tools.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class WeightsError(UserError):
    """A model folder whose files do not hold the tensors the model needs."""


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' Qwen2ForCausalLM name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(name: str) -> str:
    """transformers' name -> ours (inverse of hf_name)."""
    return name.removeprefix("model.")


def expected_tensors(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `args` (the tied lm_head is not a separate tensor)."""
    model = build_model(args, device="meta")
    return {name: tuple(p.shape) for name, p in model.named_parameters()}  # named_parameters dedups tied


HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json", "tokenizer.model"]


def resolve_model_dir(path: str | os.PathLike, config_only: bool = False) -> Path:
    """A local model folder for `path`: the folder itself, or a hub id ("Qwen/Qwen2.5-32B-Instruct")
    fetched into the Hugging Face cache (only config, safetensors and tokenizer files; with
    `config_only`, config.json alone). Every rank may call it: the cache locks its files."""
    local = Path(path)
    if local.is_dir():
        return local
    text = str(path)
    if local.is_absolute() or text.startswith(".") or text.count("/") != 1:
        raise WeightsError(f"{path} is not a model folder (nor a hub id like 'Qwen/Qwen2.5-32B-Instruct')")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(text, allow_patterns=["config.json"] if config_only else HUB_FILES)
    except Exception as e:  # network, auth, missing repo: all end the run with the id named, on one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"model {text!r} is not a local folder and could not be fetched from the hub ({why})") from None
    return Path(folder)


def model_args(cfg: Any) -> tuple[ModelArgs, str]:
    """The architecture of an engine.config.Config's model without its weights, and where it came
    from: the preset; a local folder's config.json; a hub id's config.json (fetched alone, or from
    the cache); or, when neither the hub nor its cache answers, the built-in config of a known
    Qwen2.5 id (model.qwen2.HUB_PRESETS). Any other id that cannot be fetched is one clear error."""
    from limo.model.qwen2 import HUB_PRESETS, PRESETS

    if cfg.model.preset:
        return PRESETS[cfg.model.preset], f"preset {cfg.model.preset}"
    path = cfg.model.path
    local = Path(path)
    if not local.is_dir() and str(path) in HUB_PRESETS:
        try:
            folder = resolve_model_dir(path, config_only=True)
        except WeightsError:
            preset = HUB_PRESETS[str(path)]
            return PRESETS[preset], f"built-in config of {path} (preset {preset}; the hub and its cache did not answer)"
    else:
        try:
            folder = resolve_model_dir(path, config_only=True)
        except WeightsError as e:
            raise WeightsError(
                f"{e}; with no network, pass --model.preset=NAME (one of {', '.join(sorted(PRESETS))}) or a local model folder"
            ) from None
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsError(f"{config} does not exist: not a Hugging Face model folder")
    return ModelArgs.from_hf(json.loads(config.read_text()), source=str(config)), str(config)


class HFCheckpoint:
    """Lazy, validated view of a Hugging Face model folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise WeightsError(f"{config_file} does not exist: not a Hugging Face model folder")
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{config_file}: not valid JSON: {e}") from None
        self.args = ModelArgs.from_hf(self.config, source=str(config_file))
        self._handles: dict[Path, Any] = {}
        self._files = self._weight_map()  # HF tensor name -> file
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self._files.values())):
            for name in self._open(file).keys():
                if self._files.get(name) == file:
                    sl = self._open(file).get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
        listed_missing = sorted(n for n, f in self._files.items() if n not in self._meta)
        if listed_missing:
            raise WeightsError(f"{self.path / INDEX_FILE} lists tensors absent from their files: {', '.join(listed_missing[:10])}")

    def _weight_map(self) -> dict[str, Path]:
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightsError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
            return {name: self.path / file for name, file in weight_map.items()}
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        raise WeightsError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise WeightsError(f"{file} is missing (named by {self.path / INDEX_FILE})")
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except SafetensorError as e:
                raise WeightsError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None
        return self._handles[file]

    def validate(self, expected: dict[str, tuple[int, ...]] | None = None) -> None:
        """Every tensor present, none unexpected, shapes equal, dtypes floating; all problems at once."""
        expected = expected_tensors(self.args) if expected is None else expected
        wanted = {hf_name(n): shape for n, shape in expected.items()}
        problems = []
        missing = sorted(set(wanted) - set(self._meta))
        # Tied checkpoints sometimes carry a copy of the embedding as lm_head.weight; it is ignored.
        unexpected = sorted(set(self._meta) - set(wanted) - ({"lm_head.weight"} if self.args.tie_word_embeddings else set()))
        if missing:
            problems.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(unexpected)}")
        for name in sorted(set(wanted) & set(self._meta)):
            shape, dtype = self._meta[name]
            if shape != wanted[name]:
                problems.append(f"{name} in {self._files[name].name}: shape {list(shape)}, expected {list(wanted[name])}")
            if dtype not in FLOAT_DTYPES:
                problems.append(f"{name} in {self._files[name].name}: dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
        if problems:
            raise WeightsError(f"{self.path}: weights do not match {self.config.get('architectures')}:\n  " + "\n  ".join(problems))

    def read(self, name: str, rows: slice | None = None, dtype: torch.dtype | None = None, cols: slice | None = None) -> torch.Tensor:
        """Our tensor `name`, optionally only rows [rows.start, rows.stop) of dim 0 or columns of
        dim 1 (only those bytes are read: a tensor-parallel rank's slice), cast to dtype."""
        key = hf_name(name)
        sl = self._open(self._files[key]).get_slice(key)
        t = sl[rows] if rows is not None else sl[:, cols] if cols is not None else sl[:]
        return t if dtype is None else t.to(dtype)

    def close(self) -> None:
        self._handles.clear()


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Qwen2:
    """Build the model described by `path`/config.json and fill it from its safetensors. A
    tensor holding a NaN or inf is refused by name: a diverged model must not be evaluated."""
    ckpt = HFCheckpoint(path)
    ckpt.validate()
    model = build_model(ckpt.args, device="meta", dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(ckpt.read(name, dtype=dtype))
            if not torch.isfinite(param).all():  # host sync, once per tensor at load
                ckpt.close()
                raise WeightsError(f"{path}: {hf_name(name)} holds NaN or inf; refusing to load a diverged model")
    ckpt.close()
    return model


# ---------------------------------------------------------------------------------------------
# Writing


def _atomic_folder(dest: Path, fill) -> None:
    """Fill a fresh sibling folder, then swap it in for `dest`; on any error remove it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf(
    path: str | os.PathLike,
    args: ModelArgs,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer: Any = None,
    generation_config: str | os.PathLike | None = None,
) -> None:
    """Stream (our name, tensor) pairs into an HF folder: config.json, shards + index, tokenizer,
    and the base model's generation_config.json when given (vLLM takes default sampling from it).

    Only one shard's tensors are held at a time, so a caller gathering a sharded model tensor
    by tensor never holds the whole model. One shard is written as model.safetensors.
    """

    def fill(tmp: Path) -> None:
        shard: dict[str, torch.Tensor] = {}
        size = 0
        written: list[tuple[Path, list[str]]] = []  # (file, its tensor names): the tensors themselves are gone
        total = 0

        def flush() -> None:
            file = tmp / f"shard-{len(written):05d}.safetensors"
            save_file(shard, str(file), metadata={"format": "pt"})
            written.append((file, list(shard)))
            shard.clear()

        for name, t in tensors:
            t = t.detach().to("cpu", dtype).contiguous()
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            shard[hf_name(name)] = t
            size += nbytes
            total += nbytes
        flush()
        if len(written) == 1:
            written[0][0].rename(tmp / SINGLE_FILE)
        else:
            weight_map = {}
            for i, (file, names) in enumerate(written):
                final = tmp / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                file.rename(final)
                weight_map.update({n: final.name for n in names})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(args.to_hf(dtype), indent=2))
        if generation_config is not None:
            shutil.copyfile(generation_config, tmp / GENERATION_CONFIG)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    _atomic_folder(Path(path), fill)


def iter_state(model: Qwen2) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of an unsharded model, the tied head once."""
    for name, p in model.named_parameters():
        yield name, p


def save_pretrained(
    model: Qwen2,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer: Any = None,
    generation_config: str | os.PathLike | None = None,
) -> None:
    """Write an unsharded model as a folder transformers' AutoModelForCausalLM loads."""
    dtype = dtype or next(model.parameters()).dtype
    write_hf(path, model.args, iter_state(model), dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer,
             generation_config=generation_config)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Command line: write a preset as an HF folder, and check a folder against transformers.


def check_against_transformers(path: str | os.PathLike, tokens: int = 64, seed: int = 0) -> float:
    """Max relative logit error of our model vs transformers' on one folder (fp32, packed)."""
    from transformers import AutoModelForCausalLM

    ours = load_pretrained(path, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.args.vocab_size, (tokens,), generator=g)
    cuts = [0, tokens // 4, tokens // 2 + 3, tokens]  # three samples packed in one stream
    cu = torch.tensor(cuts, dtype=torch.int32)
    with torch.no_grad():
        got = ours.logits(ours(ids, cu_seqlens=cu))
        want = torch.cat([theirs(ids[a:b][None]).logits[0] for a, b in zip(cuts[:-1], cuts[1:])])
    return ((got - want).abs().max() / want.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from limo.model.qwen2 import PRESETS

    p = argparse.ArgumentParser(prog="python -m limo.model.weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="write this architecture, randomly initialised, to --out")
    p.add_argument("--out", help="folder for --preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", nargs="?", const="", metavar="DIR", help="compare our logits with transformers' on DIR (default: --out)")
    args = p.parse_args(argv)
    if args.preset:
        if not args.out:
            p.error("--preset needs --out")
        model = build_model(PRESETS[args.preset], device="cpu")
        init_weights(model, seed=args.seed)
        save_pretrained(model, args.out, dtype=torch.float32)
        print(f"wrote {args.preset} ({model.args.num_params() / 1e6:.2f} M parameters) to {args.out}")
    if args.check is not None:
        folder = args.check or args.out
        if not folder:
            p.error("--check needs a folder or --out")
        err = check_against_transformers(folder)
        verdict = "OK" if err <= 1e-5 else "MISMATCH"
        print(f"parity with transformers on {folder} (fp32, 3 packed samples): max relative logit error {err:.2e} [{verdict}]")
        return 0 if err <= 1e-5 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
