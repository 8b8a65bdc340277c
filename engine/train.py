"""Full fine-tuning on packed long-CoT data with FSDP2: the engine's main job.

    torchrun [--nnodes N ...] --nproc_per_node G engine/train.py --config FILE [--section.key=value ...]
    python engine/train.py --help        # every config key, its type, default and meaning

NCCL on GPUs, gloo on CPU; a plain `python engine/train.py ...` runs a world of one. Rerunning
the same command resumes from the newest complete checkpoint in train.output_dir.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun engine/train.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.distributed as dist

import kernels
from engine.checkpoint import Checkpointer, crash_point
from engine.config import Config, ConfigError, check_resume, describe_keys, load_config, resume_settings
from engine.export import export_hf
from engine.memory import ExecutionPath, PeakProbe, checkpoint_bytes, device_capacity_gib, plan_memory, record_peaks
from engine.metrics import MetricsLogger, peak_flops, peak_memory_gb
from model.flops import step_flops, step_flops_torchtitan
from model.qwen2 import PRESETS, build_model
from engine.optim import build_optimizer, build_scheduler
from engine.distributed import init_distributed
from engine.sharding import parallelize
from model.init import materialize
from engine.preflight import preflight
from model.weights import GENERATION_CONFIG, HFCheckpoint, model_args, resolve_model_dir

log = logging.getLogger("engine.train")

USAGE = "usage: torchrun --nproc_per_node N engine/train.py --config FILE [--section.key=value ...]"


def parse_args(argv: list[str]) -> Config:
    """The validated config; raises ConfigError before any process group exists."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}\nConfig keys:\n{describe_keys()}")
        raise SystemExit(0)
    if argv[0] != "--config" or len(argv) < 2:
        raise ConfigError(f"the first argument must be --config FILE\n{USAGE}")
    return load_config(argv[1], argv[2:])


def train_step(model: torch.nn.Module, micro_batches: list, divisor: int, device: torch.device, max_grad_norm: float) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches, then clip: (global mean loss, grad norm).

    `divisor` is the number of supervised tokens of the whole global batch (all micro-batches,
    all ranks): each micro-batch's summed loss is divided by it, so gradients add up over
    micro-batches and ranks to the gradient of the global mean. Returns both numbers as one [2]
    tensor on the device, without a host sync: the caller reads them, once (engine/simulate.py
    runs this very function on fake tensors, which hold nothing to read).
    """
    loss_sum = torch.zeros((), device=device)
    for mb in micro_batches:
        mb = mb.to(device)
        loss = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, labels=mb.labels)
        (loss / divisor).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    dist.all_reduce(loss_sum)
    norm = grad_norm.full_tensor().to(device)  # on the host under CPU offload
    return torch.stack([loss_sum / divisor, norm])


def train(cfg: Config) -> None:
    from data.dataset import load_samples, resolve_tokenizer
    from data.loader import PackedLoader
    from data.packing import CostModel

    d = init_distributed(cfg.train.device, cfg.parallel.dp_replicate, cfg.parallel.cpu_offload)
    logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    kernels.set_backend(cfg.train.kernels)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)

    d.check_shared_folder(out)
    dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
    planned, source = model_args(cfg)  # config.json alone (or a built-in config offline): "will it fit?" before any download
    plan = plan_memory(cfg, planned, d.world_size, *device_capacity_gib(d.device), path=ExecutionPath.of(d.device.type, dtype),
                       baseline_gib=PeakProbe(d.device).baseline_gib)  # fmt: skip
    log.info("memory plan per rank (%s; model config: %s):\n%s", d.device.type, source, plan.report())
    if not plan.fits and cfg.train.memory_check:
        raise RuntimeError(
            f"the memory planner puts this run at {plan.peak_gib:.1f} GiB per rank, over the {plan.capacity_gib:.1f} GiB "
            f"usable (python -m engine.memory --config ... shows the breakdown); run anyway with --train.memory_check=false"
        )
    with d.node_leaders_first():  # hub ids download once per node
        model_dir = resolve_model_dir(cfg.model.path) if cfg.model.path else None
        tokenizer = resolve_tokenizer(cfg.data, model_path=model_dir)
        samples, report = load_samples(cfg.data, tokenizer)
    hf = HFCheckpoint(model_dir) if model_dir else None
    args = hf.args if hf else PRESETS[cfg.model.preset]
    if report.max_token_id >= args.vocab_size:
        raise ConfigError(f"the data holds token id {report.max_token_id} but the model's vocab_size is {args.vocab_size}")
    loader = PackedLoader(
        samples, samples_per_step=cfg.data.samples_per_step, tokens_per_microbatch=cfg.data.tokens_per_microbatch,
        epochs=cfg.train.epochs, world_size=d.world_size, rank=d.rank, seed=cfg.train.seed, cost=CostModel.for_model(args),
    )
    total_steps = min(cfg.train.max_steps or loader.total_steps, loader.total_steps)

    checkpointer = Checkpointer(out, cfg.checkpoint.keep_last, d.rank)
    latest = checkpointer.resume_point()
    if latest is not None and not cfg.checkpoint.resume:  # a fresh run's saves would interleave with the old ones
        raise RuntimeError(
            f"checkpoint.resume=false, but {checkpointer.root} holds checkpoints of an earlier run (newest: {latest.name}); "
            "choose another train.output_dir, or remove that folder"
        )

    if args != planned:  # the folder's config.json differs from the built-in one planned offline
        plan = plan_memory(cfg, args, d.world_size, *device_capacity_gib(d.device), path=ExecutionPath.of(d.device.type, dtype))
    probe = PeakProbe(d.device)  # from here on, memory is the training's: held against the plan in memory.json
    model = build_model(args, device="meta", dtype=torch.float32)  # fp32 master weights
    parallelize(model, d.mesh, cfg.parallel, param_dtype=dtype)
    materialize(model, d.device, hf, seed=cfg.train.seed, std=cfg.model.init_std, cpu_offload=cfg.parallel.cpu_offload)
    if hf:
        hf.close()  # every rank has its slices: unmap the safetensors files
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu") if cfg.parallel.cpu_offload else d.device)  # where the shards live
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    step, bad_steps = 0, 0

    if latest is not None:
        state = checkpointer.load(latest, model, optimizer)
        check_resume(cfg, state.get("settings", {}), str(latest))  # the preflight saw the newest; a fallback may be older
        step, bad_steps = state["step"], state["bad_steps"]
        scheduler.load_state_dict(state["scheduler"])
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]  # this run's peak (checkpoint.override)
        scheduler.last_epoch -= 1
        scheduler.step()  # this run's lr at the restored step, into the param groups: the saved one unless overridden
        loader.load_state_dict(state["loader"])
        log.info("resumed from %s (step %d)", latest, step)

    def save(epoch: int) -> None:
        train_state = {"step": step, "epoch": epoch, "bad_steps": bad_steps, "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                       "settings": resume_settings(cfg)}
        checkpointer.save(step, model, optimizer, train_state)

    checkpointer.check_room(checkpoint_bytes(cfg, args))  # warns when the filesystem cannot hold the checkpoints to come

    metrics = MetricsLogger(out, d.is_main, total_steps, step, cfg.train.tensorboard)
    peak = peak_flops(d.device)
    last_sync = time.perf_counter()
    model.train()
    for batch in loader if step < total_steps else ():
        divisor = max(batch.num_label_tokens, 1)
        loss_value, norm_value = train_step(model, batch.micro_batches, divisor, d.device, cfg.train.max_grad_norm).tolist()  # host sync
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            log.warning("step %d: non-finite loss %s or grad norm %s; skipped (%d in a row)", step, loss_value, norm_value, bad_steps)
            if bad_steps >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{bad_steps} non-finite steps in a row (train.max_bad_steps={cfg.train.max_bad_steps}); aborting")
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1

        now = time.perf_counter()
        step_time, last_sync = now - last_sync, now
        flops = step_flops(args, batch.seqlens)
        metrics.log({
            "step": step, "epoch": batch.epoch, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
            "tokens": batch.num_tokens, "label_tokens": batch.num_label_tokens, "step_time": step_time,
            "tokens_per_s": batch.num_tokens / step_time, "tokens_per_s_per_device": batch.num_tokens / step_time / d.world_size,
            "mfu": flops / step_time / (peak * d.world_size) if peak else None,
            "mfu_torchtitan": step_flops_torchtitan(args, batch.num_tokens, cfg.data.tokens_per_microbatch) / step_time / (peak * d.world_size) if peak else None,
            "mem_gb": peak_memory_gb(d.device), "skipped": bad_steps > 0,
        })
        crash_point(f"step:{step}")
        epoch_end = step % loader.steps_per_epoch == 0 and cfg.checkpoint.at_epoch_end
        periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if epoch_end or periodic or step == total_steps:
            save(batch.epoch)
            last_sync = time.perf_counter()  # the next step's time leaves the save out
        if step >= total_steps:
            break
    metrics.close()
    record_peaks(out / "memory.json", plan, probe, d.rank, d.world_size)

    if cfg.checkpoint.export_hf:
        base_generation = model_dir / GENERATION_CONFIG if model_dir else None  # sampling defaults vLLM reads
        if base_generation and not base_generation.is_file():
            base_generation = None
        export_hf(model, out / "hf", d.rank, dtype=dtype, tokenizer=tokenizer, generation_config=base_generation)
        log.info("exported the model to %s", out / "hf")
    dist.barrier()
    dist.destroy_process_group()
    if cfg.eval.benchmarks and cfg.checkpoint.export_hf and d.is_main:
        evaluate_export(cfg, out, d.device)


def evaluate_export(cfg: Config, out: Path, device: torch.device) -> None:
    """Rank 0 alone, after the process group is gone: the other ranks never wait on a collective."""
    from eval.run import LIMO_SYSTEM_PROMPT, evaluate_folder, model_fingerprint

    results, fingerprint = out / "eval", model_fingerprint(out / "hf")
    if (results / "config.json").is_file():  # results of an earlier export (a longer run since): set them aside
        earlier = json.loads((results / "config.json").read_text()).get("model")
        if earlier != fingerprint:
            aside = out / f"eval-{earlier or 'unknown'}"
            log.warning("%s holds results of another export (model %s); moved to %s", results, earlier, aside)
            results.rename(aside)
    log.info("evaluating %s on %s", out / "hf", ", ".join(cfg.eval.benchmarks))
    evaluate_folder(
        out / "hf", cfg.eval.benchmarks, results, device=device.type,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        samples=cfg.eval.samples or None, temperature=cfg.eval.temperature if cfg.eval.samples else None,
        max_tokens=cfg.eval.max_tokens, limit=cfg.eval.limit or None,
        system_prompt=cfg.data.system_prompt or LIMO_SYSTEM_PROMPT, fingerprint=fingerprint,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        preflight(cfg)  # paths, benchmarks, a resume's settings: before any process group
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
