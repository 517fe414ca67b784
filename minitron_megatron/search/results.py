"""``SearchResults``: what the search found so far, written after every candidate.

``search_results.json`` is the record a resumed search reads back (candidates whose losses are in
it are not redone); ``search_results.md`` is the same table for people. Both are replaced
atomically (temporary file + rename), so a search killed at any moment leaves a consistent file.

Ranks: ``rank`` orders the distilled candidates by their loss after the short distillation (the
search's answer); ``zero_shot_rank`` orders every candidate by its loss right after pruning.
Ties are broken by name, so every rank and every resume gives the same order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minitron_megatron.checkpoint import write_text_atomic
from minitron_megatron.errors import UserError
from minitron_megatron.search.config import RESULTS_JSON, RESULTS_MD
from minitron_megatron.search.space import AXES, Candidate, format_params

FORMAT = "minitron-search/1"


@dataclass
class CandidateResult:
    """One candidate's shape and what was measured on it."""

    name: str
    shape: dict[str, int]
    params: int
    zero_shot_loss: float | None = None
    """Held-out loss right after pruning (no training)."""

    zero_shot_seconds: float | None = None
    """Wall time of pruning it in memory and evaluating it."""

    post_kd_loss: float | None = None
    """Held-out loss (same samples) after the short distillation."""

    kd_seconds: float | None = None
    """Wall time of writing its pruned checkpoint, distilling and evaluating it."""

    checkpoint: str | None = None
    """Its distilled checkpoint, relative to the search directory, while it is kept."""


def _order(results: list[CandidateResult], key: str) -> list[CandidateResult]:
    done = [r for r in results if getattr(r, key) is not None]
    return sorted(done, key=lambda r: (getattr(r, key), r.name))


@dataclass
class SearchResults:
    settings: dict[str, Any]
    """Everything that decides the numbers (a resume must match it)."""

    teacher: dict[str, Any]
    """Teacher checkpoint, its shape and parameter count."""

    candidates: list[CandidateResult] = field(default_factory=list)
    """In enumeration order (closest to the parameter target first)."""

    @classmethod
    def new(cls, settings: dict[str, Any], teacher: dict[str, Any],
            candidates: list[Candidate]) -> SearchResults:
        return cls(settings=settings, teacher=teacher,
                   candidates=[CandidateResult(name=c.name, shape=c.shape(), params=c.params)
                               for c in candidates])

    @classmethod
    def load(cls, directory: Path) -> SearchResults | None:
        path = Path(directory) / RESULTS_JSON
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(settings=data["settings"], teacher=data["teacher"],
                       candidates=[CandidateResult(**{k: c[k] for k in CandidateResult.
                                                      __dataclass_fields__}) for c in
                                   data["candidates"]])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not a {FORMAT} results file ({err}); move it away or "
                            f"choose another --save directory.") from None

    # ------------------------------------------------------------------ queries
    def get(self, name: str) -> CandidateResult:
        return next(r for r in self.candidates if r.name == name)

    @property
    def top_k(self) -> int | None:
        return self.settings["search"]["top_k"]

    def selected(self) -> list[CandidateResult]:
        """The candidates to distill, best zero-shot loss first (every candidate needs its
        zero-shot loss first)."""
        order = _order(self.candidates, "zero_shot_loss")
        assert len(order) == len(self.candidates), "zero-shot losses missing"
        return order if self.top_k is None else order[:self.top_k]

    def ranking(self) -> list[CandidateResult]:
        """Distilled candidates, best (lowest post-KD loss) first."""
        return _order(self.candidates, "post_kd_loss")

    @property
    def best(self) -> CandidateResult | None:
        ranking = self.ranking()
        return ranking[0] if ranking else None

    @property
    def complete(self) -> bool:
        return (all(r.zero_shot_loss is not None for r in self.candidates)
                and all(r.post_kd_loss is not None for r in self.selected()))

    def ranking_agrees(self) -> bool | None:
        """Whether the distilled candidates come in the same order by zero-shot loss as by
        post-KD loss (``None`` before two are distilled)."""
        ranking = self.ranking()
        if len(ranking) < 2:
            return None
        by_zero_shot = sorted(ranking, key=lambda r: (r.zero_shot_loss, r.name))
        return [r.name for r in by_zero_shot] == [r.name for r in ranking]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        rank = {r.name: i + 1 for i, r in enumerate(self.ranking())}
        zero_rank = {r.name: i + 1 for i, r in enumerate(_order(self.candidates,
                                                                "zero_shot_loss"))}
        best = self.best
        return {
            "format": FORMAT, "complete": self.complete, "settings": self.settings,
            "teacher": self.teacher,
            "best": None if best is None else {"name": best.name, "checkpoint": best.checkpoint,
                                               "post_kd_loss": best.post_kd_loss},
            "ranking_agrees_with_zero_shot": self.ranking_agrees(),
            "candidates": [{**asdict(r), "rank": rank.get(r.name),
                            "zero_shot_rank": zero_rank.get(r.name)} for r in self.candidates],
        }

    def save(self, directory: Path) -> None:
        """Write ``search_results.json`` and ``.md`` atomically (call on one rank)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        write_text_atomic(directory / RESULTS_JSON, json.dumps(data, indent=2) + "\n")
        write_text_atomic(directory / RESULTS_MD, render_markdown(data))


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def render_markdown(data: dict[str, Any]) -> str:
    s, teacher = data["settings"], data["teacher"]
    search, train = s["search"], s["train"]
    candidates = data["candidates"]
    top_k = search["top_k"]
    tokens = train["train_iters"] * train["global_batch_size"] * s["data"]["seq_length"]
    eval_samples = train["eval_iters"] * train["global_batch_size"]
    chosen = (f"all {len(candidates)} distilled (as the paper)" if top_k is None or
              top_k >= len(candidates) else
              f"the {top_k} with the lowest zero-shot loss distilled (--top-k {top_k})")
    lines = [
        "# Architecture search", "",
        f"Teacher `{teacher['checkpoint']}`: {format_params(teacher['params'])} parameters "
        f"({teacher['name']}). Target {format_params(search['target_params'])} ± "
        f"{search['params_tolerance']:.0%}: {len(candidates)} candidates, {chosen}.",
        "",
        f"Each candidate is pruned from the scores (depth method `{search['depth_method']}`), "
        f"evaluated (zero-shot), distilled for {train['train_iters']} steps of "
        f"{train['global_batch_size']} × {s['data']['seq_length']} tokens ({tokens:,} tokens), "
        f"and evaluated again; both losses are on the same {eval_samples} held-out samples.",
        "",
        "| rank | candidate | layers | hidden | ffn | heads | groups | params | zero-shot loss "
        "| zero-shot rank | post-KD loss | prune+eval s | KD s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(candidates, key=lambda c: (c["rank"] is None, c["rank"] or 0,
                                              c["zero_shot_rank"] or 0, c["name"]))
    for c in order:
        shape = " | ".join(str(c["shape"][axis]) for axis in AXES)
        lines.append(
            f"| {c['rank'] or '–'} | {c['name']} | {shape} | {format_params(c['params'])} | "
            f"{_num(c['zero_shot_loss'], '.4f')} | {c['zero_shot_rank'] or '–'} | "
            f"{_num(c['post_kd_loss'], '.4f')} | {_num(c['zero_shot_seconds'], '.0f')} | "
            f"{_num(c['kd_seconds'], '.0f')} |")
    lines.append("")
    best = data["best"]
    if not data["complete"]:
        done = sum(c["post_kd_loss"] is not None for c in candidates)
        lines.append(f"**In progress**: {done} candidate(s) distilled so far.")
    if best is not None:
        where = f"distilled checkpoint `{best['checkpoint']}`" if best["checkpoint"] else \
            "checkpoint not kept"
        lines.append(f"Best: **{best['name']}**, post-KD loss {best['post_kd_loss']:.4f}; "
                     f"{where}.")
    agrees = data["ranking_agrees_with_zero_shot"]
    if agrees is not None:
        distilled = [c for c in candidates if c["rank"] is not None]
        by_zero = ", ".join(c["name"] for c in sorted(
            distilled, key=lambda c: (c["zero_shot_loss"], c["name"])))
        by_kd = ", ".join(c["name"] for c in sorted(distilled, key=lambda c: c["rank"]))
        verdict = "is the same as" if agrees else "differs from"
        lines += ["", f"The post-KD ranking {verdict} the zero-shot ranking of the distilled "
                      f"candidates (by loss, best first): zero-shot {by_zero}; after KD {by_kd}."]
    return "\n".join(lines) + "\n"
