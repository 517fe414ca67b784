"""The teacher–student model: both forward on the same micro-batch, on the same ranks.

``DistillationModel`` holds this rank's pipeline stage of the student (trainable) and of the frozen
teacher (eval mode, no grad, no optimizer state, never checkpointed), built on the same TP × PP
layout. Megatron's schedule drives it like any GPT stage:

* With PP > 1 the activations that travel between stages are a **bundle**, the student's and the
  teacher's hidden states concatenated on the last dimension, followed by one (student, teacher)
  slot per intermediate-loss pair that carries the paired states to the last stage::

      [ h_student | h_teacher | (h_s, h_t) of pair 0 | (h_s, h_t) of pair 1 | ... ]   [s, b, W]

  ``tensor_shapes_adjust_fn`` widens the schedule's p2p shapes to ``W``; the backward pass sends
  the student parts' gradients back through the same p2p calls (the teacher parts get zeros).
* On the last stage the forward returns per-token loss terms ``[b, s]``: the vocab-parallel KD
  loss of the logits, the student's cross entropy, and the cosine losses of the pairs.

Without a teacher (fine-tuning) it is the student alone and returns the per-token cross entropy.
Megatron's wrapped-model lookups (``config``, ``pre_process``, the shared embedding, ``decoder``)
reach the student through ``.module``, as they do through DDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minitron_megatron.config import DEFAULT_SEED
from minitron_megatron.distill.config import KDConfig
from minitron_megatron.distill.intermediate import HiddenStateProjection, cosine_loss
from minitron_megatron.distill.kd_loss import top_k_kd_loss, vocab_parallel_kd_loss
from minitron_megatron.runtime.distributed import ParallelState


@dataclass
class StageOutput:
    """Per-token loss terms ``[b, s]`` of one micro-batch (last pipeline stage)."""

    ce: torch.Tensor
    """Student next-token cross entropy."""

    kd: torch.Tensor | None = None
    """τ²·KL between teacher and student logits (``None`` without a teacher)."""

    intermediate: list[torch.Tensor] = field(default_factory=list)
    """``1 − cos`` per intermediate pair."""


class DistillationModel(torch.nn.Module):
    """This rank's stage of student + frozen teacher (``teacher=None``: the student alone)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, *,
                 kd: KDConfig, ps: ParallelState, seed: int = DEFAULT_SEED,
                 cached_teacher: bool = False):
        super().__init__()
        self.module = student
        self.teacher = teacher
        self.kd = kd
        self.ps = ps
        self.cached_teacher = cached_teacher and teacher is None
        self.widths = [student.config.hidden_size]
        self.projection = None
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        if teacher is None:
            if self.cached_teacher and ps.is_last_stage:  # the logits meet the cached top-k
                self._student_ce = student.compute_language_model_loss
                student.compute_language_model_loss = _logits_as_they_are
            return
        teacher.requires_grad_(False)
        teacher.eval()
        h_s, h_t = student.config.hidden_size, teacher.config.hidden_size
        self.widths = [h_s, h_t] + [h_s, h_t] * len(kd.intermediate_pairs)
        for side, model in (("student", student), ("teacher", teacher)):
            wanted = {pair[side == "teacher"] for pair in kd.intermediate_pairs}
            for layer in model.decoder.layers:
                if layer.layer_number - 1 in wanted:
                    layer.register_forward_hook(self._capture_hook(side, layer.layer_number - 1))
        if kd.intermediate_pairs and h_s != h_t and ps.is_last_stage:
            self.projection = HiddenStateProjection(
                h_s, h_t, ps=ps, dtype=student.config.params_dtype,
                init_std=student.config.init_method_std, seed=seed)
        if ps.is_last_stage:
            # GPTModel hands its logits, still in Megatron's [s, b, V/tp] layout, to
            # compute_language_model_loss: returning them from there spares the [b, s]
            # transposed copies that a label-less forward makes of both logit tensors.
            for model in (student, teacher):
                model.compute_language_model_loss = _logits_as_they_are

    # ------------------------------------------------------------------ Megatron hooks
    @property
    def bundle_width(self) -> int:
        return sum(self.widths)

    def tensor_shapes_adjust_fn(self, recv_shapes: list, send_shapes: list):
        """Megatron's ``adjust_tensor_shapes_fn`` (1F1B): the p2p tensors carry the bundle."""
        widen = [(*shape[:-1], self.bundle_width) for shape in recv_shapes]
        return widen, [(*shape[:-1], self.bundle_width) for shape in send_shapes]

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received bundle between student, teacher and the carried pair slots."""
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        self._carried = None
        if tensor is None or self.teacher is None:
            self.module.set_input_tensor(tensor)
            return
        parts = list(torch.split(tensor, self.widths, dim=-1))
        self.module.set_input_tensor(parts[0].contiguous())
        self.teacher.set_input_tensor(parts[1].detach().contiguous())
        self._carried = parts[2:]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen, always
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor | None = None,
                teacher_top_k: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Non-last stages: the bundle ``[s, b, W]``; last stage: ``StageOutput``.
        ``teacher_top_k``: the cached teacher's ``(values, indices)`` ``[b, s, k]`` of this
        micro-batch (``cached_teacher``; without them the student's CE alone)."""
        if self.teacher is None:
            out = self.module(tokens, position_ids, None, labels=labels)
            if not self.ps.is_last_stage or not self.cached_teacher:
                return StageOutput(ce=out) if self.ps.is_last_stage else out
            if teacher_top_k is None:  # held-out batches: nothing cached for them
                return StageOutput(ce=self._student_ce(labels, out))
            values, ids = (x.transpose(0, 1) for x in teacher_top_k)  # [s, b, k]: as the logits
            kd, ce = top_k_kd_loss(out, values, ids, labels=labels.t(),  # [s, b] each
                                   temperature=self.kd.temperature, tp_group=self.ps.tp_group)
            return StageOutput(ce=ce.t(), kd=kd.t(), intermediate=[])
        self._captured.clear()
        student_out = self.module(tokens, position_ids, None, labels=labels)
        with torch.no_grad():
            teacher_out = self.teacher(tokens, position_ids, None, labels=labels)
        pairs = self._pair_states(student_out)
        if not self.ps.is_last_stage:
            flat = [state for pair in pairs for state in pair]
            return torch.cat([student_out, teacher_out, *flat], dim=-1)
        intermediate = [cosine_loss(h_s, h_t, self.projection, self.ps) for h_s, h_t in pairs]
        return self._logit_losses(student_out, teacher_out, labels, intermediate)

    def _logit_losses(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                      labels: torch.Tensor, intermediate: list[torch.Tensor]) -> StageOutput:
        kd, ce = vocab_parallel_kd_loss(  # logits [s, b, V/tp] → per-token [s, b]
            student_out, teacher_out, labels=labels.t(), temperature=self.kd.temperature,
            reverse=self.kd.reverse, top_k=self.kd.top_k, tp_group=self.ps.tp_group)
        del student_out, teacher_out  # the logits live on only inside the loss's backward
        return StageOutput(ce=ce.t(), kd=kd.t(), intermediate=intermediate)

    def _capture_hook(self, side: str, layer: int):
        def hook(module, args, output):
            self._captured[(side, layer)] = output[0] if isinstance(output, tuple) else output
        return hook

    def _pair_states(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student, teacher) state of every pair: captured on this stage, else carried in
        (zeros on the first stage before the layer is reached)."""
        carried = getattr(self, "_carried", None)
        states = []
        for i, (s_layer, t_layer) in enumerate(self.kd.intermediate_pairs):
            pair = []
            for j, key in enumerate((("student", s_layer), ("teacher", t_layer))):
                state = self._captured.get(key)
                if state is None and carried is not None:
                    state = carried[2 * i + j]
                if state is None:
                    shape = (*self._hidden_shape(like), self.widths[j])
                    state = torch.zeros(shape, dtype=self.module.config.params_dtype,
                                        device=self.ps.device)
                pair.append(state)
            states.append((pair[0], pair[1].detach()))
        return states

    def _hidden_shape(self, like: torch.Tensor) -> tuple[int, int]:
        """``(s(/tp), b)`` of the hidden states of this stage (``like``: a stage output,
        hidden states ``[s(/tp), b, h]`` or, on the last stage, logits ``[s, b, V/tp]``)."""
        s, b = like.shape[:2]
        if self.ps.is_last_stage and self.ps.sequence_parallel:
            s //= self.ps.tp_size
        return s, b


def _logits_as_they_are(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``compute_language_model_loss`` of the distilled models' last stages: the logits
    ``[s, b, V/tp]`` themselves, left for the vocab-parallel KD loss."""
    return logits
