"""Tables, verdicts and plots of the claims study (``benchmarks/claims.py``), from its
``results.json``: ``python -m benchmarks.claims_report runs/claims`` rewrites ``claims.md`` and
the PNGs without re-running anything.

Verdicts compare held-out losses on the same samples: the difference of two models' mean loss is
significant when it exceeds the **margin**, ``max(2 × paired standard error, 0.01 nats)``, where
the standard error comes from the per-sample loss differences (the samples are the same for both
models, so sample difficulty cancels). Seed-to-seed variance of training is not measured (one run
per setting), so a difference near the margin is weak evidence.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

MIN_MARGIN = 0.01
"""Smallest difference (nats) ever called significant."""

PLOTS = {"C1": "claim_c1_retraining.png", "C3": "claim_c3_width_vs_depth.png",
         "C5": "claim_c5_aggregation.png", "C7": "claim_c7_logit_loss.png"}


def mean_loss(sums) -> float:
    t = torch.as_tensor(sums, dtype=torch.float64)  # [N, 2]: loss sum, tokens
    return float(t[:, 0].sum() / t[:, 1].sum())


def paired(a, b) -> tuple[float, float]:
    """(mean loss of a − mean loss of b, its standard error) over the same held-out samples."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if not torch.equal(a[:, 1], b[:, 1]):
        raise ValueError("paired losses must cover the same held-out tokens.")
    tokens = a[:, 1].sum()
    delta = a[:, 0] - b[:, 0]  # [N] per-sample loss-sum difference
    se = math.sqrt(len(delta)) * float(delta.std()) / float(tokens) if len(delta) > 1 else 0.0
    return float(delta.sum() / tokens), se


def margin(se: float) -> float:
    return max(2.0 * se, MIN_MARGIN)


def better(a, b) -> str:
    """``"yes"`` if a's loss is lower than b's by more than the margin, ``"no"`` if higher by
    more than the margin, else ``"tie"``."""
    diff, se = paired(a, b)
    return "yes" if diff < -margin(se) else "no" if diff > margin(se) else "tie"


def fmt_delta(a, b) -> str:
    diff, se = paired(a, b)
    return f"{diff:+.3f} ± {margin(se):.3f}"


class Report:
    def __init__(self, results: dict, out: Path):
        self.r, self.out = results, Path(out)
        self.cfg = results["config"]
        self.runs = results["runs"]
        self.zero = results["zero_shot"]

    def final(self, run: str):
        return self.runs[run]["held_out"]

    def student_of(self, run: str) -> str:
        return self.runs[run]["student"]

    def params(self, student: str) -> str:
        return f"{self.r['students'][student]['parameters'] / 1e6:.1f}M"

    def have(self, *runs: str) -> bool:
        return all(r in self.runs for r in runs)

    # ------------------------------------------------------------------ claims
    def c1(self) -> list[str]:
        runs = ("width-kd", "width-ce", "scratch-ce")
        if not self.have(*runs):
            return ["(runs missing)"]
        kd, ce, scratch = (self.final(r) for r in runs)
        rows = self.table(runs, ref="width-kd", start=True)
        v1, v2 = better(kd, ce), better(ce, scratch)
        verdict = (f"**C1 (KD beats CE retraining): {self.word(v1)}** (KD − CE = "
                   f"{fmt_delta(kd, ce)}); **C2 (pruned + CE beats random init + CE): "
                   f"{self.word(v2)}** (CE − scratch = {fmt_delta(ce, scratch)}).")
        return rows + ["", verdict]

    def c3(self) -> list[str]:
        if not self.have("width-kd", "depth-kd"):
            return ["(runs missing)"]
        w, d = self.student_of("width-kd"), self.student_of("depth-kd")
        rows = ["| student | parameters | zero-shot loss | after KD | dropped layers |",
                "|---|---:|---:|---:|---|"]
        for run, s in (("width-kd", w), ("depth-kd", d)):
            dropped = self.r["students"][s].get("dropped_layers") or "–"
            rows.append(f"| {s} | {self.params(s)} | {mean_loss(self.zero[s]):.3f} | "
                        f"{mean_loss(self.final(run)):.3f} | {dropped} |")
        zs = better(self.zero[d], self.zero[w])
        after = better(self.final("width-kd"), self.final("depth-kd"))
        zs_text = {"yes": "depth is better zero-shot", "no": "width is better zero-shot",
                   "tie": "zero-shot they tie"}[zs]
        return rows + ["", f"Zero-shot: {zs_text} (depth − width = "
                           f"{fmt_delta(self.zero[d], self.zero[w])}). **C3 (width beats depth "
                           f"after retraining): {self.word(after)}** (width − depth = "
                           f"{fmt_delta(self.final('width-kd'), self.final('depth-kd'))})."]

    def c5(self) -> list[str]:
        runs = [r for r, v in self.runs.items() if "C5" in v["claims"]]
        if "width-kd" not in runs or len(runs) < 2:
            return ["(runs missing)"]
        ref_run = "width-kd"
        ref = self.student_of(ref_run)
        rows = ["| aggregation (batch, seq) | zero-shot loss | Δ zero-shot vs (l2,mean) | "
                "after KD | Δ after KD vs (l2,mean) |", "|---|---:|---:|---:|---:|"]
        for run in runs:
            s = self.student_of(run)
            zero_delta = fmt_delta(self.zero[s], self.zero[ref]) if s != ref else "–"
            kd_delta = fmt_delta(self.final(run), self.final(ref_run)) if run != ref_run else "–"
            rows.append(f"| {s.removeprefix('width ')} | {mean_loss(self.zero[s]):.3f} | "
                        f"{zero_delta} | {mean_loss(self.final(run)):.3f} | {kd_delta} |")
        others = [r for r in runs if r != ref_run]
        zero = [better(self.zero[ref], self.zero[self.student_of(r)]) for r in others]
        after = [better(self.final(ref_run), self.final(r)) for r in others]
        return rows + ["", f"**C5 ((l2, mean) is the best aggregation) — zero-shot: "
                           f"{self.word(self.combine(zero))}; after KD: "
                           f"{self.word(self.combine(after))}.**"]

    def c7(self) -> list[str]:
        runs = ("width-kd", "width-rkl", "width-kl-ce")
        if not self.have(*runs):
            return ["(runs missing)"]
        rows = self.table(runs, ref="width-kd", start=False)
        vs = [better(self.final("width-kd"), self.final(r)) for r in runs[1:]]
        return rows + ["", f"**C7 (forward KL on the logits alone is the best logit loss): "
                           f"{self.word(self.combine(vs))}** (vs reverse KL: {self.word(vs[0])},"
                           f" vs KL+CE: {self.word(vs[1])})."]

    @staticmethod
    def combine(words: list[str]) -> str:
        return "no" if "no" in words else "tie" if "tie" in words else "yes"

    @staticmethod
    def word(v: str) -> str:
        return {"yes": "held", "no": "did not hold",
                "tie": "inconclusive (within the margin)"}[v]

    def table(self, runs, *, ref: str, start: bool) -> list[str]:
        head = "| run | student | objective | parameters |"
        head += " held-out loss at start |" if start else ""
        head += f" after {self.cfg['train_iters']} steps | Δ vs {ref} |"
        rows = [head, "|" + "---|" * 3 + "---:|" * (head.count("|") - 4)]
        for run in runs:
            s = self.student_of(run)
            row = f"| {run} | {s} | {self.runs[run]['objective']} | {self.params(s)} |"
            row += f" {mean_loss(self.zero[s]):.3f} |" if start else ""
            delta = fmt_delta(self.final(run), self.final(ref)) if run != ref else "–"
            row += f" {mean_loss(self.final(run)):.3f} | {delta} |"
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ plots
    def plot(self, claim: str, runs, title: str) -> str | None:
        runs = [r for r in runs if r in self.runs]
        if not runs:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        n = self.cfg["curve_samples"]
        for run in runs:
            hist = self.runs[run]["history"]
            evals = [(h["iteration"], h["val_loss"]) for h in hist if "val_loss" in h]
            steps = [(h["iteration"], h["ce_loss"]) for h in hist if "ce_loss" in h]
            label = f"{run} ({self.runs[run]['objective']})"
            (line,) = left.plot(*zip(*evals), marker="o", label=label)
            window = max(1, len(steps) // 8)
            smooth = [sum(c for _, c in steps[max(0, i - window + 1):i + 1])
                      / len(steps[max(0, i - window + 1):i + 1]) for i in range(len(steps))]
            right.plot([i for i, _ in steps], smooth, color=line.get_color(), label=label)
        if "teacher" in self.zero:
            teacher = mean_loss(self.zero["teacher"][:n])
            left.axhline(teacher, color="gray", linestyle="--", label="teacher")
            right.axhline(mean_loss(self.zero["teacher"]), color="gray", linestyle="--")
        left.set_title(f"held-out loss (first {n} validation samples)")
        right.set_title("CE on each new training batch (moving avg.)")
        for ax in (left, right):
            ax.set_xlabel("training step")
            ax.set_ylabel("loss (nats/token)")
        left.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        name = PLOTS[claim]
        fig.savefig(self.out / name, dpi=80)
        plt.close(fig)
        return name

    # ------------------------------------------------------------------ whole report
    def markdown(self) -> str:
        c = self.cfg
        tokens = c["train_iters"] * c["global_batch_size"] * c["seq_length"]
        lines = [
            "# Minitron claims at small scale: SmolLM2-135M → ~half size, Wikipedia, CPU", "",
            f"Every run: {c['train_iters']} steps × {c['global_batch_size']} samples × "
            f"{c['seq_length']} tokens = **{tokens:,} tokens**, the same samples in the same "
            f"order, Adam, LR {c['lr']:g} (warmup {c['warmup_iters']}, cosine to "
            f"{c['lr'] / 10:g}), clip 1.0, fp32, one rank. Held-out set: the first "
            f"{c['eval_samples']} validation samples ({c['eval_samples'] * c['seq_length']:,} "
            f"tokens) for every zero-shot and final loss; curves evaluate its first "
            f"{c['curve_samples']} samples. Importance: {c['calib_samples']} calibration "
            f"samples (depth metric: {c['depth_calib_samples']}). Margin: "
            f"max(2 × paired SE, {MIN_MARGIN}) nats; Δ columns show difference ± margin.", "",
        ]
        if "teacher" in self.zero:
            lines += [f"Teacher (134.5M) held-out loss: {mean_loss(self.zero['teacher']):.3f}.",
                      ""]
        sections = (
            ("C1", "C1 + C2 — pruned + KD vs pruned + CE vs random init + CE (Table 14)",
             self.c1, ("width-kd", "width-ce", "scratch-ce")),
            ("C3", "C3 — width vs depth pruning at about equal size (Table 13, Fig. 6)",
             self.c3, ("width-kd", "depth-kd")),
            ("C5", "C5 — importance aggregation over batch and sequence (Table 11)", self.c5,
             [r for r, v in self.runs.items() if "C5" in v["claims"]]),
            ("C7", "C7 — logit loss: forward KL vs reverse KL vs KL + CE (Tables 15–16)",
             self.c7, ("width-kd", "width-rkl", "width-kl-ce")),
        )
        for claim, title, body, runs in sections:
            lines += [f"## {title}", "", *body(), ""]
            name = self.plot(claim, runs, title.split(" (")[0])
            if name:
                lines += [f"![{claim}]({name})", ""]
        lines += self.checks() + self.timings()
        return "\n".join(lines)

    def checks(self) -> list[str]:
        """In-run final evaluation vs the reloaded checkpoint on the same samples."""
        n, worst = self.cfg["curve_samples"], 0.0
        for run in self.runs.values():
            last = [h["val_loss"] for h in run["history"] if "val_loss" in h][-1]
            worst = max(worst, abs(last - mean_loss(run["held_out"][:n])))
        shared = ("`width-kd` is the C1 KD run, the C3 width run, the C5 (l2,mean) run and the "
                  "C7 forward-KL run (trained once).")
        return ["## Notes", "", f"* Runs shared between claims: {shared}",
                f"* Check: the in-run evaluation at the last step and the saved checkpoint "
                f"reloaded and evaluated on the same {n} samples differ by at most "
                f"{worst:.1e} nats.", ""]

    def timings(self) -> list[str]:
        t = self.r["timings"]
        rows = ["## Cost", "", "| stage | wall (s) | process CPU (s) | load avg (1 min) |",
                "|---|---:|---:|---:|"]
        rows += [f"| {k} | {v['wall_s']} | {v['cpu_s']} | {v['load1']} |" for k, v in t.items()]
        steps = [h["step_time"] for run in self.runs.values() for h in run["history"]
                 if "step_time" in h]
        fastest = sum(self.cfg["train_iters"] * min(h["step_time"] for h in run["history"]
                                                    if "step_time" in h)
                      for run in self.runs.values())
        wall = self.r.get("wall_s", sum(v["wall_s"] for v in t.values()))
        loads = [v["load1"] for v in t.values()]
        machine = self.r.get("machine", {})
        return rows + ["", f"Total wall time {wall / 60:.1f} min on {machine.get('cpus', '?')} "
                           f"cores ({machine.get('torch_threads', '?')} torch threads), 1-min "
                           f"load average {min(loads):.1f}–{max(loads):.1f} (mean "
                           f"{sum(loads) / len(loads):.1f}) at the ends of the stages; training "
                           f"steps {sum(steps) / 60:.1f} min as measured, {fastest / 60:.1f} min "
                           f"if every step of a run took that run's fastest step time.", ""]


def write_report(results: dict, out: Path) -> str:
    text = Report(results, out).markdown()
    (Path(out) / "claims.md").write_text(text)
    return text


if __name__ == "__main__":
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/claims")
    print(write_report(json.loads((directory / "results.json").read_text()), directory))
