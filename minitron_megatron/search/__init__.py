"""Architecture search (Minitron, arXiv 2407.14679 §2.3 / §4.3): enumerate the pruned shapes of a
teacher within a parameter budget, prune each from the saved importance scores, distill each
briefly, rank them by the held-out loss after distillation.

* ``space``     candidate shapes: choices per axis, exact parameter counts, TP validity
* ``config``    ``SearchConfig``: budget, selection (``top_k``), what is kept
* ``preflight`` every check before any work → ``SearchPlan``
* ``runner``    zero-shot losses, short distillations, ranking, resume
* ``results``   ``search_results.json`` / ``.md``
* ``progress``  console lines: candidate i/N, step, ETA of the whole search

Example::

    plan = prepare_search(teacher=find_checkpoint("ckpt/teacher"), scores=Scores.load("s.st"),
                          space=SearchSpace.default(cfg), search=SearchConfig(save="search",
                          target_params=70_000_000), train=..., kd=KDConfig(), data=...,
                          parallel=ParallelConfig(), world_size=1)
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        results = run_search(plan, ps)
"""

from minitron_megatron.search.config import SearchConfig
from minitron_megatron.search.preflight import SearchPlan, prepare_search
from minitron_megatron.search.results import CandidateResult, SearchResults
from minitron_megatron.search.runner import run_search
from minitron_megatron.search.space import Candidate, SearchSpace, enumerate_candidates

__all__ = ["Candidate", "CandidateResult", "SearchConfig", "SearchPlan", "SearchResults",
           "SearchSpace", "enumerate_candidates", "prepare_search", "run_search"]
