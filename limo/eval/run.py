"""Evaluate a model on the benchmark suite with LIMO's protocol.

    python -m limo.eval.run --model DIR --benchmarks aime24,math500 [--samples 16 --temperature 0.7 --max-tokens 32768]

LIMO's protocol by default: its system prompt, the model's chat template, up to 32768 new tokens;
16 samples at temperature 0.7 for AIME24, AMC23 and CHMath, one greedy sample elsewhere; the last
\\boxed{} graded against the gold. Writes <out>/<benchmark>.jsonl (one line per sample: problem
id, output, extracted answer, verdict), <out>/summary.json, and prints a table. Re-running with
the same --out skips every sample already on disk.

From Python: `evaluate(llm_or_generator, benchmarks, out_dir)` returns the summaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import logging
import signal
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from limo.data.chat import missing_tokenizer
from limo.data.suites import DEFAULT_DATA, SUITE, Benchmark, load_benchmark
from limo.eval.generators import Completion, Generator, Request, as_generator
from limo.eval.grading import DEFAULT_TIMEOUT_S, grade
from limo.eval.results import ResultWriter, SampleResult, format_table, load_results, rewrite_results, summarize
from limo.model.fingerprint import model_fingerprint

log = logging.getLogger(__name__)

LIMO_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_MAX_TOKENS = 32768


def sample_seed(seed: int, benchmark: str, problem_id: str, sample: int) -> int:
    """A 31-bit seed per sample, fixed by its identity alone: resumed == uninterrupted."""
    digest = hashlib.sha256(f"{seed}:{benchmark}:{problem_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _has_results(out_dir: Path) -> bool:
    """Whether the folder holds a finished sample (a run killed before its first flush holds none)."""
    return any(f.stat().st_size > 0 for f in out_dir.glob("*.jsonl"))


def _check_config(out_dir: Path, config: dict) -> None:
    """A resumed run must sample the same way as the run it continues; new benchmarks may join.
    A folder without a finished sample holds nothing to keep consistent: its settings are replaced."""
    path = out_dir / "config.json"
    if path.exists() and not _has_results(out_dir):
        log.info("%s: no finished samples there; its settings are replaced by this run's", path)
    elif path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("model") and config.get("model") and old["model"] != config["model"]:
            raise ValueError(f"{path}: the results there come from another model (fingerprint {old['model']}, this one "
                             f"{config['model']}); use another --out")
        for key in ("system_prompt", "top_p", "max_tokens", "seed"):
            if old.get(key) != config[key]:
                raise ValueError(f"{path}: this run has {key}={config[key]!r} but the results there were made with "
                                 f"{old.get(key)!r}; use another --out or the same setting")
        for name, protocol in config["benchmarks"].items():
            if name in old["benchmarks"] and old["benchmarks"][name] != protocol:
                raise ValueError(f"{path}: benchmark {name} now has {protocol}, the results there have "
                                 f"{old['benchmarks'][name]}; use another --out or the same setting")
        config = {**config, "benchmarks": {**old["benchmarks"], **config["benchmarks"]}}
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")


def evaluate(llm_or_generator: Any, benchmarks: Sequence[Benchmark], out_dir: str | Path, *, samples: int | None = None,
             temperature: float | None = None, top_p: float = 1.0, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0,
             system_prompt: str = LIMO_SYSTEM_PROMPT, batch_size: int = 512, grade_threads: int = 4,
             timeout_s: float = DEFAULT_TIMEOUT_S, regrade: bool = False, verbose: bool = True,
             model: str | None = None) -> list[dict]:
    """Generate what is missing, grade it, append it to <out_dir>/<benchmark>.jsonl, and return one
    summary per benchmark (also merged into <out_dir>/summary.json). `samples` / `temperature`
    override every benchmark's protocol; `regrade` re-grades stored outputs with today's grader.
    `model` (model_fingerprint) keeps another model's results in out_dir from being resumed."""
    if max_tokens < 1 or batch_size < 1 or (samples is not None and samples < 1):
        raise ValueError(f"max_tokens, batch_size and samples must be >= 1, got {max_tokens}, {batch_size}, {samples}")
    generate = as_generator(llm_or_generator)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocols = {b.name: {"samples": b.samples if samples is None else samples, "temperature": b.temperature if temperature is None else temperature}
                 for b in benchmarks}
    _check_config(out_dir, {"model": model, "system_prompt": system_prompt, "top_p": top_p, "max_tokens": max_tokens,
                            "seed": seed, "benchmarks": protocols})
    summaries = []
    with ThreadPoolExecutor(grade_threads) as graders:
        for bench in benchmarks:
            n, temp = protocols[bench.name]["samples"], protocols[bench.name]["temperature"]
            path = out_dir / f"{bench.name}.jsonl"
            done = load_results(path)
            todo = [(p, j) for p in bench.problems for j in range(n) if (p.id, j) not in done]
            if verbose:
                print(f"{bench.name}: {len(bench.problems)} problems x {n} samples at T={temp}; "
                      f"{len(done)} on disk, {len(todo)} to generate", flush=True)
            with ResultWriter(path) as writer:
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start:start + batch_size]
                    seeds = [sample_seed(seed, bench.name, p.id, j) for p, j in chunk]
                    requests = [Request(system_prompt, p.question, temp, top_p, max_tokens, s) for (p, _), s in zip(chunk, seeds)]
                    new = _generate_and_grade(generate, requests, chunk, seeds, bench.name, graders, writer, timeout_s)
                    done.update({(r.problem_id, r.sample): r for r in new})
            if regrade:
                done = _regrade(bench, path, done, graders, timeout_s)
            summaries.append(summarize(bench.name, n, [p.id for p in bench.problems], done))
    summary_path = out_dir / "summary.json"  # other benchmarks evaluated into this folder earlier stay
    earlier = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else []
    ours = {x["benchmark"] for x in summaries}
    summary_path.write_text(json.dumps([x for x in earlier if x["benchmark"] not in ours] + summaries, indent=1), encoding="utf-8")
    if verbose:
        print(format_table(summaries), flush=True)
    return summaries


def _generate_and_grade(generate: Generator, requests: list[Request], chunk: list, seeds: list[int], name: str,
                        graders: ThreadPoolExecutor, writer: ResultWriter, timeout_s: float) -> list[SampleResult]:
    """One batch: each sample is graded and written as it finishes (when the generator reports
    finishes: `on_done`), so an interrupt loses only the samples still running. The graders
    finish and write what was handed to them even when generation is interrupted."""

    def finish(i: int, c: Completion) -> SampleResult:
        (p, j), s = chunk[i], seeds[i]
        pred, ok = grade(c.text, p.golds, timeout_s=timeout_s)
        result = SampleResult(name, p.id, j, s, list(p.golds), c.text, c.finish_reason, c.num_tokens, pred, ok)
        writer.write(result)
        return result

    futures: dict[int, Future] = {}
    try:
        if "on_done" in inspect.signature(generate).parameters:
            completions = generate(requests, on_done=lambda i, c: futures.setdefault(i, graders.submit(finish, i, c)))
        else:  # a plain callable on requests: its batch is written when it returns
            completions = generate(requests)
    except BaseException:  # Ctrl-C, SIGTERM: what finished is graded and written before the interrupt goes on
        wait(list(futures.values()))
        raise
    for i, c in enumerate(completions):
        if i not in futures:
            futures[i] = graders.submit(finish, i, c)
    return [futures[i].result() for i in range(len(requests))]


def _regrade(bench: Benchmark, path: Path, done: dict, graders: ThreadPoolExecutor, timeout_s: float) -> dict:
    """Stored outputs graded again (the grader improved, or the golds changed); the file is
    rewritten with the new verdicts."""
    by_id = {p.id: p for p in bench.problems}
    keys = [k for k in done if k[0] in by_id]
    verdicts = graders.map(lambda k: grade(done[k].output, by_id[k[0]].golds, timeout_s=timeout_s), keys)
    updated = dict(done)
    for k, (pred, ok) in zip(keys, verdicts):
        updated[k] = dataclasses.replace(done[k], extracted=pred, correct=ok, golds=list(by_id[k[0]].golds))
    rewrite_results(path, updated.values())
    return updated


def evaluate_folder(model_dir: str | Path, names: Sequence[str], out_dir: str | Path, *, device: str, dtype: str,
                    samples: int | None = None, temperature: float | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                    limit: int | None = None, system_prompt: str = LIMO_SYSTEM_PROMPT, data: str | None = None,
                    fingerprint: str | None = None) -> list[dict]:
    """Evaluate an HF model folder with our sampler on benchmarks named as on the command line
    (`fingerprint`: its model_fingerprint, when the caller has it already)."""
    from limo.eval.sampler import LLM

    benchmarks = parse_benchmarks(",".join(names), data, limit)
    llm = LLM(str(model_dir), dtype=dtype, device=device, max_model_len=context_len(model_dir, max_tokens))
    return evaluate(llm, benchmarks, out_dir, samples=samples, temperature=temperature, max_tokens=max_tokens,
                    system_prompt=system_prompt, model=fingerprint or model_fingerprint(model_dir))


def context_len(model_dir: str | Path, max_tokens: int) -> int:
    """The sampler's max_model_len: room for a prompt beside max_tokens, but never past the
    positions the model was trained on (LIMO: 32,768 for prompt + output, as its vLLM had it)."""
    trained = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    return min(max_tokens + 4096, trained) if trained else max_tokens + 4096


# ------------------------------------------------------------------------------------------
# Command line


def parse_benchmarks(spec: str, data: str | None, limit: int | None) -> list[Benchmark]:
    """`aime24,math500=hf:owner/ds/test.jsonl,gpqa` -> benchmarks (first `limit` problems each)."""
    benchmarks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, source = item.partition("=")
        bench = load_benchmark(name, source or data)
        if limit is not None:
            bench = Benchmark(bench.name, bench.problems[:limit], bench.samples, bench.temperature)
        benchmarks.append(bench)
    if not benchmarks:
        raise ValueError("--benchmarks names no benchmark")
    return benchmarks


def parallel_layout(args: argparse.Namespace, gpus: int) -> tuple[int, int, str]:
    """(T, D, why) for --tp/--dp: as given, or on "auto" the plan's best for this run on the GPUs
    visible (limo/eval/plan.py); a CPU runs one sampler."""
    if args.tp != "auto" and args.dp != "auto":
        return int(args.tp), int(args.dp), "as asked"
    if args.device != "cuda" or gpus <= 1 or args.engine == "transformers":
        return int(args.tp if args.tp != "auto" else 1), int(args.dp if args.dp != "auto" else 1), "one device"
    from limo.eval import plan

    names = [b.strip().partition("=")[0] for b in args.benchmarks.split(",") if b.strip()]
    workload = plan.workload_of([n for n in names if n in plan.LIMO_SUITE] or list(plan.LIMO_SUITE), args.limit, args.samples)
    import torch

    hbm = torch.cuda.get_device_properties(0).total_memory / 2**30
    choices = plan.plan(plan.model_args(args.model), gpus, workload, args.max_tokens, args.max_num_seqs, hbm_gib=hbm)
    if args.tp != "auto":
        choices = [c for c in choices if c.tp == int(args.tp)]
    if args.dp != "auto":
        choices = [c for c in choices if c.dp == int(args.dp)]
    chosen = plan.best(choices)
    if chosen is None:  # one GPU with preemption, as before: slower, but it runs what fits
        print(f"warning: no tensor x data-parallel layout of {gpus} GPUs of {hbm:.0f} GiB fits the plan's full-length chains "
              "(python -m limo.eval.plan shows why): sampling on one GPU", file=sys.stderr, flush=True)  # fmt: skip
        return 1, 1, "no layout fits the plan"
    return chosen.tp, chosen.dp, f"the plan's best on {gpus} GPUs, projected {chosen.hours * 60:.0f} min"


def build_generator(args: argparse.Namespace) -> Any:
    if args.engine == "transformers":
        from limo.eval.generators import TransformersGenerator

        return TransformersGenerator(args.model, dtype=args.dtype, device=args.device)
    kwargs = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs, kv_cache_gib=args.kv_cache_gib,
                  max_model_len=args.max_model_len or context_len(args.model, args.max_tokens))  # fmt: skip
    if args.dp > 1:
        from limo.eval.replicas import ReplicaGenerator

        return ReplicaGenerator(args.model, args.dp, args.tp, gpus=args.device == "cuda", **kwargs)
    from limo.eval.sampler import LLM

    return LLM(args.model, tensor_parallel_size=args.tp, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m limo.eval.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--benchmarks", default="aime24,math500",
                   help=f"comma-separated names from {{{','.join(SUITE)}}}; name=PATH or name=hf:owner/ds/file for another "
                        "source (default aime24,math500)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder in LIMO's layout: <data>/<dir>/test.jsonl (default ../shared/data/eval)")
    p.add_argument("--out", help="results folder (default runs/eval/<model folder name>-<model fingerprint>)")
    p.add_argument("--samples", type=int, help="samples per problem for every benchmark (default: LIMO's protocol)")
    p.add_argument("--temperature", type=float, help="for every benchmark (default: LIMO's protocol)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for sampled benchmarks (default 1.0: off)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="new tokens per sample (default 32768)")
    p.add_argument("--seed", type=int, default=0, help="base of every sample's seed (default 0)")
    p.add_argument("--system-prompt", default=LIMO_SYSTEM_PROMPT, help="(default LIMO's)")
    p.add_argument("--limit", type=int, help="only the first N problems of each benchmark (smoke runs)")
    p.add_argument("--engine", choices=("sampler", "transformers"), default="sampler",
                   help="our paged-KV sampler (default), or transformers' generate (slow reference, small models)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="model dtype (default bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="(default cuda when a GPU is visible, else cpu)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sampler: sequences decoded together (default 256)")
    p.add_argument("--kv-cache-gib", type=float,
                   help="sampler: KV cache budget in GiB (default: 90%% of a GPU's free memory; 4 GiB on a CPU)")
    p.add_argument("--max-model-len", type=int,
                   help="sampler: prompt + output tokens (default max-tokens + 4096, at most the model's max_position_embeddings)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="samples per generate call (default 512); each sample is written as it finishes")
    p.add_argument("--regrade", action="store_true", help="re-grade outputs already on disk with the current grader")
    p.add_argument("--tp", default="auto", help="tensor-parallel GPUs per sampler (default auto: the plan's best on the GPUs visible)")
    p.add_argument("--dp", default="auto", help="data-parallel samplers, T x D GPUs in all (default auto)")
    p.add_argument("--plan", action="store_true", help="print the tensor x data-parallel plan for this run and exit")
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    try:  # what the user named: one line each, not a traceback
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA device is visible (this torch build: "
                             f"{torch.__version__}); use --device cpu")
        if not (Path(args.model) / "config.json").is_file():
            raise ValueError(f"--model {args.model}: no such model folder (it needs config.json, safetensors and a tokenizer)")
        benchmarks = parse_benchmarks(args.benchmarks, args.data, args.limit)
        if message := missing_tokenizer(args.model, "the prompts are chat-templated text: copy the tokenizer the model was "
                                                    "trained with into that folder (limo.engine.train's export carries its own)"):
            raise ValueError(message)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    try:
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        for flag in ("tp", "dp"):
            value = getattr(args, flag)
            if value != "auto" and not (value.isdigit() and int(value) >= 1):
                raise ValueError(f"--{flag} {value}: a count >= 1, or auto")
        if args.plan:
            from limo.eval import plan

            names = [b.strip().partition("=")[0] for b in args.benchmarks.split(",") if b.strip()]
            workload = plan.workload_of(names, args.limit, args.samples)
            n = gpus or 8
            print(plan.table(plan.plan(plan.model_args(args.model), n, workload, args.max_tokens, args.max_num_seqs), n, args.max_tokens, workload))
            return 0
        args.tp, args.dp, why = parallel_layout(args, gpus)
        if args.device == "cuda" and args.tp * args.dp > gpus:
            raise ValueError(f"--tp {args.tp} x --dp {args.dp} needs {args.tp * args.dp} GPUs; {gpus} are visible")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.engine == "sampler" and (args.tp * args.dp > 1 or args.device == "cuda"):
        print(f"sampling with tensor parallelism {args.tp} x {args.dp} data-parallel replicas ({why})", flush=True)
    fingerprint = model_fingerprint(args.model)
    folder = Path(args.model).resolve()
    name = folder.parent.name if folder.name == "hf" else folder.name  # train.py exports to <output_dir>/hf
    out = Path(args.out) if args.out else Path("runs/eval") / f"{name}-{fingerprint}"
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, a cluster's stop: keep what finished, then exit
        signal.signal(signum, _interrupt)
    generator = None
    try:
        generator = build_generator(args)
        evaluate(generator, benchmarks, out, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                 max_tokens=args.max_tokens, seed=args.seed, system_prompt=args.system_prompt, batch_size=args.batch_size,
                 regrade=args.regrade, model=fingerprint)
    except Interrupted as e:
        print(f"interrupted by {signal.Signals(e.signum).name}: the finished samples are in {out}/; the same command resumes",
              file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        if hasattr(generator, "close"):
            generator.close()  # tensor-parallel workers, data-parallel replicas
    print(f"results in {out}/", flush=True)
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread between two of the sampler's steps."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


if __name__ == "__main__":
    sys.exit(main())
