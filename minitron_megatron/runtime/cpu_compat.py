"""The one place that adapts Megatron-Core's CUDA assumptions to CPU ranks (gloo).

Megatron-Core assumes a GPU in a handful of places. On a machine without CUDA, ``apply()``
installs one small adapter per assumption; with CUDA present it does nothing at all (the real code
paths run, with TransformerEngine and fused kernels). Every adapter is exercised by
``tests/test_cpu_compat.py``.

Assumptions removed (numbered as in the team's notes):

1. ``torch.cuda.current_device()`` used as a device (attention buffers, RoPE ``inv_freq``, SP
   gather/scatter buffers, pipeline receive buffers) and
4. hard-coded ``device="cuda"`` tensors and ``torch.cuda.synchronize()`` in pipeline schedules,
   p2p communication, optimizer, grad clipping, grad buffers and the checkpoint writer, and
6. the default causal mask built on CUDA when ``attention_mask`` is ``None``:
   the modules that do this see ``torch`` through ``_TorchOnCpu``, where "cuda" means the CPU.
2. The model-parallel RNG tracker keeps CUDA RNG states (``model_parallel_cuda_manual_seed``, the
   dropout ``fork()`` even at p=0): its get/set state functions use the CPU generator instead.
3. The plain-torch norm wrapper asserts ``not sequence_parallel`` (and no zero-centered gamma,
   which apex/TE provide on GPU); with SP its parameters need the ``sequence_parallel``
   attribute so their grads are summed over TP: ``_TorchNormForCpu``.
5. ``Tensor.cuda()`` for tied embeddings with PP > 1: the shared-weight set-up runs with
   ``Tensor.cuda`` as the identity.
7. gloo's ``all_gather_into_tensor`` rejects 0-dim inputs: they are viewed as 1-element tensors.
8. Gradient clipping asserts ``torch.cuda.FloatTensor`` grads: a CPU clip with the same maths.
9. The mixed-precision and distributed optimizers accept only ``torch.cuda.*Tensor`` parameters
   (``param.type()`` compared with CUDA type names): while they are constructed, a CPU tensor's
   ``type()`` reports the CUDA name of its dtype, so bf16 + the distributed optimizer run on CPU.
10. megatron-core ≥ 0.17's gradient sync waits on ``torch.cuda.current_stream()`` events (and
    uses ``torch.cuda.stream`` with several optimizer instances): on CPU there is one synchronous
    stream, ``_CpuStream``, whose waits are no-ops.
11. The distributed optimizer is written for the fused Adam of TE/apex (present with CUDA), which
    keeps the step count per parameter group. torch's Adam creates its per-parameter state, a
    ``step`` included, only at its first step: before a resume loads into a fresh optimizer the
    state is created with Megatron's own dummy-value initialisation, and after it loads, every
    parameter gets its own ``step`` tensor holding the checkpoint's count (Megatron's copy-back
    leaves the dummy's count, in one tensor shared by all parameters, which Adam's in-place
    increment would then advance once per parameter).

Every name an adapter replaces or wraps is checked before anything is patched
(``missing_targets``): a megatron-core release that renamed one fails at start-up with
``MegatronCoreMismatch`` naming the version and the name, never a silent no-op.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable
from typing import Any

import torch

from minitron_megatron.runtime.mcore_compat import SUPPORTED_MCORE, mcore_version

_APPLIED = False


class MegatronCoreMismatch(RuntimeError):
    """This megatron-core lacks a name a CPU adapter patches: the version is not supported."""

# Modules that call torch.cuda.* or allocate with device="cuda" on paths a CPU run takes.
_CUDA_DEVICE_MODULES = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.module",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "empty_like",
     "zeros_like", "ones_like", "full_like"}
)


def _cpu_if_cuda(device: Any) -> Any:
    if isinstance(device, int) or (
        device is not None and torch.device(device).type == "cuda"
    ):
        return torch.device("cpu")
    return device


class _CpuStream:
    """The one synchronous CPU "stream": nothing is ever pending, so waits are no-ops (10)."""

    def wait_event(self, event: Any) -> None:
        """Nothing to wait for."""

    def wait_stream(self, stream: Any) -> None:
        """Nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing to wait for."""


class _CudaOnCpu:
    """``torch.cuda`` for the patched modules: the current device is the CPU, syncs are no-ops,
    streams are ``_CpuStream`` and RNG calls use the CPU generator (assumptions 1, 2, 4, 10)."""

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def current_stream(self, *args: Any, **kwargs: Any) -> _CpuStream:
        return _CpuStream()

    def stream(self, stream: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def synchronize(self, *args: Any, **kwargs: Any) -> None:
        """CPU collectives (gloo) are synchronous: nothing to wait for."""

    def empty_cache(self) -> None:
        """No caching allocator on CPU."""

    def get_rng_state(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by the patched modules: tensor factories asked for "cuda" get the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            return _factory_on_cpu(attr)
        return attr


def _factory_on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapped


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Replaces ``_get_cuda_rng_state``: the tracker's states are CPU generator states."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    """Replaces ``_set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


class _ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """LayerNorm applying ``1 + weight`` (TE/apex ``zero_centered_gamma``, Nemotron's 1p)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.elementwise_affine:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1,
                                              self.bias, self.eps)


class _ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    """RMSNorm applying ``1 + weight``."""

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


class _TorchNormForCpu:
    """Plain torch LayerNorm/RMSNorm (as ``WrappedTorchNorm``), allowed under sequence parallel
    (the parameters are marked ``sequence_parallel`` so Megatron sums their grads over TP) and
    with zero-centered gamma (which the wrapper refuses; TE and apex provide it on GPU), its
    parameters in the model's ``params_dtype`` as TE creates them (the wrapper leaves them fp32
    beside bf16 weights)."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any):
        centered = config.layernorm_zero_centered_gamma
        norm_cls = {
            ("LayerNorm", False): torch.nn.LayerNorm, ("RMSNorm", False): torch.nn.RMSNorm,
            ("LayerNorm", True): _ZeroCenteredLayerNorm, ("RMSNorm", True): _ZeroCenteredRMSNorm,
        }.get((config.normalization, centered))
        if norm_cls is None:
            raise ValueError(f"unsupported normalization {config.normalization!r} on CPU")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _all_gather_into_tensor_any_dim(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def all_gather_into_tensor(output_tensor, input_tensor, *args: Any, **kwargs: Any):
        if input_tensor.dim() == 0:
            input_tensor = input_tensor.reshape(1)
        return original(output_tensor, input_tensor, *args, **kwargs)

    return all_gather_into_tensor


def _clip_grad_by_total_norm_cpu(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """Same maths as Megatron's ``clip_grad_by_total_norm_fp32``, without its CUDA-type assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block ``Tensor.cuda()`` returns the tensor itself (CPU ranks); with CUDA
    present nothing is changed. Also used around ModelOpt's prune call (its layer dropping
    moves counts to the GPU before an all-gather)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _setup_embeddings_on_cpu(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self, *args: Any, **kwargs: Any):
        with tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    return setup_embeddings_and_output_layer


@contextlib.contextmanager
def tensor_type_reports_cuda():
    """Within the block a CPU tensor's ``type()`` names the CUDA type of its dtype
    (``torch.cuda.BFloat16Tensor``) — what Megatron's mixed-precision optimizers check (9)."""
    original = torch.Tensor.type

    def cuda_type(self, *args: Any, **kwargs: Any):
        name = original(self, *args, **kwargs)
        if args or kwargs or name.startswith("torch.cuda."):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _construct_with_cuda_type_names(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with tensor_type_reports_cuda():
            original(self, *args, **kwargs)

    return __init__


def _state_before_loading(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        if is_loading and not self.optimizer.state:  # torch's Adam before its first step (11)
            self._init_optimizer_states_with_dummy_values()
        return original(self, model_sharded_state_dict, is_loading, **kwargs)

    return sharded_state_dict


def _step_after_loading(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        original(self, state_dict)
        steps = {g.get("step") for g in state_dict.get("optimizer", {}).get("param_groups", [])}
        if len(steps) == 1 and None not in steps:  # the checkpoint's step count (11),
            step = float(steps.pop())
            for state in self.optimizer.state.values():  # one tensor per parameter: Adam
                if "step" in state:  # increments them in place, a shared one N times
                    state["step"] = torch.tensor(step, dtype=state["step"].dtype)

    return load_state_dict


# (module, attribute) replaced or wrapped by each adapter, checked before any is installed.
PATCHED_NAMES: tuple[tuple[str, str], ...] = (
    *((name, "torch") for name in _CUDA_DEVICE_MODULES),  # 1, 4, 6, 10
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),  # 2
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.transformer.torch_norm", "WrappedTorchNorm"),  # 3
    ("megatron.core.models.common.language_module.language_module", "LanguageModule"),  # 5
    ("torch.distributed", "all_gather_into_tensor"),  # 7
    ("megatron.core.tensor_parallel.layers", "dist_all_gather_func"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),  # 8
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params"),  # 9
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer"),
    *(("megatron.core.optimizer.distrib_optimizer", f"DistributedOptimizer.{name}")  # 11
      for name in ("_init_optimizer_states_with_dummy_values", "sharded_state_dict",
                   "load_state_dict")),
)


def missing_targets() -> list[str]:
    """The ``module.attribute`` names the adapters patch that this megatron-core lacks."""
    missing = []
    for module_name, attribute in PATCHED_NAMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        try:
            functools.reduce(getattr, attribute.split("."), module)
        except AttributeError:
            missing.append(f"{module_name}.{attribute}")
    return missing


def check_targets() -> None:
    """Raise ``MegatronCoreMismatch`` unless every name the adapters patch exists."""
    missing = missing_targets()
    if missing:
        raise MegatronCoreMismatch(
            f"megatron-core {mcore_version()} lacks {', '.join(missing)}, which the CPU "
            f"adapters of minitron_megatron patch; this release is not supported on CPU. "
            f"Install a supported one: pip install 'megatron-core{SUPPORTED_MCORE}'.")


def is_applied() -> bool:
    return _APPLIED


def apply() -> bool:
    """Install the CPU adapters once, only when CUDA is absent. Returns whether they are active.

    Raises ``MegatronCoreMismatch`` (before patching anything) if a patched name is missing."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    check_targets()

    torch_on_cpu = _TorchOnCpu()
    for name in _CUDA_DEVICE_MODULES:  # assumptions 1, 4, 6, 10
        importlib.import_module(name).torch = torch_on_cpu

    from megatron.core.tensor_parallel import random as mcore_random  # assumption 2

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state

    from megatron.core.transformer import torch_norm  # assumption 3

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(_TorchNormForCpu.__new__)

    from megatron.core.models.common.language_module import language_module  # assumption 5

    module_cls = language_module.LanguageModule
    module_cls.setup_embeddings_and_output_layer = _setup_embeddings_on_cpu(
        module_cls.setup_embeddings_and_output_layer
    )

    gather = _all_gather_into_tensor_any_dim(torch.distributed.all_gather_into_tensor)  # 7
    torch.distributed.all_gather_into_tensor = gather
    for name in ("megatron.core.tensor_parallel.layers", "megatron.core.tensor_parallel.mappings",
                 "megatron.core.tensor_parallel.utils",
                 "megatron.core.distributed.param_and_grad_buffer"):
        module = importlib.import_module(name)
        if hasattr(module, "dist_all_gather_func"):
            module.dist_all_gather_func = gather

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer  # 8, 9

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    for cls in (optimizer.Float16OptimizerWithFloat16Params,
                distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _construct_with_cuda_type_names(cls.__init__)
    dist_opt = distrib_optimizer.DistributedOptimizer  # 11
    dist_opt.sharded_state_dict = _state_before_loading(dist_opt.sharded_state_dict)
    dist_opt.load_state_dict = _step_after_loading(dist_opt.load_state_dict)

    _APPLIED = True
    return True
