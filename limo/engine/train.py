"""Full fine-tuning on packed long-CoT data with FSDP2: the engine's main job.

    torchrun [--nnodes N ...] --nproc_per_node G limo/engine/train.py --config FILE [--section.key=value ...]
    torchrun [--nnodes N ...] --nproc_per_node G -m limo.engine.train --config FILE ...   # the same, from any folder
    python limo/engine/train.py --help        # every config key, its type, default and meaning

NCCL on GPUs, gloo on CPU; a plain `python limo/engine/train.py ...` runs a world of one. Rerunning
the same command resumes from the newest complete checkpoint in train.output_dir. The run, in
order: check the config against the world (preflight, before any process group); plan the memory
(before any download); load the data; build the model, its shards and the optimizer
(`build_training`, which the benchmarks use too); resume; the steps (`train_step`, one screen);
export; and evaluate the export in a process of its own (`python -m limo.eval.run`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (torchrun limo/engine/train.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch
import torch.distributed as dist

from limo import kernels
from limo.data.context import ContextShard, shard_for_cp
from limo.engine.checkpoint import Checkpointer
from limo.engine.config import Config, ConfigError, check_resume, describe_keys, load_config, resume_settings
from limo.engine.context import cp_loss
from limo.engine.distributed import Distributed, init_distributed
from limo.engine.export import export_hf
from limo.engine.faults import crash_point
from limo.engine.memory import ExecutionPath, MemoryPlan, PeakProbe, checkpoint_bytes, device_capacity_gib, plan_memory, record_peaks
from limo.engine.metrics import MetricsLogger, peak_flops, peak_memory_gb
from limo.engine.optim import build_optimizer, build_scheduler
from limo.engine.preemption import PREEMPTED_EXIT, Preempted, Preemption
from limo.engine.preflight import preflight
from limo.engine.sharding import parallelize
from limo.model.fingerprint import model_fingerprint
from limo.model.flops import step_flops, step_flops_torchtitan
from limo.model.init import materialize
from limo.model.qwen2 import PRESETS, ModelArgs, Qwen2, build_model
from limo.model.weights import GENERATION_CONFIG, HFCheckpoint, model_args, resolve_model_dir
from limo.tools.dtypes import dtype_of
from limo.tools.errors import UserError, refuse

log = logging.getLogger("limo.engine.train")  # the same name run as a script (__main__) or as a module

USAGE = "usage: torchrun --nproc_per_node N limo/engine/train.py --config FILE [--section.key=value ...]"


def parse_args(argv: list[str]) -> Config:
    """The validated config; raises ConfigError before any process group exists."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}\nConfig keys:\n{describe_keys()}")
        raise SystemExit(0)
    if argv[0] != "--config" or len(argv) < 2:
        raise ConfigError(f"the first argument must be --config FILE\n{USAGE}")
    return load_config(argv[1], argv[2:])


def train_step(model: torch.nn.Module, micro_batches: list, divisor: int, device: torch.device, max_grad_norm: float,
               world: Distributed | None = None) -> torch.Tensor:  # fmt: skip
    """Forward and backward over this rank's micro-batches, then clip: (global mean loss, grad norm).

    `divisor` is the number of supervised tokens of the whole global batch (all micro-batches,
    all ranks): each micro-batch's summed loss is divided by it, so gradients add up over
    micro-batches and ranks to the gradient of the global mean. Returns both numbers as one [2]
    tensor on the device, without a host sync: the caller reads them, once (limo/engine/simulate.py
    runs this very function on fake tensors, which hold nothing to read). With context
    parallelism (`world.cp` > 1) each micro-batch is shared by the cp group: this rank runs its
    balanced share of the tokens (limo/engine/context.py), and its loss is the sum over its tokens.
    """
    loss_sum = torch.zeros((), device=device)
    cp = world.cp if world is not None else 1
    for mb in micro_batches:
        if cp > 1:
            shard = mb if isinstance(mb, ContextShard) else shard_for_cp(mb, cp, world.cp_rank)  # simulate cuts them ahead
            loss = cp_loss(model, shard.to(device), world.cp_group)
        else:
            mb = mb.to(device)
            loss = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, labels=mb.labels)
        (loss / divisor).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    dist.all_reduce(loss_sum)
    norm = grad_norm.full_tensor().to(device)  # on the host under CPU offload
    return torch.stack([loss_sum / divisor, norm])


def compute_dtype(cfg: Config) -> torch.dtype:
    return dtype_of(cfg.train.dtype)


def plan_run(cfg: Config, world: Distributed) -> tuple[MemoryPlan, ModelArgs]:
    """The memory plan from the model's config.json alone (or a built-in config offline), so that
    "will it fit?" is answered before any download; refused when it does not fit. Returns it with
    the architecture it planned for."""
    planned, source = model_args(cfg)
    plan = plan_memory(cfg, planned, world.world_size, *device_capacity_gib(world.device),
                       path=ExecutionPath.of(world.device.type, compute_dtype(cfg)), baseline_gib=PeakProbe(world.device).baseline_gib)  # fmt: skip
    log.info("memory plan per rank (%s; model config: %s):\n%s", world.device.type, source, plan.report())
    if not plan.fits and cfg.train.memory_check:
        raise RuntimeError(
            f"the memory planner puts this run at {plan.peak_gib:.1f} GiB per rank, over the {plan.capacity_gib:.1f} GiB "
            f"usable (python -m limo.engine.memory --config ... shows the breakdown); run anyway with --train.memory_check=false"
        )
    return plan, planned


def build_training(cfg: Config, args: ModelArgs, world: Distributed, checkpoint: HFCheckpoint | None = None) -> tuple[Qwen2, torch.optim.Optimizer]:
    """The model as the run trains it: built on the meta device in fp32 (the master weights), the
    plan of limo/engine/sharding.py applied, each rank's shards filled (from `checkpoint`, else by
    limo/model/init.py's rule), and the optimizer over the shards, where they live."""
    model = build_model(args, device="meta", dtype=torch.float32)
    parallelize(model, world.mesh, cfg.parallel, param_dtype=compute_dtype(cfg))
    materialize(model, world.device, checkpoint, seed=cfg.train.seed, std=cfg.model.init_std, cpu_offload=cfg.parallel.cpu_offload)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu") if cfg.parallel.cpu_offload else world.device)
    return model, optimizer


def train(cfg: Config) -> None:
    from limo.data.dataset import load_samples, resolve_tokenizer
    from limo.data.loader import PackedLoader
    from limo.data.packing import CostModel

    world = init_distributed(cfg.train.device, cfg.parallel.dp_replicate, cfg.parallel.cpu_offload, cfg.parallel.cp)
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    kernels.set_backend(cfg.train.kernels)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    world.check_shared_folder(out)
    plan, planned = plan_run(cfg, world)
    with world.node_leaders_first():  # hub ids download once per node
        model_dir = resolve_model_dir(cfg.model.path) if cfg.model.path else None
        tokenizer = resolve_tokenizer(cfg.data, model_path=model_dir)
        samples, report = load_samples(cfg.data, tokenizer)
    hf = HFCheckpoint(model_dir) if model_dir else None
    args = hf.args if hf else PRESETS[cfg.model.preset]
    if report.max_token_id >= args.vocab_size:
        raise ConfigError(f"the data holds token id {report.max_token_id} but the model's vocab_size is {args.vocab_size}")
    loader = PackedLoader(
        samples, samples_per_step=cfg.data.samples_per_step, tokens_per_microbatch=cfg.data.tokens_per_microbatch,
        epochs=cfg.train.epochs, world_size=world.dp_size, rank=world.dp_rank, seed=cfg.train.seed, cost=CostModel.for_model(args),
    )
    checkpointer = Checkpointer(out, cfg.checkpoint.keep_last, world.rank, async_save=cfg.checkpoint.async_save)
    latest = checkpointer.resume_point()
    if latest is not None and not cfg.checkpoint.resume:  # a fresh run's saves would interleave with the old ones
        raise ConfigError(
            f"checkpoint.resume=false, but {checkpointer.root} holds checkpoints of an earlier run (newest: {latest.name}); "
            "choose another train.output_dir, or remove that folder"
        )
    if args != planned:  # the folder's config.json differs from the built-in one planned offline
        plan = plan_memory(cfg, args, world.world_size, *device_capacity_gib(world.device),
                           path=ExecutionPath.of(world.device.type, compute_dtype(cfg)))  # fmt: skip
    probe = PeakProbe(world.device)  # from here on, memory is the training's: held against the plan in memory.json
    model, optimizer = build_training(cfg, args, world, hf)
    if hf:
        hf.close()  # every rank has its slices: unmap the safetensors files
    total_steps = min(cfg.train.max_steps or loader.total_steps, loader.total_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    position = resume(cfg, checkpointer, latest, model, optimizer, scheduler, loader) if latest is not None else (0, 0)
    checkpointer.check_room(checkpoint_bytes(cfg, args))  # warns when the filesystem cannot hold the checkpoints to come
    run_steps(cfg, world, out, args, model, optimizer, scheduler, loader, checkpointer, total_steps, position)
    record_peaks(out / "memory.json", plan, probe, world.rank, world.world_size)
    if cfg.checkpoint.export_hf:
        base_generation = model_dir / GENERATION_CONFIG if model_dir else None  # sampling defaults vLLM reads
        if base_generation and not base_generation.is_file():
            base_generation = None
        export_hf(model, out / "hf", world.rank, dtype=compute_dtype(cfg), tokenizer=tokenizer, generation_config=base_generation)
        log.info("exported the model to %s", out / "hf")
    dist.barrier()
    dist.destroy_process_group()
    if cfg.eval.benchmarks and cfg.checkpoint.export_hf and world.is_main:
        evaluate_export(cfg, out, world.device)


def resume(cfg: Config, checkpointer: Checkpointer, latest: Path, model: Qwen2, optimizer: torch.optim.Optimizer, scheduler: Any,
           loader: Any) -> tuple[int, int]:  # fmt: skip
    """Restore a checkpoint into model, optimizer, schedule and loader; returns (step, bad steps in a row)."""
    state = checkpointer.load(latest, model, optimizer)
    check_resume(cfg, state.get("settings", {}), str(latest))  # the preflight saw the newest; a fallback may be older
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]  # this run's peak (checkpoint.override)
    scheduler.last_epoch -= 1
    scheduler.step()  # this run's lr at the restored step, into the param groups: the saved one unless overridden
    loader.load_state_dict(state["loader"])
    log.info("resumed from %s (step %d)", latest, state["step"])
    return state["step"], state["bad_steps"]


def run_steps(cfg: Config, world: Distributed, out: Path, args: ModelArgs, model: Qwen2, optimizer: torch.optim.Optimizer,
              scheduler: Any, loader: Any, checkpointer: Checkpointer, total_steps: int, position: tuple[int, int]) -> None:  # fmt: skip
    """The optimizer steps from `position` (step, bad steps in a row) to total_steps: each one
    train_step, its one host read, the update (or a skip when not finite), metrics, checkpoints."""
    step, bad_steps = position
    metrics = MetricsLogger(out, world.is_main, total_steps, step, cfg.train.tensorboard)
    last_sync = time.perf_counter()
    model.train()
    saved = step  # the step of the newest checkpoint, or where the run began
    with Preemption(cfg.train.preemption_grace_s) as preemption, contextlib.closing(metrics):
        for batch in loader if step < total_steps else ():
            divisor = max(batch.num_label_tokens, 1)
            loss_value, norm_value = train_step(model, batch.micro_batches, divisor, world.device, cfg.train.max_grad_norm,
                                                world).tolist()  # host sync  # fmt: skip
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                optimizer.step()
                bad_steps = 0
            else:
                bad_steps += 1
                log.warning("step %d: non-finite loss %s or grad norm %s; skipped (%d in a row)", step, loss_value, norm_value, bad_steps)
                if bad_steps >= cfg.train.max_bad_steps:  # every rank, at the same step: the save in flight completes first
                    checkpointer.wait()
                    raise RuntimeError(f"{bad_steps} non-finite steps in a row (train.max_bad_steps={cfg.train.max_bad_steps}); aborting")
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            now = time.perf_counter()
            step_time, last_sync = now - last_sync, now
            metrics.log({"step": step, "epoch": batch.epoch, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                         **step_rates(cfg, world, args, batch, step_time), "mem_gb": peak_memory_gb(world.device), "skipped": bad_steps > 0})  # fmt: skip
            crash_point(f"step:{step}")
            checkpointer.poll()  # async_save: complete the save in flight once every rank's write is done
            stop = preemption.agreed(world.device)
            epoch_end = step % loader.steps_per_epoch == 0 and cfg.checkpoint.at_epoch_end
            periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            if epoch_end or periodic or step == total_steps or stop:
                train_state = {"step": step, "epoch": batch.epoch, "bad_steps": bad_steps, "scheduler": scheduler.state_dict(),
                               "loader": loader.state_dict(), "settings": resume_settings(cfg)}  # fmt: skip
                if stop:
                    train_state["preempted"] = preemption.name or "another rank's signal"
                checkpointer.save(step, model, optimizer, train_state)
                saved = step
                last_sync = time.perf_counter()  # the next step's time leaves the save out
            if saved == step and not stop:  # a signal during this save: the step is saved, stop now
                stop = preemption.agreed(world.device)
            if stop:
                checkpointer.wait()
                raise Preempted(f"stopped after step {step} of {total_steps} ({preemption.name or 'signalled on another rank'}): "
                                f"{checkpointer.root / f'step-{step:08d}'} holds it; the same command resumes")
            if step >= total_steps:
                break
        checkpointer.wait()  # async_save: the last save is complete before the export
        if preemption.agreed(world.device):  # a signal during that write: the run is saved; stop before the export
            raise Preempted(f"stopped after step {step} of {total_steps} ({preemption.name or 'signalled on another rank'}): "
                            f"{checkpointer.root / f'step-{step:08d}'} holds it; the same command resumes")


def step_rates(cfg: Config, world: Distributed, args: ModelArgs, batch: Any, step_time: float) -> dict[str, Any]:
    """Tokens, throughput and MFU of one step (ours, causal, and torchtitan's, for comparisons)."""
    peak = peak_flops(world.device)
    devices = peak * world.world_size if peak else None
    titan = step_flops_torchtitan(args, batch.num_tokens, cfg.data.tokens_per_microbatch)
    return {
        "tokens": batch.num_tokens, "label_tokens": batch.num_label_tokens, "step_time": step_time,
        "tokens_per_s": batch.num_tokens / step_time, "tokens_per_s_per_device": batch.num_tokens / step_time / world.world_size,
        "mfu": step_flops(args, batch.seqlens) / step_time / devices if devices else None,
        "mfu_torchtitan": titan / step_time / devices if devices else None,
    }  # fmt: skip


def evaluate_export(cfg: Config, out: Path, device: torch.device) -> None:
    """Rank 0 alone, after the process group is gone: `python -m limo.eval.run` on the export, in a
    process of its own. The evaluation gets a fresh CUDA context, the other ranks never wait on a
    collective, and training never imports the evaluation (docs/ARCHITECTURE.md: its layers)."""
    results, fingerprint = out / "eval", model_fingerprint(out / "hf")
    if (results / "config.json").is_file():  # results of an earlier export (a longer run since): set them aside
        earlier = json.loads((results / "config.json").read_text()).get("model")
        if earlier != fingerprint:
            aside = out / f"eval-{earlier or 'unknown'}"
            log.warning("%s holds results of another export (model %s); moved to %s", results, earlier, aside)
            results.rename(aside)
    command = [sys.executable, "-m", "limo.eval.run", "--model", str(out / "hf"), "--benchmarks", ",".join(cfg.eval.benchmarks),
               "--out", str(results), "--device", device.type, "--dtype", "bfloat16" if device.type == "cuda" else "float32",
               "--max-tokens", str(cfg.eval.max_tokens), "--tp", "1", "--dp", "1"]  # fmt: skip  # one GPU, as before: the ranks may still be exiting
    if cfg.eval.samples:
        command += ["--samples", str(cfg.eval.samples), "--temperature", str(cfg.eval.temperature)]
    if cfg.eval.limit:
        command += ["--limit", str(cfg.eval.limit)]
    if cfg.data.system_prompt:
        command += ["--system-prompt", cfg.data.system_prompt]
    log.info("evaluating %s on %s: %s", out / "hf", ", ".join(cfg.eval.benchmarks), " ".join(command[1:]))
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the evaluation of {out / 'hf'} failed (exit code {done.returncode}): {' '.join(command[1:])}")


def main(argv: list[str] | None = None) -> int:
    """Bad input (a key, a data file, a model folder: any UserError) is one line on rank 0 and exit
    code 2 on every rank; a traceback is a bug of ours. A failed start leaves no output_dir behind."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        preflight(cfg)  # paths, benchmarks, a resume's settings: before any process group
    except UserError as e:
        return refuse(e, show=os.environ.get("RANK", "0") == "0")
    out = Path(cfg.train.output_dir)
    existed = out.exists()
    try:
        train(cfg)
    except Preempted as e:  # every rank, after the same step: the save is complete
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank == 0:
            print(f"preempted: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except UserError as e:  # found once the run started (a data file's line 51): every rank raises it
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank == 0 and not existed:
            _remove_if_unused(out)
        return refuse(e, show=rank == 0)  # torchrun reports a worker's exit 2 as its own exit 1; a plain process exits 2
    return 0


def _remove_if_unused(out: Path) -> None:
    """Remove the output_dir a failed start made, if it holds nothing but the empty folders and the
    lock file of that start."""
    if not out.is_dir():
        return
    files = [p for p in out.rglob("*") if not p.is_dir()]
    if all(p.name == ".checkpoints.lock" or p.name.startswith(".shared-") for p in files):
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
