"""Mechanism study: what carries SmolLM2's first position, and what pruning does to it.

On the teacher (one process, TP=1) and on the same width target pruned with the paper's slicing
and with the position-0 fold, for held-out windows whose first token is left as sampled or
replaced by ``,`` / ``.`` / end-of-document:

1. the **massive activation**: the residual-stream value of the largest hidden channel at
   position 0 after every layer (and the largest value at any other position);
2. the **attention sink**: the attention mass every layer puts on key 0 (queries ≥ 8, all heads);
3. why the scores cannot see it: each early layer's per-head output norm at position 0 versus its
   mean over the other positions (the ``seq = mean`` aggregation), and the heads the paper's
   plan drops; the same for the MLP neurons of the first three layers (their rank by the
   paper's score, kept or not), and the massive channel's rank among the hidden channels;
4. where it breaks: heads pruned (masked) in one range of layers at a time, and the spread of the
   loss by window start.

Writes ``results.json`` and three figures to ``--output-dir``::

    python benchmarks/first_token.py --load runs/teacher --data-path runs/data/wiki \\
        --scores runs/robust/scores-default.safetensors --output-dir benchmarks/first_token_run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TARGET = {"hidden_size": 448, "ffn_hidden_size": 768, "num_attention_heads": 6}
RANGES = {"0-2": range(0, 3), "3-11": range(3, 12), "12-29": range(12, 30), "0": [0], "1": [1],
          "2": [2]}


class Probe:
    """Hooks that keep only small reductions: the massive channel's value per position (or, at
    layer ``mid``, |x| at position 0 over every channel), the attention mass on key 0, and the
    per-head output norms of the first three layers."""

    def __init__(self, model, channel: int | None = None, mid: int | None = None):
        self.model, self.handles, self.out = model, [], {}
        self.channel, self.mid = channel, mid
        for layer in model.decoder.layers:
            i = layer.layer_number - 1
            attn = layer.self_attention
            self.handles += [
                layer.register_forward_hook(lambda m, a, o, i=i: self._x(i, o[0])),
                attn.core_attention.attention_dropout.register_forward_pre_hook(
                    lambda m, a, i=i: self._put(("sink", i), a[0][:, :, 8:, 0].mean((1, 2)))),
            ]
            if i < 3:
                d = model.config.kv_channels
                self.handles.append(attn.linear_proj.register_forward_pre_hook(
                    lambda m, a, i=i, d=d: self._put(("o", i), a[0].view(
                        a[0].shape[0], a[0].shape[1], -1, d).norm(dim=-1))))  # [s, b, H]
                self.handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(
                    lambda m, a, i=i: self._neurons(i, a[0])))  # [s, b, F]

    def _x(self, i, x):  # x [s, b, h]
        if self.channel is not None:
            self._put(("x", i), x[:, :, self.channel])  # [s, b]
        if i == self.mid:
            self._put(("x0", i), x[0].abs())  # [b, h]

    def _neurons(self, i, a):  # a [s, b, F]: |activation| at position 0, mean over the rest
        self._put(("f0", i), a[0].abs())  # [b, F]
        self._put(("fm", i), a[1:].abs().mean(0))  # [b, F]

    def _put(self, key, value):
        self.out.setdefault(key, []).append(value.detach().float().clone())

    def run(self, ps, tokens):
        from minitron_megatron.model.forward import full_logits

        self.out = {}
        full_logits(self.model, ps, tokens, 4)
        return {k: torch.cat(v, dim=1 if k[0] in ("x", "o") else 0) for k, v in self.out.items()}

    def close(self):
        for h in self.handles:
            h.remove()


def variants(tokens, firsts):
    out = {"as_sampled": tokens}
    for name, token in firsts.items():
        t = tokens.clone()
        t[:, 0] = token
        out[f"{name}_first"] = t
    return out


def trace(model, ps, tokens_by_variant, channel: int, layers: int):
    """Per variant: |x[0, channel]| per layer (mean over windows), sink mass per layer."""
    probe = Probe(model, channel=channel)
    out = {}
    for name, tokens in tokens_by_variant.items():
        got = probe.run(ps, tokens)
        out[name] = {
            "massive_pos0": [got[("x", i)][0].abs().mean().item() for i in range(layers)],
            "massive_elsewhere_max": [got[("x", i)][1:].abs().max().item()
                                      for i in range(layers)],
            "sink": [got[("sink", i)].mean().item() for i in range(layers)],
        }
    probe.close()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", default="runs/teacher")
    p.add_argument("--data-path", default="runs/data/wiki")
    p.add_argument("--scores", required=True, help="default-settings scores of the teacher")
    p.add_argument("--windows", type=int, default=16, help="held-out windows traced")
    p.add_argument("--eval-samples", type=int, default=24, help="windows of the spread table")
    p.add_argument("--output-dir", default="benchmarks/first_token_run")
    args = p.parse_args(argv)

    from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.data.loaders import DataConfig, build_datasets
    from minitron_megatron.data.tokenizer import Tokenizer
    from minitron_megatron.evaluate import WindowStarts, evaluate_model, first_token_ids
    from minitron_megatron.importance import Scores
    from minitron_megatron.model.build import build_model
    from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = find_checkpoint(args.load)
    cfg, seq = info.model_config, 256
    firsts = first_token_ids(Tokenizer.load(info.tokenizer_dir))
    scores = Scores.load(args.scores)
    n_valid = max(args.windows, args.eval_samples)
    result: dict = {"windows": args.windows, "eval_samples": args.eval_samples}

    def save():  # after every stage, so a stopped run keeps what it measured
        (out_dir / "mechanism.json").write_text(json.dumps(result, indent=1))
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        valid = build_datasets(DataConfig(data_path=args.data_path, seq_length=seq),
                               eod_id=firsts["eos"], vocab_size=cfg.vocab_size,
                               num_samples={"valid": n_valid})["valid"]
        teacher = build_model(cfg, ps, init_weights=False)
        load_checkpoint(info, model=teacher)
        tokens = torch.stack([valid[i]["tokens"] for i in range(args.windows)])
        by_variant = variants(tokens, firsts)

        # the massive channel: largest |x| at position 0 after the middle layer
        probe = Probe(teacher, mid=cfg.num_layers // 2)
        mid = probe.run(ps, tokens)[("x0", cfg.num_layers // 2)]  # [b, h]: |x| at position 0
        probe.close()
        channel = int(mid.mean(0).argmax())
        result["massive_channel"] = channel
        top = mid.mean(0).topk(6)
        result["mid_layer_pos0_top_channels"] = {
            "layer": cfg.num_layers // 2, "channels": top.indices.tolist(),
            "abs_pos0": top.values.tolist(), "median_abs_pos0": mid.mean(0).median().item()}
        hidden = scores.hidden
        paper_hidden = make_plan(scores, PruneTargets(**TARGET, position0_fold=False)).hidden
        result["massive_channel_score_rank"] = int((hidden > hidden[channel]).sum())
        result["massive_channel_kept"] = channel in paper_hidden
        save()
        result["teacher"] = trace(teacher, ps, by_variant, channel, cfg.num_layers)
        save()

        # head outputs at position 0 vs elsewhere (layers 0-2) and the paper plan's choice
        probe = Probe(teacher)
        got = probe.run(ps, tokens)
        probe.close()
        d = cfg.kv_channels
        paper = make_plan(scores, PruneTargets(**TARGET, position0_fold=False))
        result["heads"], result["neurons"] = {}, {}
        for i in range(3):
            norms = got[("o", i)]  # [s, b, H]
            result["heads"][i] = {"pos0": norms[0].mean(0).tolist(),
                                  "mean_elsewhere": norms[1:].mean((0, 1)).tolist(),
                                  "score": scores.heads[i].tolist(),
                                  "dropped": [j for j in range(cfg.num_attention_heads)
                                              if j not in paper.layers[i].heads]}
            # the MLP neurons with the largest activation at position 0: their activation
            # elsewhere, their rank by the paper's (l2, mean) score, and whether it keeps them
            f0, fm = got[("f0", i)].mean(0), got[("fm", i)].mean(0)  # [F]
            rank = scores.ffn[i].argsort(descending=True).argsort()
            kept = set(paper.layers[i].ffn)
            idx = f0.topk(8).indices.tolist()
            result["neurons"][i] = {
                "top_pos0": idx, "pos0": [f0[j].item() for j in idx],
                "mean_elsewhere": [fm[j].item() for j in idx],
                "score_rank": [int(rank[j]) for j in idx], "kept": [j in kept for j in idx],
                "ffn": cfg.ffn_hidden_size, "kept_count": len(kept),
                "median_pos0": f0.median().item(), "median_elsewhere": fm.median().item()}
        save()

        for fold in (False, True):
            plan = make_plan(scores, PruneTargets(**TARGET, position0_fold=fold))
            pruned, _ = apply_plan(teacher, plan, ps)
            kept = plan.hidden.index(channel) if channel in plan.hidden else None
            name = "pruned_fold" if fold else "pruned_paper"
            result[name] = trace(pruned, ps, by_variant, kept, cfg.num_layers) if kept is not \
                None else "massive channel pruned"
            del pruned
        save()

        # where it breaks: heads dropped by the paper's plan, masked in one range of layers
        starts = WindowStarts(first_tokens=firsts)
        heads_only = make_plan(scores, PruneTargets(num_attention_heads=6, position0_fold=False))
        saved = {i: layer.self_attention.linear_proj.weight.detach().clone()
                 for i, layer in enumerate(teacher.decoder.layers)}
        result["spread_by_range"] = {}
        for name, layers in {"none": [], **RANGES}.items():
            with torch.no_grad():
                for i, layer in enumerate(teacher.decoder.layers):
                    w = layer.self_attention.linear_proj.weight
                    w.copy_(saved[i])
                    if i in layers:
                        for j in range(cfg.num_attention_heads):
                            if j not in heads_only.layers[i].heads:
                                w[:, j * d:(j + 1) * d] = 0
            r = evaluate_model(teacher, ps, valid, num_samples=args.eval_samples,
                               micro_batch_size=4, seq_length=seq, window_starts=starts)
            result["spread_by_range"][name] = r.window_starts
            print(name, json.dumps(r.window_starts), flush=True)
            save()
    plot(result, out_dir)
    (out_dir / "mechanism.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


def markdown(r: dict) -> str:
    """The tables of ``RESULTS_pruning.md`` from ``mechanism.json``."""
    def get(d, i):
        return d[str(i)] if str(i) in d else d[i]

    c, mid = r["massive_channel"], r["mid_layer_pos0_top_channels"]
    out = [f"Massive channel: **{c}** — |x| at position 0 after layer {mid['layer']}: "
           + ", ".join(f"ch {ch} {v:.0f}" for ch, v in zip(mid["channels"], mid["abs_pos0"]))
           + f" (median channel {mid['median_abs_pos0']:.1f}); its hidden-score rank "
           f"{r['massive_channel_score_rank']} (0 = highest), kept by the paper's plan: "
           f"{r['massive_channel_kept']}.", ""]
    layers = len(r["teacher"]["as_sampled"]["sink"])
    show = sorted({0, 1, 2, 3, 5, layers // 2, layers - 1})
    out += ["| model, first token | " + " | ".join(f"L{i}" for i in show)
            + " | max elsewhere (L" + str(layers // 2) + ") | sink, mean L3..L" + str(layers - 1)
            + " |", "|---|" + "---:|" * (len(show) + 2)]
    for model in ("teacher", "pruned_paper", "pruned_fold"):
        if not isinstance(r.get(model), dict):
            out.append(f"| {model} | {r.get(model)} |")
            continue
        for variant, v in r[model].items():
            sink = sum(v["sink"][3:]) / len(v["sink"][3:])
            out.append(f"| {model}, {variant} | " + " | ".join(
                f"{v['massive_pos0'][i]:.0f}" for i in show)
                + f" | {v['massive_elsewhere_max'][layers // 2]:.1f} | {sink:.3f} |")
    out += ["", "| layer | head | ‖o‖ at position 0 | mean ‖o‖ elsewhere | score | dropped "
            "by the paper |", "|---|---:|---:|---:|---:|---|"]
    for i in range(3):
        h = get(r["heads"], i)
        for j in range(len(h["pos0"])):
            out.append(f"| {i} | {j} | {h['pos0'][j]:.3f} | {h['mean_elsewhere'][j]:.3f} | "
                       f"{h['score'][j]:.2f} | {'yes' if j in h['dropped'] else ''} |")
    out += ["", "| layer | neuron | abs(a) at position 0 | mean abs(a) elsewhere "
            "| score rank (of F) | kept by the paper |", "|---|---:|---:|---:|---:|---|"]
    for i in range(3):
        n = get(r["neurons"], i)
        for k, j in enumerate(n["top_pos0"][:4]):
            out.append(f"| {i} | {j} | {n['pos0'][k]:.2f} | {n['mean_elsewhere'][k]:.3f} | "
                       f"{n['score_rank'][k]} of {n['ffn']} | {'yes' if n['kept'][k] else 'no'} |")
    out += ["", "| heads masked (the paper's choice, no other change) | as sampled | `,` | `.` "
            "| EOS | spread |", "|---|---:|---:|---:|---:|---:|"]
    for name, w in r.get("spread_by_range", {}).items():
        out.append(f"| layers {name} | {w['as_sampled']:.3f} | {w['comma_first']:.3f} | "
                   f"{w['period_first']:.3f} | {w['eos_first']:.3f} | {w['spread']:.3f} |")
    return "\n".join(out) + "\n"


def plot(r: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"teacher": "-", "pruned_paper": "--", "pruned_fold": ":"}
    colors = {"as_sampled": "C0", "comma_first": "C1", "period_first": "C2", "eos_first": "C3"}
    for key, ylabel, fname, log in (
            ("massive_pos0", f"|x| of channel {r['massive_channel']} at position 0",
             "massive_activation.png", True),
            ("sink", "attention on position 0 (queries ≥ 8, mean over heads)",
             "attention_sink.png", False)):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for model, style in styles.items():
            if not isinstance(r.get(model), dict):
                continue
            for variant, color in colors.items():
                ax.plot(r[model][variant][key], style, color=color,
                        label=f"{model}, {variant}")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=3)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5), sharey=False)
    for i, ax in enumerate(axes):
        h = r["heads"][str(i)] if str(i) in r["heads"] else r["heads"][i]
        x = torch.arange(len(h["pos0"]))
        ax.bar(x - 0.2, h["pos0"], 0.4, label="‖o_j‖ at position 0")
        ax.bar(x + 0.2, h["mean_elsewhere"], 0.4, label="mean over positions ≥ 1")
        for j in h["dropped"]:
            ax.annotate("×", (j, 0), ha="center", va="bottom", color="red", fontsize=14)
        ax.set_title(f"layer {i} (× = dropped by the paper's plan)", fontsize=9)
        ax.set_xlabel("query head")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "head_outputs.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
