"""KD step time vs student-only CE step time, against the FLOP-ideal ratio (measured side by side).

A KD step runs the teacher forward (≈ 2·N_teacher FLOPs per token) and the student forward and
backward (≈ 6·N_student); a plain CE step only the latter. The FLOP-ideal ratio is therefore
``(2·N_teacher + 6·N_student) / (6·N_student)``; this prints the measured ratio divided by it
(goal ≤ 1.05: KD costs no more than the teacher's forward FLOPs). Steps of the two runs are
interleaved so that load on a shared machine hits both alike; medians are reported.

With ``--cache-top-k K`` two more runs are interleaved: KD with the live teacher's top-K
(``--kd-top-k K``) and KD reading a teacher cache of the same samples (``distill --teacher-cache``),
whose FLOP-ideal ratio to the CE step is 1: what reading the cache adds per step is printed.

    python benchmarks/kd_step_time.py --teacher /tmp/smol --student STUDENT --data-path P
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minitron_megatron.checkpoint import find_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.kd_loss import vocab_parallel_kd_loss
from minitron_megatron.distill.training import Trainer
from minitron_megatron.runtime.distributed import LaunchEnv, distributed


def loss_only_times(tokens: int, vocab: int, repeats: int = 3) -> tuple[float, float]:
    """fwd+bwd seconds of our KD loss and of Megatron's vocab-parallel CE on the same logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    labels = torch.randint(0, vocab, (tokens, 1))
    teacher = torch.randn(tokens, 1, vocab)
    kd_times, ce_times = [], []
    for _ in range(repeats):
        base = torch.randn(tokens, 1, vocab, requires_grad=True)
        start = time.perf_counter()
        kd, _ = vocab_parallel_kd_loss(base.clone(), teacher)
        kd.sum().backward()
        kd_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        vocab_parallel_cross_entropy(base.clone(), labels).sum().backward()
        ce_times.append(time.perf_counter() - start)
    return statistics.median(kd_times), statistics.median(ce_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache-top-k", type=int, default=0, metavar="K",
                        help="also time live --kd-top-k K steps and steps reading a K cache")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher, student = find_checkpoint(args.teacher), find_checkpoint(args.student)
    n_t, n_s = teacher.model_config.num_parameters(), student.model_config.num_parameters()
    data = DataConfig(data_path=args.data_path, seq_length=args.seq_length)
    iters = args.steps + args.warmup
    with tempfile.TemporaryDirectory() as tmp, distributed(LaunchEnv(), ParallelConfig()) as ps:
        def trainer(name: str, *, with_teacher: bool = True, top_k: int | None = None,
                    cache=None) -> Trainer:
            train = TrainConfig(save=Path(tmp) / name, train_iters=iters,
                                global_batch_size=args.micro_batch_size,
                                micro_batch_size=args.micro_batch_size, lr=1e-5)
            return Trainer(train=train, kd=KDConfig(top_k=top_k), data=data, student=student,
                           teacher=teacher if with_teacher and cache is None else None, ps=ps,
                           teacher_cache=cache)

        kd_run, ce_run = trainer("kd"), trainer("ce", with_teacher=False)
        runs = {"kd": kd_run, "ce": ce_run}
        if args.cache_top_k:
            from minitron_megatron.distill.teacher_cache import TeacherCache, TeacherCacheConfig
            from minitron_megatron.distill.teacher_cache_write import write_teacher_cache

            k = args.cache_top_k
            cache = write_teacher_cache(teacher, ps, data,
                                        num_samples=iters * args.micro_batch_size,
                                        micro_batch_size=args.micro_batch_size,
                                        config=TeacherCacheConfig(top_k=k),
                                        save=Path(tmp) / "cache")
            runs["kd top-k"] = trainer("topk", top_k=k)
            runs["kd cached"] = trainer("cached", cache=TeacherCache(cache), top_k=k)
        tokens = torch.randint(0, student.model_config.vocab_size,
                               (args.micro_batch_size, args.seq_length))
        positions = torch.arange(args.seq_length).expand(args.micro_batch_size, -1)

        def teacher_forward() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                kd_run.model.teacher(tokens, positions, None)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {name: [] for name in runs}
        teacher_times = []
        for i in range(iters):
            steps = {name: run.train_step()["step_time"] for name, run in runs.items()}
            t_fwd = teacher_forward()
            if i >= args.warmup:
                for name, seconds in steps.items():
                    times[name].append(seconds)
                teacher_times.append(t_fwd)
        kd_times, ce_times = times["kd"], times["ce"]
        vocab = student.model_config.padded_vocab_size
        loss_kd, loss_ce = loss_only_times(args.micro_batch_size * args.seq_length, vocab)

    ideal = (2 * n_t + 6 * n_s) / (6 * n_s)
    print(f"teacher {n_t / 1e6:.1f}M params, student {n_s / 1e6:.1f}M params, "
          f"{args.micro_batch_size}×{args.seq_length} tokens per step, {torch.get_num_threads()} "
          f"threads, {args.steps} interleaved steps each; FLOP-ideal ratio {ideal:.3f}")
    t_kd = t_ce = 0.0
    for stat in (min, statistics.median):  # min: least disturbed by other load on the machine
        t_kd, t_ce, t_fwd = stat(kd_times), stat(ce_times), stat(teacher_times)
        print(f"{stat.__name__:>6}: KD step {t_kd:.3f} s | CE step {t_ce:.3f} s | measured ratio "
              f"{t_kd / t_ce:.3f} | ÷ FLOP-ideal = {t_kd / t_ce / ideal:.3f}   (goal ≤ 1.05)")
        print(f"        teacher forward alone {t_fwd:.3f} s = {t_fwd / t_ce:.3f} CE steps "
              f"(FLOP share {ideal - 1:.3f}); KD step − CE step − teacher forward = "
              f"{t_kd - t_ce - t_fwd:+.3f} s (what the KD machinery adds)")
    print(f"loss alone, fwd+bwd on {args.micro_batch_size * args.seq_length}×{vocab} logits: "
          f"our KD {loss_kd:.3f} s | Megatron CE {loss_ce:.3f} s "
          f"(share of the KD step: {loss_kd / t_kd:.1%})")
    cached = {}
    if args.cache_top_k:
        med = {name: statistics.median(t) for name, t in times.items()}
        cached = {"kd_top_k_s": med["kd top-k"], "kd_cached_s": med["kd cached"],
                  "cached_over_ce": med["kd cached"] / med["ce"],
                  "cached_over_live_top_k": med["kd cached"] / med["kd top-k"],
                  "cached_over_live_top_k_ideal": 1 / ideal}
        print(f"median: live top-{args.cache_top_k} KD step {med['kd top-k']:.3f} s | cached "
              f"{med['kd cached']:.3f} s = {cached['cached_over_ce']:.3f} CE steps (ideal 1) = "
              f"{cached['cached_over_live_top_k']:.3f} live top-k steps (ideal {1 / ideal:.3f})")
    print(json.dumps({"teacher_parameters": n_t, "student_parameters": n_s,
                      "flop_ideal_ratio": ideal, "kd_step_s": t_kd, "ce_step_s": t_ce,
                      "ratio": t_kd / t_ce, "ratio_over_ideal": t_kd / t_ce / ideal,
                      "min_ratio_over_ideal": min(kd_times) / min(ce_times) / ideal,
                      "goal": 1.05, **cached}))


if __name__ == "__main__":
    main()
