"""Baseline for the side-by-side: NVIDIA ModelOpt's Minitron pruning on one of our checkpoints.

Loads a minitron checkpoint into Megatron-Core's ``GPTModel`` (one process, TP=1, local layer
spec), prunes it with ModelOpt's ``mcore_minitron`` mode to an exact target architecture
(``export_config``), calibrating on TRAIN-split batches of our indexed dataset, checks that the
weights really have the target shapes, and measures the pruned model's zero-shot held-out loss
on the VALID split with our ``evaluate_model``. The prune call is timed next to a plain forward
over the same calibration batches, so its overhead reads as a ratio.

Usage (needs ``pip install -c constraints.txt nvidia-modelopt==0.43.0 requests
huggingface_hub``; 0.43.0 is the release that works beside megatron-core 0.16.1)::

    python benchmarks/modelopt_baseline.py --load /tmp/smol --data-path /tmp/wiki/wiki \\
        --ffn-hidden-size 768 --hidden-size 448 --calib-samples 64 --eval-samples 64

    from benchmarks.modelopt_baseline import prune_with_modelopt
    result = prune_with_modelopt("/tmp/smol", "/tmp/wiki/wiki",
                                 targets={"ffn_hidden_size": 768, "hidden_size": 448})

What ModelOpt 0.43.0 needs or refuses here (the workarounds live in this file, not the library):

* Its transformer-layer conversion ties each norm to the ``hidden_size`` hparam through
  ``DMRegistry.convert(norm, num_features=...)``, a form it registers only for apex's
  ``FusedLayerNorm``. Without apex the local spec builds ``torch.nn.RMSNorm`` (unknown to it:
  ``KeyError ... RMSNorm is not registered``) or ``torch.nn.LayerNorm`` (registered without that
  argument): ``_torch_norms_registered`` registers both for the duration of the prune.
* Depth pruning (``num_layers``) moves its layer counts with ``Tensor.cuda()`` (``AssertionError:
  Torch not compiled with CUDA enabled``): ``cpu_compat.tensor_cuda_is_identity`` during the prune.
* Only TP=1 (it asserts); heads are pruned within each query group, so a head target must be a
  multiple of the group count (the group count itself works).
* With its default divisors (hidden 256, ffn 512) a target outside the rounded choices (e.g.
  hidden 448) is skipped silently: the weights stay full size while the model config is
  rewritten. Divisors of 1 are used here, and every weight is checked against a model freshly
  built from the target config (``verify_shapes``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from minitron_megatron.runtime.cpu_compat import tensor_cuda_is_identity

PRUNABLE = ("ffn_hidden_size", "hidden_size", "num_attention_heads", "num_layers")
MODELOPT_INSTALL = "pip install -c constraints.txt nvidia-modelopt==0.43.0 requests huggingface_hub"


def check_targets(model_config, targets: dict[str, int]) -> None:
    """Reject a target ModelOpt cannot reach, before any work (ModelOpt itself may not say)."""
    if not targets:
        raise ValueError(f"no pruning target given; name at least one of {', '.join(PRUNABLE)}.")
    unknown = sorted(set(targets) - set(PRUNABLE))
    if unknown:
        raise ValueError(f"cannot prune {', '.join(unknown)} with ModelOpt's Minitron mode; "
                         f"targets are {', '.join(PRUNABLE)}.")
    for name, value in targets.items():
        original = getattr(model_config, name)
        if not isinstance(value, int) or not 1 <= value <= original:
            raise ValueError(f"target {name}={value!r} must be an integer in 1..{original} (the "
                             f"checkpoint's {name}).")
    heads, groups = targets.get("num_attention_heads"), model_config.num_query_groups
    if heads is not None and heads % groups:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of the "
                         f"{groups} query groups; ModelOpt prunes heads within each group.")
    model_config.replace(**targets)  # the pruned config itself must be valid


def pruned_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Shape of every weight of the model (``_extra_state`` entries left out)."""
    return {name: list(t.shape) for name, t in model.state_dict().items()
            if "_extra_state" not in name and isinstance(t, torch.Tensor)}


def verify_shapes(pruned: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Raise unless ``pruned`` has exactly the weights (names and shapes) of ``expected``."""
    got, want = pruned_shapes(pruned), pruned_shapes(expected)
    wrong = [f"{n}: {got.get(n)} (expected {want.get(n)})" for n in sorted(set(got) | set(want))
             if got.get(n) != want.get(n)]
    if wrong:
        raise RuntimeError(
            f"ModelOpt did not prune to the target ({len(wrong)} weights differ, e.g. "
            f"{'; '.join(wrong[:4])}); it skips targets outside its hparam choices silently.")


@contextlib.contextmanager
def _torch_norms_registered() -> Iterator[None]:
    """Let ModelOpt 0.43 convert the plain-torch norms of Megatron's local spec.

    Its transformer-layer conversion calls ``DMRegistry.convert(norm, num_features=hidden)`` to
    tie the norm to the model's ``hidden_size`` hparam. It registers that form only for apex's
    ``FusedLayerNorm``; without apex (every CPU machine) the local spec builds ``torch.nn.RMSNorm``
    / ``torch.nn.LayerNorm``, which ModelOpt either does not know (RMSNorm) or registers with a
    set-up that takes no ``num_features`` (LayerNorm). This registers both with the shared hparam
    while the prune runs and restores ModelOpt's own registry afterwards.
    """
    from modelopt.torch.nas.modules import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry

    class _DynamicTorchNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            if getattr(self, "bias", None) is not None:  # RMSNorm has none
                self._register_dynamic_attribute("bias", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    norms = {torch.nn.LayerNorm: "nn.LayerNorm", torch.nn.RMSNorm: "nn.RMSNorm"}
    previous = {cls: DMRegistry[cls] for cls in norms if cls in DMRegistry}
    for cls in previous:
        DMRegistry.unregister(cls)
    DMRegistry.register(norms)(_DynamicTorchNorm)
    try:
        yield
    finally:
        for cls in norms:
            DMRegistry.unregister(cls)
        for cls, dm_cls in previous.items():
            DMRegistry.register({cls: norms[cls]})(dm_cls)


def _import_modelopt():
    try:
        import modelopt.torch.prune as mtp
        from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config
    except ImportError as err:
        raise ImportError(f"the ModelOpt baseline needs nvidia-modelopt 0.43.0 ({err}); install "
                          f"it with `{MODELOPT_INSTALL}`.") from err
    return mtp, get_mcore_minitron_config


def modelopt_prune(model, model_config, ps, targets: dict[str, int], calibration: list, *,
                   seq_length: int, micro_batch_size: int, verbose: bool = False):
    """Prune ``model`` (this process's whole ``GPTModel`` of ``model_config``, TP=1) in place with
    ModelOpt's ``mcore_minitron`` mode to the exact ``targets``, calibrating on the
    ``calibration`` micro-batches. Returns the pruned model and the seconds of the ``mtp.prune``
    call (``{"wall": s, "cpu": s}``). Raises ``RuntimeError`` unless every weight then has the
    shape of a model built from the target config. ``verbose`` keeps ModelOpt's own printing
    (per-layer importance tensors, dropped layers)."""
    from minitron_megatron.model.forward import pipeline_forward

    mtp, minitron_config = _import_modelopt()

    def forward_loop(m) -> None:
        pipeline_forward(m, ps, calibration, seq_length=seq_length,
                         micro_batch_size=micro_batch_size, on_output=_discard)

    # Divisors of 1 keep every width a valid choice: the exact target decides, not ModelOpt's
    # default rounding (hidden 256, ffn 512), which would silently drop e.g. hidden 448.
    mode_config = minitron_config(hidden_size_divisor=1, ffn_hidden_size_divisor=1,
                                  num_layers_divisor=1)
    chatter = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with _timer() as seconds, chatter, _torch_norms_registered(), tensor_cuda_is_identity():
        model, _ = mtp.prune(model, mode=[("mcore_minitron", mode_config)],
                             constraints={"export_config": dict(targets)}, dummy_input=None,
                             config={"forward_loop": forward_loop})
    verify_shapes(model, build_target_model(model_config, ps, targets))
    return model, seconds


def build_target_model(model_config, ps, targets: dict[str, int]):
    """A freshly built local-spec model of the target architecture (weights uninitialised)."""
    from minitron_megatron.model.build import build_model

    return build_model(model_config.replace(**targets), ps, init_weights=False, spec="local")


def _discard(batch, output) -> None:
    return None


@contextlib.contextmanager
def _timer() -> Iterator[dict[str, float]]:
    """``{"wall": s, "cpu": s}`` of the block (CPU: this process, all threads; steadier than wall
    time on a shared machine)."""
    seconds: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield seconds
    seconds.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)


def prune_with_modelopt(
    checkpoint_dir: str,
    data_prefix: str,
    *,
    targets: dict[str, int],
    calib_samples: int = 64,
    seq_length: int = 256,
    micro_batch_size: int = 4,
    eval_samples: int = 64,
    split: str = "98,2,0",
    cache_path: str | None = None,
    evaluate_teacher: bool = False,
    verbose: bool = False,
    ps=None,
) -> dict[str, Any]:
    """Prune a checkpoint with ModelOpt's Minitron mode to ``targets`` and evaluate it zero-shot.

    ``targets`` maps any of ``ffn_hidden_size``, ``hidden_size``, ``num_attention_heads`` and
    ``num_layers`` to its pruned value. Calibration uses samples ``0..calib_samples-1`` of the
    TRAIN split, evaluation samples ``0..eval_samples-1`` of the VALID split. Runs in one process
    at TP=1 (``ps``: an initialised single-rank ``ParallelState``; started and shut down here
    when ``None``). Returns ``seconds_prune`` (the whole ``mtp.prune`` call: calibration forward,
    ranking, slicing, export), ``seconds_forward`` (a plain forward over the same calibration
    batches), ``prune_over_forward``, ``zero_shot_loss``, ``teacher_loss`` (when
    ``evaluate_teacher``), ``num_parameters``, ``teacher_parameters``, ``pruned_config`` and
    ``pruned_shapes`` (layer 0 and the non-layer weights). ``verbose`` keeps ModelOpt's printing.
    Raises ``RuntimeError`` when the
    weights do not have the target shapes afterwards.
    """
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.data.loaders import DataConfig

    _import_modelopt()  # fail with the install command before any work
    info = find_checkpoint(checkpoint_dir)
    check_targets(info.model_config, targets)
    if min(calib_samples, eval_samples, micro_batch_size) <= 0:
        raise ValueError("calib samples, eval samples and micro-batch size must be positive.")
    data = DataConfig(data_path=data_prefix, seq_length=seq_length, split=split,
                      cache_path=cache_path)
    run = functools.partial(_prune_and_evaluate, info, data, targets=targets,
                            calib_samples=calib_samples, micro_batch_size=micro_batch_size,
                            eval_samples=eval_samples, evaluate_teacher=evaluate_teacher,
                            verbose=verbose)
    if ps is not None:
        return run(ps)
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    with distributed(LaunchEnv(), ParallelConfig()) as state:
        return run(state)


def _prune_and_evaluate(info, data, ps, *, targets, calib_samples, micro_batch_size,
                        eval_samples, evaluate_teacher, verbose) -> dict[str, Any]:
    from minitron_megatron.checkpoint import load_checkpoint
    from minitron_megatron.data.loaders import build_datasets, micro_batches
    from minitron_megatron.evaluate import eod_id_of, evaluate_model
    from minitron_megatron.model.build import build_model, count_parameters
    from minitron_megatron.model.forward import pipeline_forward

    if ps.world_size != 1:
        raise ValueError(f"the ModelOpt baseline runs in one process (TP=1), not "
                         f"{ps.world_size}; launch it without torchrun.")
    cfg, seq = info.model_config, data.seq_length
    datasets = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                              num_samples={"train": calib_samples, "valid": eval_samples})
    calibration = list(micro_batches(datasets["train"], range(calib_samples), micro_batch_size))

    model = build_model(cfg, ps, init_weights=False, spec="local")  # ModelOpt 0.43: local spec
    load_checkpoint(info, model=model)
    result: dict[str, Any] = {"targets": dict(targets), "calib_samples": calib_samples,
                              "eval_samples": eval_samples, "seq_length": seq,
                              "teacher_parameters": count_parameters(model, ps)}

    def evaluate(m) -> float:
        return evaluate_model(m, ps, datasets["valid"], num_samples=eval_samples,
                              micro_batch_size=micro_batch_size, seq_length=seq).loss

    if evaluate_teacher:
        result["teacher_loss"] = evaluate(model)
    for _ in range(2):  # the first pass warms up, so neither timing pays for it
        with _timer() as forward:
            pipeline_forward(model, ps, calibration, seq_length=seq,
                             micro_batch_size=micro_batch_size, on_output=_discard)
    model, prune = modelopt_prune(model, cfg, ps, targets, calibration, seq_length=seq,
                                  micro_batch_size=micro_batch_size, verbose=verbose)
    result.update(seconds_forward=forward["wall"], seconds_prune=prune["wall"],
                  prune_over_forward=prune["wall"] / forward["wall"],
                  cpu_seconds_forward=forward["cpu"], cpu_seconds_prune=prune["cpu"],
                  cpu_prune_over_forward=prune["cpu"] / forward["cpu"])
    result["num_parameters"] = count_parameters(model, ps)
    result["pruned_config"] = {name: getattr(model.config, name) for name in PRUNABLE}
    result["pruned_shapes"] = {n: s for n, s in pruned_shapes(model).items()
                               if "layers." not in n or ".layers.0." in n}
    result["zero_shot_loss"] = evaluate(model)
    result["zero_shot_ppl"] = math.exp(min(result["zero_shot_loss"], 700.0))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Prune a minitron checkpoint with NVIDIA ModelOpt's "
                                "Minitron mode and report wall time and zero-shot loss.")
    p.add_argument("--load", required=True, help="minitron checkpoint directory (the teacher)")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix (.bin/.idx)")
    for name in PRUNABLE:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"target {name} (unchanged when omitted)")
    p.add_argument("--calib-samples", type=int, default=64, help="TRAIN-split samples")
    p.add_argument("--eval-samples", type=int, default=64, help="VALID-split samples")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--split", default="98,2,0")
    p.add_argument("--data-cache-path", default=None)
    p.add_argument("--evaluate-teacher", action="store_true", help="also report the teacher loss")
    p.add_argument("--verbose", action="store_true", help="show ModelOpt's own printing")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    targets = {n: getattr(args, n) for n in PRUNABLE if getattr(args, n) is not None}
    result = prune_with_modelopt(
        args.load, args.data_path, targets=targets, calib_samples=args.calib_samples,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        eval_samples=args.eval_samples, split=args.split, cache_path=args.data_cache_path,
        evaluate_teacher=args.evaluate_teacher, verbose=args.verbose)
    print(summary(result), flush=True)
    line = json.dumps(result)
    print(line, flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(line + "\n")
    return result


def summary(r: dict[str, Any]) -> str:
    rows = [
        f"ModelOpt mcore_minitron → {r['pruned_config']}",
        f"  prune (calibration {r['calib_samples']} × {r['seq_length']} tokens + sort + export): "
        f"{r['seconds_prune']:.2f} s wall, {r['cpu_seconds_prune']:.2f} s CPU",
        f"  plain forward over the same batches: {r['seconds_forward']:.2f} s wall, "
        f"{r['cpu_seconds_forward']:.2f} s CPU",
        f"  prune / forward: {r['prune_over_forward']:.2f} wall, "
        f"{r['cpu_prune_over_forward']:.2f} CPU",
        f"  parameters: {r['teacher_parameters']:,} → {r['num_parameters']:,} "
        f"({r['num_parameters'] / r['teacher_parameters']:.1%})",
        f"  zero-shot held-out loss ({r['eval_samples']} samples): {r['zero_shot_loss']:.4f}",
    ]
    if "teacher_loss" in r:
        rows.append(f"  teacher held-out loss: {r['teacher_loss']:.4f}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
