"""Peak extra memory of a KD loss (forward + backward) above the logits, in copies of the logits.

For each loss, student logits (carrying grad) and teacher logits of ``tokens × vocab`` fp32 are
allocated first; then the loss forward and the backward down to the gradient of the student logits
run while allocations are tracked (CUDA: the caching allocator's peak; CPU: every allocation and
free recorded by the PyTorch profiler). Measured side by side in one run:

* ours: ``minitron_megatron.distill.kd_loss.vocab_parallel_kd_loss`` (goal ≤ 1.0 copy);
* naive: ``log_softmax`` of both, ``kl_div``, autograd;
* ModelOpt's ``LogitsKLLoss`` (nvidia-modelopt 0.43.0), when it is installed.

    python benchmarks/kd_loss_memory.py [--tokens 2048] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch
import torch.nn.functional as F

from minitron_megatron.distill.kd_loss import vocab_parallel_kd_loss


def ours(student, teacher, temperature):
    kd, _ = vocab_parallel_kd_loss(student, teacher, temperature=temperature)
    return kd.mean()


def naive(student, teacher, temperature):
    logp = F.log_softmax(student / temperature, dim=-1)
    logq = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)
    return (kl * temperature**2).mean()


def modelopt_loss():
    """ModelOpt's Megatron-plugin logits KL at TP=1, or None when it is not installed."""
    try:
        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss
    except Exception:  # noqa: BLE001 - optional peer, any import failure means "not measured"
        return None
    config = types.SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False)

    def loss(student, teacher, temperature):
        kl, _, _ = LogitsKLLoss(config, temperature=temperature)(student, teacher)
        return kl.mean()

    return loss


def _cpu_peak(fn) -> int:
    """Peak of (allocated − freed) bytes while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure(loss_fn, tokens: int, vocab: int, temperature: float, device) -> tuple[float, float]:
    """(peak extra bytes, seconds) of forward + backward to the student logits' gradient."""
    teacher = torch.randn(tokens, 1, vocab, device=device)
    base = torch.randn(tokens, 1, vocab, device=device, requires_grad=True)
    student = base.clone()  # non-leaf logits, as a model's output layer gives them

    def step():
        loss = loss_fn(student, teacher, temperature)
        grad = torch.autograd.grad(loss, student)[0]
        assert grad.shape == student.shape
        return grad

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _cpu_peak(step)
    return peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy = args.tokens * args.vocab * 4
    print(f"{args.tokens} tokens × {args.vocab} vocab fp32 on {device.type}: one copy of the "
          f"logits = {copy / 2**20:.0f} MiB; τ = {args.temperature}")
    losses = {"ours (vocab-parallel, in-place grad)": ours, "naive log_softmax KL": naive}
    peer = modelopt_loss()
    if peer is not None:
        losses["ModelOpt LogitsKLLoss"] = peer
    copies = {}
    for name, fn in losses.items():
        peak, seconds = measure(fn, args.tokens, args.vocab, args.temperature, device)
        copies[name] = peak / copy
        print(f"{name:40s} peak extra {peak / 2**20:8.0f} MiB = {peak / copy:5.2f} copies | "
              f"fwd+bwd {seconds:.2f} s")
    if peer is None:
        print("ModelOpt LogitsKLLoss: not installed (pip install nvidia-modelopt==0.43.0)")
    print("goal for ours: ≤ 1.0 copy")
    print(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "copies": copies,
                      "goal": 1.0}))


if __name__ == "__main__":
    main()
