"""Tables, verdicts and plots of the claims study (``benchmarks/claims.py``), from its
``results.json``: ``python -m benchmarks.claims_report runs/claims`` rewrites ``claims.md`` and
the PNGs without re-running anything.

Two models are compared on the same held-out windows: the difference of their mean losses counts
when it exceeds the **margin**, ``max(2 × paired standard error, 0.01 nats)``, the standard error
coming from the per-window loss differences (sample difficulty cancels). A claim decided by
seeded runs gets a verdict only when **every seed** is beyond the margin the same way; seeds that
disagree, or any seed within its margin, leave it inconclusive. Every comparison is made on both
window kinds (as sampled, and starting at a document's first token) and reported side by side.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.claims_config import WINDOW_KINDS

MIN_MARGIN = 0.01
"""Smallest difference (nats) ever called significant."""

PLOTS = {"C1": "claim_c1_retraining.png", "C3": "claim_c3_width_vs_depth.png",
         "C7": "claim_c7_logit_loss.png"}
KIND_TITLE = {"as_sampled": "as sampled", "doc_start": "document start"}


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


def combine(words: list[str]) -> str:
    """One verdict from repeats of one comparison (seeds, window kinds): only a unanimous one
    counts."""
    return words[0] if len(set(words)) == 1 else "tie"


def best_of(words: list[str]) -> str:
    """"a is the best": each of a's comparisons with the alternatives. One alternative clearly
    better refutes it; it holds only when a is clearly better than every one."""
    return "no" if "no" in words else "tie" if "tie" in words else "yes"


def word(v: str) -> str:
    return {"yes": "held", "no": "did not hold",
            "tie": "inconclusive (within the margin, or the seeds or window kinds disagree)"}[v]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


class Report:
    def __init__(self, results: dict, out: Path):
        self.r, self.out = results, Path(out)
        self.cfg = results["config"]
        self.runs = results["runs"]
        self.zero = results["zero_shot"]
        self.seeds = self.cfg["seeds"]

    def keys(self, name: str) -> list[str]:
        """The run's keys, one per seed it was trained with (seed order)."""
        return [f"{name}@{s}" for s in self.seeds if f"{name}@{s}" in self.runs]

    def final(self, key: str, kind: str):
        return self.runs[key]["held_out"][kind]

    def params(self, student: str) -> str:
        return f"{self.r['students'][student]['parameters'] / 1e6:.1f}M"

    def have(self, *names: str) -> bool:
        return all(self.keys(n) for n in names)

    # ------------------------------------------------------------------ building blocks
    def losses_table(self, names, *, start: bool) -> list[str]:
        """Per run: zero-shot (optional) and final loss on each window kind, mean ± std over
        its seeds."""
        head = "| run | student | objective | seeds |"
        for kind in WINDOW_KINDS:
            head += f" zero-shot, {KIND_TITLE[kind]} |" if start else ""
            head += f" after {self.cfg['train_iters']} steps, {KIND_TITLE[kind]} |"
        rows = [head, "|---|---|---|---:|" + "---:|" * (head.count("|") - 5)]
        for name in names:
            keys = self.keys(name)
            run = self.runs[keys[0]]
            row = f"| {name} | {run['student']} ({self.params(run['student'])}) | " \
                  f"{run['objective']} | {len(keys)} |"
            for kind in WINDOW_KINDS:
                if start:
                    row += f" {mean_loss(self.zero[run['student']][kind]):.3f} |"
                row += f" {mean_std([mean_loss(self.final(k, kind)) for k in keys])} |"
            rows.append(row)
        return rows

    def seed_pairs(self, a: str, b: str, label: str) -> tuple[list[str], dict[str, str]]:
        """Per-seed paired differences ``a − b`` on each kind, and the verdict per kind that
        ``a`` is better."""
        seeds = [s for s in self.seeds if f"{a}@{s}" in self.runs and f"{b}@{s}" in self.runs]
        rows = ["| seed | " + " | ".join(f"{label}, {KIND_TITLE[k]}" for k in WINDOW_KINDS)
                + " |", "|---:|" + "---:|" * len(WINDOW_KINDS)]
        words: dict[str, list[str]] = {k: [] for k in WINDOW_KINDS}
        for s in seeds:
            cells = []
            for kind in WINDOW_KINDS:
                x, y = self.final(f"{a}@{s}", kind), self.final(f"{b}@{s}", kind)
                cells.append(fmt_delta(x, y))
                words[kind].append(better(x, y))
            rows.append(f"| {s} | " + " | ".join(cells) + " |")
        return rows, {k: combine(v) for k, v in words.items()}

    @staticmethod
    def delta_table(what: str, rows: list[tuple[str, dict]], *, ref: int) -> list[str]:
        """One row per (label, losses by window kind): each kind's loss and its difference
        from row ``ref``'s."""
        base = rows[ref][1]
        out = [f"| {what} | " + " | ".join(f"{KIND_TITLE[k]} | Δ vs {rows[ref][0]}"
                                          for k in WINDOW_KINDS) + " |",
               "|---|" + "---:|---:|" * len(WINDOW_KINDS)]
        for i, (label, losses) in enumerate(rows):
            cells = [f"{mean_loss(losses[k]):.3f} | "
                     + (fmt_delta(losses[k], base[k]) if i != ref else "–") for k in WINDOW_KINDS]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        return out

    @staticmethod
    def verdict_line(claim: str, verdicts: dict[str, str]) -> str:
        kinds = "; ".join(f"{KIND_TITLE[k]}: {word(v)}" for k, v in verdicts.items())
        overall = combine(list(verdicts.values()))
        return f"**{claim}: {word(overall)}** ({kinds})."

    # ------------------------------------------------------------------ claims
    def c1(self) -> list[str]:
        if not self.have("width-kd", "width-ce", "scratch-ce"):
            return ["(runs missing)"]
        rows = self.losses_table(("width-kd", "width-ce", "scratch-ce"), start=True)
        pairs, v1 = self.seed_pairs("width-kd", "width-ce", "KD − CE")
        first = self.seeds[0]
        ce, scratch = f"width-ce@{first}", f"scratch-ce@{first}"
        c2 = {k: better(self.final(ce, k), self.final(scratch, k)) for k in WINDOW_KINDS}
        c2_deltas = ", ".join(
            f"{KIND_TITLE[k]} {fmt_delta(self.final(ce, k), self.final(scratch, k))}"
            for k in WINDOW_KINDS)
        return rows + ["", *pairs, "",
                       self.verdict_line("C1 (KD beats CE retraining, every seed)", v1), "",
                       self.verdict_line("C2 (pruned + CE beats random init + CE, first seed)",
                                         c2) + f" CE − scratch: {c2_deltas}."]

    def c3(self) -> list[str]:
        if not self.have("width-kd", "depth-kd"):
            return ["(runs missing)"]
        w = self.runs[self.keys("width-kd")[0]]["student"]
        d = self.runs[self.keys("depth-kd")[0]]["student"]
        rows = self.losses_table(("width-kd", "depth-kd"), start=True)
        dropped = self.r["students"][d].get("dropped_layers")
        zs = {k: better(self.zero[d][k], self.zero[w][k]) for k in WINDOW_KINDS}
        zs_text = "; ".join(
            f"{KIND_TITLE[k]}: " + {"yes": "depth better", "no": "width better",
                                    "tie": "tie"}[v]
            + f" (depth − width {fmt_delta(self.zero[d][k], self.zero[w][k])})"
            for k, v in zs.items())
        pairs, after = self.seed_pairs("width-kd", "depth-kd", "width − depth")
        return rows + ["", f"Depth student drops layers {dropped}. Zero-shot: {zs_text}.", "",
                       *pairs, "", self.verdict_line(
                           "C3 (width beats depth after retraining, every seed)", after)]

    def c5(self) -> list[str]:
        aggs = [s for s in self.zero if s.startswith("width (")]
        ref = next((s for s in aggs if s == "width (l2,mean)"), None)
        if ref is None or len(aggs) < 2:
            return ["(students missing)"]
        rows = self.delta_table("aggregation (batch, seq): zero-shot loss",
                                [(s.removeprefix("width "), self.zero[s]) for s in aggs],
                                ref=aggs.index(ref))
        verdicts = {k: best_of([better(self.zero[ref][k], self.zero[s][k])
                                for s in aggs if s != ref]) for k in WINDOW_KINDS}
        return rows + ["", self.verdict_line(
            "C5 ((l2, mean) is the best aggregation, zero-shot)", verdicts)]

    def c7(self) -> list[str]:
        first = self.seeds[0]
        keys = [f"{n}@{first}" for n in ("width-kd", "width-rkl", "width-kl-ce")]
        if not all(k in self.runs for k in keys):
            return ["(runs missing)"]
        rows = self.delta_table(
            "run (objective)", [(f"{k} ({self.runs[k]['objective']})", self.runs[k]["held_out"])
                                for k in keys], ref=0)
        verdicts = {k: best_of([better(self.final(keys[0], k), self.final(o, k))
                                for o in keys[1:]]) for k in WINDOW_KINDS}
        return rows + ["", self.verdict_line(
            "C7 (forward KL on the logits alone is the best logit loss, first seed)", verdicts)]

    # ------------------------------------------------------------------ plots
    def plot(self, claim: str, names, title: str) -> str | None:
        keys = [k for n in names for k in self.keys(n)]
        if not keys:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(WINDOW_KINDS), figsize=(11, 4), sharey=True)
        colors = {n: f"C{i}" for i, n in enumerate(names)}
        n = self.cfg["curve_samples"]
        for ax, kind in zip(axes, WINDOW_KINDS):
            for key in keys:
                name = key.split("@")[0]
                curve = self.runs[key]["curve"]
                first = key.endswith(f"@{self.seeds[0]}")
                ax.plot([p["iteration"] for p in curve], [p[kind] for p in curve],
                        color=colors[name], marker="o", alpha=1.0 if first else 0.45,
                        label=f"{name} ({self.runs[key]['objective']})" if first else None)
            if "teacher" in self.zero:
                ax.axhline(mean_loss(self.zero["teacher"][kind][:n]), color="gray",
                           linestyle="--", label="teacher")
            ax.set_title(f"held-out, {KIND_TITLE[kind]} (first {n} windows)")
            ax.set_xlabel("training step")
        axes[0].set_ylabel("loss (nats/token)")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title} (one line per seed)")
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
            f"{c['seq_length']} tokens = **{tokens:,} tokens**, Adam, LR {c['lr']:g} (warmup "
            f"{c['warmup_iters']}, cosine to {c['lr'] / 10:g}), clip 1.0, fp32, one rank. Seeds "
            f"(training-data order) {', '.join(map(str, self.seeds))} for the runs that decide "
            f"C1 and C3; the others use the first. Held-out windows, the same for every loss: "
            f"**as sampled** = the first {c['eval_samples']} validation samples, **document "
            f"start** = {c['doc_start_samples']} validation windows each starting at a "
            f"document's first token; curves use the first {c['curve_samples']} of each. "
            f"Importance: {c['calib_samples']} calibration samples (depth metric: "
            f"{c['depth_calib_samples']}); width students pruned the library's default way "
            f"(position-0 fold, layers refit). Margin: max(2 × paired SE, {MIN_MARGIN}) nats; "
            f"Δ cells show difference ± margin; mean ± std is over seeds.", "",
        ]
        if "teacher" in self.zero:
            lines += ["Teacher (134.5M) held-out loss: " + ", ".join(
                f"{KIND_TITLE[k]} {mean_loss(self.zero['teacher'][k]):.3f}"
                for k in WINDOW_KINDS) + ".", ""]
        sections = (
            ("C1", "C1 + C2 — pruned + KD vs pruned + CE vs random init + CE (Table 14)",
             self.c1, ("width-kd", "width-ce", "scratch-ce")),
            ("C3", "C3 — width vs depth pruning at about equal size (Table 13, Fig. 6)",
             self.c3, ("width-kd", "depth-kd")),
            ("C5", "C5 — importance aggregation over batch and sequence (Table 11)", self.c5,
             ()),
            ("C7", "C7 — logit loss: forward KL vs reverse KL vs KL + CE (Tables 15–16)",
             self.c7, ("width-kd", "width-rkl", "width-kl-ce")),
        )
        for claim, title, body, names in sections:
            lines += [f"## {title}", "", *body(), ""]
            if claim in PLOTS:
                name = self.plot(claim, [n for n in names if self.keys(n)],
                                 title.split(" (")[0])
                if name:
                    lines += [f"![{claim}]({name})", ""]
        lines += self.checks() + self.timings()
        return "\n".join(lines)

    def checks(self) -> list[str]:
        """The last in-run curve point vs the reloaded checkpoint on the same windows."""
        n, worst = self.cfg["curve_samples"], 0.0
        for run in self.runs.values():
            last = run["curve"][-1]
            for kind in WINDOW_KINDS:
                worst = max(worst, abs(last[kind] - mean_loss(run["held_out"][kind][:n])))
        return ["## Notes", "",
                "* `width-kd@<first seed>` is the C1 KD run, the C3 width run and the C7 "
                "forward-KL run (trained once).",
                f"* Check: the in-run evaluation after the last step and the saved checkpoint "
                f"reloaded and evaluated on the same {n} windows of each kind differ by at most "
                f"{worst:.1e} nats.", ""]

    def timings(self) -> list[str]:
        t = self.r["timings"]
        rows = ["## Cost", "", "| stage | wall (s) | process CPU (s) | load avg (1 min) |",
                "|---|---:|---:|---:|"]
        rows += [f"| {k} | {v['wall_s']} | {v['cpu_s']} | {v['load1']} |" for k, v in t.items()]
        steps = [h["step_time"] for run in self.runs.values() for h in run["history"]
                 if "step_time" in h]
        wall = self.r.get("wall_s", sum(v["wall_s"] for v in t.values()))
        loads = [v["load1"] for v in t.values()]
        machine = self.r.get("machine", {})
        return rows + ["", f"Total wall time {wall / 60:.1f} min on {machine.get('cpus', '?')} "
                           f"cores ({machine.get('torch_threads', '?')} torch threads), 1-min "
                           f"load average {min(loads):.1f}–{max(loads):.1f} (mean "
                           f"{sum(loads) / len(loads):.1f}) at the ends of the stages; training "
                           f"steps {sum(steps) / 60:.1f} min.", ""]


def write_report(results: dict, out: Path) -> str:
    text = Report(results, out).markdown()
    (Path(out) / "claims.md").write_text(text)
    return text


if __name__ == "__main__":
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/claims")
    print(write_report(json.loads((directory / "results.json").read_text()), directory))
