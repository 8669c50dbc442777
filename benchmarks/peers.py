"""betakd's chunked losses against Liger, TRL and dense PyTorch: time and peak memory.

One step = a distillation loss from the final hidden states of a student (trained)
and a teacher (frozen), each with its own ``lm_head``: the student's logits, the
teacher's logits, the per-token divergence (and, by default, the student's CE on the
labels, weighted 0.5 / 0.5 as Liger's defaults do), the mean over tokens, and backward
to the student's hidden states and ``lm_head``. Losses and the peers' counterparts:

* ``fkl``: betakd ``fkl``; Liger ``LigerFusedLinearJSDLoss(beta=0)`` (forward KL); TRL
  ``_chunked_divergence_loss(beta=0)``; dense ``F.kl_div`` on full logits.
* ``jsd``: betakd ``jsd`` (beta 0.5); Liger ``LigerFusedLinearJSDLoss(beta=0.5)``; TRL
  ``_chunked_divergence_loss(beta=0.5)``; dense: Liger's JSD formula on full logits.
* ``cosine``: betakd ``cosine_logits`` (1 - cos of standardised logits); Liger
  ``LigerFusedLinearCosineSimilarityLoss`` (1 - cos of raw logits); dense: 1 - cos of
  raw logits on full logits; TRL has no such loss.

TRL's function computes the divergence only, so its step has no CE. betakd runs in its
single-pass mode (the per-token loss weights are known before the energies, as with
equal, fixed, task or instance betas); ``--variants betakd-recompute`` adds the general
mode (chunks recomputed in backward, for betas that follow the current energies).
Liger runs eagerly (``compiled=False``: no Triton here) with its default chunk.

Every step runs in a fresh process, after a tiny warm-up step that loads every code
path; in each of ``--repeats`` rounds every variant runs one step, in an order that
rotates between rounds, so a busy machine slows all of them alike. ``time``: median over
the rounds of the wall time (``cpu``: of the process's CPU time, all threads, steadier
when other jobs share the cores); ``rss``: the peak resident set during the step above the resident set
before it (the largest over the rounds); ``live``: the peak of live tensor bytes during
one more, profiled step in the first round (:func:`betakd.profiling.peak_tensor_bytes`).
Inputs are excluded from both. Ratios are betakd's value over the peer's; the last printed line
is a JSON object with every measurement. Targets (CPU, float32): betakd time <=
Liger's, betakd peak memory <= 1/8 of dense and below Liger's, for each loss.

Needs the peers: ``pip install -e ".[bench]"`` (liger-kernel, trl).

    python benchmarks/peers.py                              # 4096 tokens, H 1024, V 32000
    python benchmarks/peers.py --tokens 1024 --losses fkl   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import fmt, mib, names, positive, ratio, run_worker

from betakd import chunked, energies
from betakd.profiling import current_rss_bytes, peak_rss_bytes, peak_tensor_bytes
from betakd.teachers import HiddenStateLogits

LOSSES = ("fkl", "jsd", "cosine")
VARIANTS = ("dense", "betakd", "betakd-recompute", "liger", "trl")
DEFAULT_VARIANTS = ("dense", "betakd", "liger", "trl")
BETAKD_ENERGY = {"fkl": ("fkl", {}), "jsd": ("jsd", {"beta": 0.5}), "cosine": ("cosine_logits", {})}
JSD_BETA = {"fkl": 0.0, "jsd": 0.5}
CE_WEIGHT = KD_WEIGHT = 0.5
TARGETS = {"time_vs_liger_max": 1.0, "memory_vs_dense_max": 1 / 8, "memory_vs_liger_max": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=positive, default=4096, help="answer tokens N")
    p.add_argument("--hidden", type=positive, default=1024, help="hidden size of both models")
    p.add_argument("--vocab", type=positive, default=32000)
    p.add_argument("--losses", type=names(LOSSES), default=list(LOSSES), help="fkl,jsd,cosine")
    p.add_argument(
        "--variants",
        type=names(VARIANTS),
        default=list(DEFAULT_VARIANTS),
        help=f"comma-separated, from {','.join(VARIANTS)}",
    )
    p.add_argument("--repeats", type=positive, default=2, help="rounds (one step per variant)")
    p.add_argument(
        "--chunk-size", type=int, default=0, help="betakd tokens per chunk (0: library default)"
    )
    p.add_argument("--liger-chunk-size", type=positive, default=1024, help="Liger's default")
    p.add_argument("--no-ce", action="store_true", help="divergence only, without the CE")
    p.add_argument("--no-live", action="store_true", help="skip the profiled live-tensor peak")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--seed", type=int, default=0)
    # Internal: measure one variant's memory in this (fresh) process.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.chunk_size < 0:
        p.error("--chunk-size must be >= 0")
    return args


# --------------------------------------------------------------------------- one step


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    n, h, v = args.tokens, args.hidden, args.vocab
    scale = h**-0.5
    return {
        "hidden": torch.randn(n, h, generator=g).requires_grad_(True),
        "weight": (torch.randn(v, h, generator=g) * scale).requires_grad_(True),
        "t_hidden": torch.randn(n, h, generator=g),
        "t_weight": torch.randn(v, h, generator=g) * 2 * scale,
        "labels": torch.randint(0, v, (n,), generator=g),
    }


def combine(ce: torch.Tensor | None, kd: torch.Tensor) -> torch.Tensor:
    return KD_WEIGHT * kd if ce is None else CE_WEIGHT * ce + KD_WEIGHT * kd


def dense_step(loss: str, x: dict, with_ce: bool) -> torch.Tensor:
    logits = F.linear(x["hidden"], x["weight"])
    with torch.no_grad():
        teacher = F.linear(x["t_hidden"], x["t_weight"])
    ce = F.cross_entropy(logits, x["labels"]) if with_ce else None
    if loss == "cosine":
        kd = (1 - F.cosine_similarity(logits, teacher, dim=-1)).mean()
    else:
        kd = dense_jsd(logits, teacher, JSD_BETA[loss]).mean()
    return combine(ce, kd)


def dense_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Liger's generalised JSD (beta 0: forward KL), per token, on full logits."""
    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    if beta == 0:
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), 0)
    teacher_kl = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    student_kl = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return beta * teacher_kl + (1 - beta) * student_kl


def betakd_step(
    loss: str, x: dict, with_ce: bool, chunk_size: int, single_pass: bool
) -> torch.Tensor:
    name, options = BETAKD_ENERGY[loss]
    n = x["hidden"].shape[0]
    columns = [CE_WEIGHT, KD_WEIGHT] if with_ce else [KD_WEIGHT]
    # The gradient of the mean-weighted loss with respect to each per-token value.
    upstream = torch.tensor(columns).div(n).expand(n, len(columns))
    out = chunked.chunked_channels(
        x["hidden"],
        x["weight"],
        {None: HiddenStateLogits(x["t_hidden"], x["t_weight"])},
        energies={"kd": energy_fn(name, options)},
        labels=x["labels"] if with_ce else None,
        chunk_size=chunk_size or None,
        upstream=upstream if single_pass else None,
    )
    return combine(out.ce.mean() if with_ce else None, out.energies["kd"].mean())


_ENERGIES: dict[str, Callable] = {}


def energy_fn(name: str, options: dict) -> Callable:
    if name not in _ENERGIES:
        _ENERGIES[name] = energies.get(name, **options)
    return _ENERGIES[name]


def liger_step(loss: str, x: dict, with_ce: bool, chunk_size: int) -> torch.Tensor:
    from liger_kernel.chunked_loss import (
        LigerFusedLinearCosineSimilarityLoss,
        LigerFusedLinearJSDLoss,
    )

    weights = {
        "weight_hard_loss": CE_WEIGHT if with_ce else 0.0,
        "weight_soft_loss": KD_WEIGHT,
        "compiled": False,  # no Triton on this CPU: Liger's chunked losses run eagerly
        "chunk_size": chunk_size,
    }
    if loss == "cosine":
        fn = LigerFusedLinearCosineSimilarityLoss(beta=1.0, **weights)
    else:
        fn = LigerFusedLinearJSDLoss(beta=JSD_BETA[loss], **weights)
    return fn(x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], x["labels"])


def trl_step(loss: str, x: dict) -> torch.Tensor:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    n = x["hidden"].shape[0]
    value, _, _ = _chunked_divergence_loss(
        x["hidden"].view(1, n, -1),
        x["t_hidden"].view(1, n, -1),
        x["weight"],
        x["t_weight"],
        torch.ones(1, n),
        beta=JSD_BETA[loss],
    )
    return KD_WEIGHT * value


def available(loss: str, variant: str) -> bool:
    return not (variant == "trl" and loss == "cosine")


def run_step(args: argparse.Namespace, x: dict, loss: str, variant: str) -> float:
    """One step (forward and backward); returns the loss value."""
    with_ce = not args.no_ce
    if variant == "dense":
        value = dense_step(loss, x, with_ce)
    elif variant.startswith("betakd"):
        value = betakd_step(loss, x, with_ce, args.chunk_size, variant == "betakd")
    elif variant == "liger":
        value = liger_step(loss, x, with_ce, args.liger_chunk_size)
    else:
        value = trl_step(loss, x)
    value.backward()
    x["hidden"].grad = None
    x["weight"].grad = None
    return float(value.detach())


# --------------------------------------------------------------------------- measuring


def measure_all(args: argparse.Namespace, loss: str, variants: list[str]) -> dict[str, dict]:
    """``--repeats`` rounds; in each, every variant runs one step in a fresh process, in
    an order that rotates between rounds. Time: median over rounds; resident set: the
    largest; live tensors and the loss value: from the first round."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.repeats):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            runs[variant].append(step_in_fresh_process(args, loss, variant, live=round_ == 0))
    return {
        v: {
            "time_s": statistics.median(r["time_s"] for r in runs[v]),
            "cpu_time_s": statistics.median(r["cpu_time_s"] for r in runs[v]),
            "rss_bytes": max(r["rss_bytes"] for r in runs[v]),
            "live_bytes": runs[v][0]["live_bytes"],
            "loss": runs[v][0]["loss"],
        }
        for v in variants
    }


def worker(args: argparse.Namespace) -> dict:
    """One step of one variant in this fresh process: time, peak resident set above the
    inputs, and (with ``live``) the live-tensor peak of one more, profiled step."""
    loss, variant, live = args.worker.split(",")
    # A tiny step first loads every library and kernel the step uses, so the resident
    # set delta below counts the step's tensors, not one-off code and thread pools.
    tiny = argparse.Namespace(**{**vars(args), "tokens": 8, "hidden": 8, "vocab": 64})
    run_step(tiny, make_inputs(tiny), loss, variant)
    x = make_inputs(args)
    baseline, high_water = current_rss_bytes(), peak_rss_bytes()
    start, start_cpu = time.perf_counter(), time.process_time()
    value = run_step(args, x, loss, variant)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    after = peak_rss_bytes()
    live_bytes = None
    if live == "live":
        live_bytes = peak_tensor_bytes(lambda: run_step(args, x, loss, variant))
    return {
        "time_s": elapsed,
        "cpu_time_s": cpu,
        "rss_bytes": after - baseline if after > high_water else 0,
        "live_bytes": live_bytes,
        "loss": value,
    }


def step_in_fresh_process(args: argparse.Namespace, loss: str, variant: str, live: bool) -> dict:
    return run_worker(f"{loss},{variant},{'live' if live and not args.no_live else 'none'}")


# --------------------------------------------------------------------------- report


def summarize(loss: str, results: dict[str, dict]) -> dict:
    ours = results["betakd"] if "betakd" in results else None
    summary = {"loss": loss, "variants": results}
    if ours is None:
        return summary
    for peer in results:
        if peer == "betakd":
            continue
        theirs = results[peer]
        summary[f"time_vs_{peer}"] = ratio(ours["time_s"], theirs["time_s"])
        summary[f"cpu_vs_{peer}"] = ratio(ours["cpu_time_s"], theirs["cpu_time_s"])
        summary[f"rss_vs_{peer}"] = ratio(ours["rss_bytes"], theirs["rss_bytes"])
        summary[f"live_vs_{peer}"] = ratio(ours["live_bytes"], theirs["live_bytes"])
    return summary


def print_rows(loss: str, results: dict[str, dict]) -> None:
    for variant, r in results.items():
        print(
            f"{loss:>7} {variant:>17} {r['time_s']:9.2f} {r['cpu_time_s']:9.2f} "
            f"{fmt(mib(r['rss_bytes']), '10.0f')} "
            f"{fmt(mib(r['live_bytes']), '10.0f')} {r['loss']:12.6f}",
            flush=True,
        )


def print_ratios(summary: dict) -> None:
    parts = []
    for key, value in summary.items():
        if key.startswith(("time_vs_", "cpu_vs_", "rss_vs_", "live_vs_")) and value is not None:
            parts.append(f"{key.replace('_vs_', ' / ')} {value:.3f}")
    if parts:
        print(f"{summary['loss']:>7}   betakd: " + ", ".join(parts), flush=True)


def targets_met(summaries: list[dict]) -> dict[str, bool | None]:
    """Per loss: time vs Liger, and peak memory (resident set and live tensors alike) vs
    dense and vs Liger; None where a measurement is missing."""

    def within(s: dict, peer: str, limit: float, measures: tuple[str, ...]) -> bool | None:
        values = [s.get(f"{m}_vs_{peer}") for m in measures]
        if any(v is None for v in values):
            return None
        return all(v <= limit for v in values)

    met = {}
    for s in summaries:
        loss = s["loss"]
        met[f"{loss}/time<=liger"] = within(s, "liger", TARGETS["time_vs_liger_max"], ("time",))
        met[f"{loss}/memory<=dense/8"] = within(
            s, "dense", TARGETS["memory_vs_dense_max"], ("rss", "live")
        )
        met[f"{loss}/memory<liger"] = within(
            s, "liger", TARGETS["memory_vs_liger_max"], ("rss", "live")
        )
    return met


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(
        f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} ce={not args.no_ce} "
        f"repeats={args.repeats} threads={torch.get_num_threads()} betakd chunk="
        f"{args.chunk_size or chunked.default_chunk_size(args.vocab)} "
        f"liger chunk={args.liger_chunk_size} (float32, CPU)"
    )
    print(
        f"{'loss':>7} {'variant':>17} {'time s':>9} {'cpu s':>9} {'rss MiB':>10} "
        f"{'live MiB':>10} {'value':>12}"
    )
    summaries = []
    for loss in args.losses:
        variants = [v for v in args.variants if available(loss, v)]
        results = measure_all(args, loss, variants)
        print_rows(loss, results)
        summary = summarize(loss, results)
        print_ratios(summary)
        summaries.append(summary)
    met = targets_met(summaries)
    verdict = {True: "met", False: "NOT met", None: "n/a"}
    print("targets: " + ", ".join(f"{k} {verdict[v]}" for k, v in met.items()))
    print(
        json.dumps(
            {
                "benchmark": "peers",
                "device": "cpu",
                "dtype": "float32",
                "tokens": args.tokens,
                "hidden": args.hidden,
                "vocab": args.vocab,
                "ce": not args.no_ce,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "betakd_chunk_size": args.chunk_size or chunked.default_chunk_size(args.vocab),
                "liger_chunk_size": args.liger_chunk_size,
                "targets": TARGETS,
                "targets_met": met,
                "results": summaries,
            }
        )
    )


if __name__ == "__main__":
    main()
