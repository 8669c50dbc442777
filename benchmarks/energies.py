"""Dense vs chunked logit energies (+ CE) from hidden states: peak memory and time.

One step = student logits from hidden states and ``lm_head``, frozen-teacher logits,
per-token energy and CE, a loss weighted per token (as betas and per-sample means
weight it), and the backward pass to the student hidden states and ``lm_head``.

* dense: full ``[N, V]`` logits and ``betakd.energies`` on them.
* chunked: ``betakd.chunked.chunked_channels`` (same energies, a chunk at a time).

Peak memory is the extra memory of one step above what the inputs already hold:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the step
  (peak stats reset per step), all variants in this process.
* CPU: every variant runs in a fresh subprocess. ``peak`` is the peak of live tensor
  bytes during one profiled step (``torch.profiler`` allocation events, the CPU
  counterpart of the CUDA number); ``rss`` is the peak resident set
  (``getrusage(RUSAGE_SELF).ru_maxrss``) after the timed steps minus the resident set
  once the inputs exist (after a tiny warm-up step has loaded all code paths), an upper
  bound that includes memory the allocator keeps cached.

Time is the median over ``--repeats`` steps after one warm-up step. Dense and chunked
run alternately in the same invocation, so their ratio compares like with like on a
shared machine. The last printed line is a JSON object with every measurement.

    python benchmarks/energies.py                                      # CPU: V = 32000
    python benchmarks/energies.py --device cuda --dtype bfloat16       # also V = 151936

The default vocabularies are 32000 on a CPU (the dense side of V = 151936 needs about
25 GB) and 32000 and 151936 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from common import fmt, mib, names, positive, ratio, run_worker

from betakd import chunked, energies
from betakd.profiling import current_rss_bytes, peak_rss_bytes, peak_tensor_bytes
from betakd.teachers import HiddenStateLogits

VARIANT_DENSE = "dense"
# eager: chunks recomputed in backward (any upstream weights); single: gradients in
# the forward pass (upstream weights known up front); compiled: eager with torch.compile.
CHUNKED_MODES = ("eager", "single", "compiled")
DEFAULT_MODES = {"cpu": ["eager", "single"], "cuda": ["eager", "single", "compiled"]}
DEFAULT_VOCAB = {"cpu": [32000], "cuda": [32000, 151936]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=positive, default=4096, help="answer tokens N = B*T")
    p.add_argument("--hidden", type=positive, default=1024)
    p.add_argument(
        "--vocab",
        type=positive,
        nargs="+",
        default=None,
        help="vocabulary sizes (default: 32000 on cpu; 32000 151936 on cuda)",
    )
    p.add_argument(
        "--energies",
        type=names(energies.names()),
        nargs="+",
        default=[["fkl", "cosine_probs"]],
        help="energy names, space- or comma-separated",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        nargs="+",
        default=[0],
        help="tokens per chunk; 0 = betakd.chunked.default_chunk_size; several to sweep",
    )
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--no-ce", action="store_true", help="energy only, without the CE channel")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(CHUNKED_MODES),
        default=None,
        help="chunked variants: eager (recomputed in backward), single (gradients in the "
        "forward pass), compiled (eager with torch.compile per chunk; dense always runs "
        "eager). Default: eager single on CPU, all three on CUDA",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    # Internal: run one variant and print its measurement as JSON (CPU isolation).
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(c < 0 for c in args.chunk_size):
        p.error("--chunk-size values must be >= 0")
    args.energies = [name for group in args.energies for name in group]
    if args.vocab is None:
        args.vocab = DEFAULT_VOCAB[args.device]
    return args


# --------------------------------------------------------------------------- one step


def make_inputs(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    n, h = args.tokens, args.hidden
    scale = h**-0.5

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=args.device, dtype=dtype)

    inputs = {
        "hidden": randn(n, h).requires_grad_(True),
        "weight": randn(vocab, h, std=scale).requires_grad_(True),
        "t_hidden": randn(n, h),
        # Four padding rows, as in real teachers, to exercise the vocabulary slice.
        "t_weight": randn(vocab + 4, h, std=2 * scale),
        "labels": torch.randint(0, vocab, (n,), generator=g).to(args.device),
        "w_energy": (torch.rand(n, generator=g) + 0.5).to(args.device),
        "w_ce": (torch.rand(n, generator=g) + 0.5).to(args.device),
    }
    return inputs


def dense_step(inputs: dict, fn, with_ce: bool) -> None:
    vocab = inputs["weight"].shape[0]
    logits = F.linear(inputs["hidden"], inputs["weight"])
    with torch.no_grad():
        teacher = F.linear(inputs["t_hidden"], inputs["t_weight"][:vocab])
    loss = (inputs["w_energy"] * fn(logits, teacher)).sum()
    if with_ce:
        ce = F.cross_entropy(logits.float(), inputs["labels"], reduction="none")
        loss = loss + (inputs["w_ce"] * ce).sum()
    loss.backward()


def chunked_step(inputs: dict, fn, with_ce: bool, chunk_size: int, mode: str) -> None:
    # The loss below weighs each token's CE and energy by w_ce and w_energy: in the
    # single-pass mode those are the gradients the chunks take in the forward pass.
    weights = [inputs["w_ce"], inputs["w_energy"]] if with_ce else [inputs["w_energy"]]
    out = chunked.chunked_channels(
        inputs["hidden"],
        inputs["weight"],
        {None: HiddenStateLogits(inputs["t_hidden"], inputs["t_weight"])},
        energies={"kd": fn},
        labels=inputs["labels"] if with_ce else None,
        chunk_size=chunk_size or None,
        compile=mode == "compiled",
        upstream=torch.stack(weights, dim=1) if mode == "single" else None,
    )
    loss = (inputs["w_energy"] * out.energies["kd"]).sum()
    if with_ce:
        loss = loss + (inputs["w_ce"] * out.ce).sum()
    loss.backward()


_ENERGY_FNS: dict[str, object] = {}


def energy_fn(name: str):
    # Built once: torch.compile guards on the energy object, a new one would recompile.
    if name not in _ENERGY_FNS:
        _ENERGY_FNS[name] = energies.get(name)
    return _ENERGY_FNS[name]


def run_step(args: argparse.Namespace, inputs: dict, variant: str, energy: str) -> None:
    fn, with_ce = energy_fn(energy), not args.no_ce
    if variant == VARIANT_DENSE:
        dense_step(inputs, fn, with_ce)
    else:
        mode, chunk_size = parse_variant(variant)
        chunked_step(inputs, fn, with_ce, chunk_size, mode)
    # Free the gradients so every step starts from the same memory.
    inputs["hidden"].grad = None
    inputs["weight"].grad = None


def chunked_variants(args: argparse.Namespace, vocab: int) -> list[str]:
    """``mode=chunk_size`` for every requested mode and chunk size."""
    return [
        f"{mode}={c or chunked.default_chunk_size(vocab, args.device, mode == 'compiled')}"
        for mode in args.modes
        for c in args.chunk_size
    ]


def parse_variant(variant: str) -> tuple[str, int]:
    mode, size = variant.split("=")
    return mode, int(size)


# --------------------------------------------------------------------------- measuring


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(
    args: argparse.Namespace, inputs: dict, variant: str, energy: str
) -> tuple[float, float]:
    """Wall time and process CPU time (all threads) of one step."""
    synchronize(args.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    run_step(args, inputs, variant, energy)
    synchronize(args.device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def measure_cpu_worker(args: argparse.Namespace) -> dict:
    """One variant in this (fresh) process: warm-up + repeats, peak RSS delta, times,
    then one profiled step for the live-tensor peak."""
    energy, vocab, variant = args.worker.split(",")
    # A tiny step first loads every library and kernel the step uses, so the resident
    # set delta below counts the step's tensors, not one-off code and thread pools.
    tiny = argparse.Namespace(**{**vars(args), "tokens": 8, "hidden": 8})
    run_step(tiny, make_inputs(tiny, 64), variant, energy)
    inputs = make_inputs(args, int(vocab))
    baseline = current_rss_bytes()
    high_water_before = peak_rss_bytes()
    times = [timed_step(args, inputs, variant, energy) for _ in range(args.repeats + 1)]
    high_water_after = peak_rss_bytes()
    rss_peak = high_water_after - baseline if high_water_after > high_water_before else None
    live_peak = peak_tensor_bytes(lambda: run_step(args, inputs, variant, energy))
    return {
        "time_s": statistics.median(t[0] for t in times[1:]),
        "cpu_time_s": statistics.median(t[1] for t in times[1:]),
        "peak_bytes": live_peak,
        "rss_peak_bytes": rss_peak,
    }


def measure_cpu(args: argparse.Namespace, energy: str, vocab: int, variant: str) -> dict:
    return run_worker(f"{energy},{vocab},{variant}")


def measure_cuda(args: argparse.Namespace, inputs: dict, energy: str, variant: str) -> dict:
    # Fresh compile caches per variant: a sweep would otherwise exceed Dynamo's
    # recompile limit and silently fall back to eager.
    torch.compiler.reset()
    timed_step(args, inputs, variant, energy)  # warm-up (kernels, allocator, compilation)
    times, peaks = [], []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        times.append(timed_step(args, inputs, variant, energy)[0])
        peaks.append(torch.cuda.max_memory_allocated() - before)
    return {
        "time_s": statistics.median(times),
        "cpu_time_s": None,
        "peak_bytes": max(peaks),
        "rss_peak_bytes": None,
    }


def measure_all(args: argparse.Namespace, energy: str, vocab: int) -> dict[str, dict]:
    variants = [VARIANT_DENSE, *chunked_variants(args, vocab)]
    if args.device == "cpu":
        return {v: measure_cpu(args, energy, vocab, v) for v in variants}
    inputs = make_inputs(args, vocab)
    results = {v: measure_cuda(args, inputs, energy, v) for v in variants}
    del inputs
    torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- report


def report_rows(energy: str, vocab: int, results: dict[str, dict]) -> list[dict]:
    dense = results[VARIANT_DENSE]
    rows = []
    for variant, r in results.items():
        if variant == VARIANT_DENSE:
            continue
        mode, chunk_size = parse_variant(variant)
        rows.append(
            {
                "energy": energy,
                "vocab": vocab,
                "mode": mode,
                "chunk_size": chunk_size,
                "dense_time_s": dense["time_s"],
                "chunked_time_s": r["time_s"],
                "dense_peak_mib": mib(dense["peak_bytes"]),
                "chunked_peak_mib": mib(r["peak_bytes"]),
                "memory_ratio": ratio(r["peak_bytes"], dense["peak_bytes"]),
                "dense_rss_peak_mib": mib(dense["rss_peak_bytes"]),
                "chunked_rss_peak_mib": mib(r["rss_peak_bytes"]),
                "rss_ratio": ratio(r["rss_peak_bytes"], dense["rss_peak_bytes"]),
                "time_ratio": ratio(r["time_s"], dense["time_s"]),
                "cpu_time_ratio": ratio(r["cpu_time_s"], dense["cpu_time_s"]),
            }
        )
    return rows


def print_row(row: dict) -> None:
    print(
        f"{row['energy']:>13} {row['vocab']:>7} {row['mode']:>8} {row['chunk_size']:>6} "
        f"{fmt(row['dense_peak_mib'], '10.0f')} {fmt(row['chunked_peak_mib'], '10.0f')} "
        f"{fmt(row['memory_ratio'], '7.3f')} "
        f"{row['dense_time_s']:8.3f} {row['chunked_time_s']:8.3f} "
        f"{fmt(row['time_ratio'], '6.2f')} {fmt(row['cpu_time_ratio'], '6.2f')} "
        f"{fmt(row['rss_ratio'], '6.3f')}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.modes is None:
        args.modes = DEFAULT_MODES[args.device]
    if args.worker:
        print(json.dumps(measure_cpu_worker(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"device={device_name} dtype={args.dtype} tokens={args.tokens} hidden={args.hidden} "
        f"ce={'no' if args.no_ce else 'yes'} repeats={args.repeats} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"{'energy':>13} {'vocab':>7} {'mode':>8} {'chunk':>6} {'dense MiB':>10} {'chunk MiB':>10} "
        f"{'mem x':>7} {'dense s':>8} {'chunk s':>8} {'time x':>6} {'cpu x':>6} {'rss x':>6}"
    )
    rows = []
    for vocab in args.vocab:
        for energy in args.energies:
            for row in report_rows(energy, vocab, measure_all(args, energy, vocab)):
                print_row(row)
                rows.append(row)
    summary = {
        "benchmark": "energies",
        "device": device_name,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "ce": not args.no_ce,
        "repeats": args.repeats,
        "targets": {"memory_ratio_max": 1 / 8, "time_ratio_max": 1.0},
        "max_ratios": {
            mode: {
                "memory": _max_or_none(r["memory_ratio"] for r in rows if r["mode"] == mode),
                "time": _max_or_none(r["time_ratio"] for r in rows if r["mode"] == mode),
            }
            for mode in args.modes
        },
        "rows": rows,
    }
    print(json.dumps(summary))


def _max_or_none(values) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


if __name__ == "__main__":
    main()
