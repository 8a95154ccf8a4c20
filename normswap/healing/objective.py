"""The healing loss: what every branch reads, and every stack's output, matched to the teacher's.

Per-sublayer matching (not only the output) gives each branch its own gradient signal: a student whose
early branches read the wrong input cannot make it up later. Each entry's loss is the relative squared
error ``||s - t||^2 / ||t||^2`` over real tokens, so entries of different scale weigh the same; the
stack outputs count ``output_weight`` times. With ``branch_weight`` > 0, what each branch writes (its output
projection's result) is matched to the teacher's too.

``input_noise`` and ``input_mix`` perturb what both models read while training, the same way for both (the
token embeddings' output): Gaussian noise of that relative size, and each row mixed with another row of the
batch (a weight of up to ``input_mix`` on the other). The student then learns the teacher's map on inputs its
training texts alone do not reach (``benchmarks/README.md`` has whether that transfers).

With ``logit_weight`` > 0 (models with an LM head), the next-token distributions are matched too:
KL(teacher || student) per real token, the figure a decoder's drift is judged by, weighted like an entry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import NormswapError
from .taps import Correspondence, tap


class HealingObjective(nn.Module):
    """Wraps the student for ``Trainer``: ``forward(input_ids, attention_mask)`` returns ``{"loss": ...}``.

    The teacher is held outside the module tree, so it is neither trained, nor saved in checkpoints, nor
    wrapped for distribution; it follows the student's device.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, correspondence: Correspondence,
                 output_weight: float = 1.0, only_outputs: bool = False, branch_weight: float = 0.0,
                 input_noise: float = 0.0, input_mix: float = 0.0, logit_weight: float = 0.0) -> None:
        super().__init__()
        self.logit_weight = logit_weight
        self.input_noise, self.input_mix = input_noise, input_mix
        self._perturbation: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None
        self._matching = False  # inside forward: only the training batch is perturbed, never an evaluation
        self.student = student
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self.correspondence = correspondence
        self.output_weight = output_weight
        self._student_found: dict[str, torch.Tensor] = {}
        self._teacher_found: dict[str, torch.Tensor] = {}
        finals = {entry.student for entry in correspondence.final_entries()}
        self._weights = {entry.student: output_weight if entry.student in finals else 1.0
                         for entry in correspondence.entries if entry.student in finals or not only_outputs}
        self._handles = [handle for entry in correspondence.entries for handle in (
            _record_output(student, entry.student, self._student_found, entry.student),
            _record_output(teacher, entry.teacher, self._teacher_found, entry.student))]
        if branch_weight > 0 and not only_outputs:  # what each branch writes, against the teacher's branch
            for writer in correspondence.writers:
                if writer.teacher_path is None:
                    continue
                key = f"{writer.path}:written"
                self._weights[key] = branch_weight
                self._handles += [_record_output(student, writer.path, self._student_found, key),
                                  _record_output(teacher, writer.teacher_path, self._teacher_found, key)]
        if input_noise > 0 or input_mix > 0:
            self._handles += [model.get_input_embeddings().register_forward_hook(self._perturbed)
                              for model in (teacher, student)]

    def close(self) -> None:
        """Remove the hooks: the student goes back to the caller as it came, only with new weights."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def teacher(self) -> nn.Module:
        return self.__dict__["teacher"]

    def _apply(self, fn: Any, recurse: bool = True) -> HealingObjective:
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> dict[str, torch.Tensor]:
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
        self._perturbation, self._matching = None, True  # drawn anew for this batch, by the teacher's embeddings
        try:
            with torch.no_grad():
                taught = self.teacher(input_ids=input_ids, attention_mask=attention_mask)
            learnt = self.student(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self._matching = False
        total, weight = 0.0, 0.0
        if self.logit_weight > 0:
            total = self.logit_weight * _next_token_kl(_logits(taught), _logits(learnt), mask)
            weight = self.logit_weight
        for key, entry_weight in self._weights.items():
            student_value = self._student_found.pop(key, None)
            teacher_value = self._teacher_found.pop(key, None)
            if student_value is None or teacher_value is None:
                continue
            read_map = self.correspondence.read_maps.get(key)
            if read_map is not None:  # a pre norm's g / s went into the student's readers: compare through it
                student_value = read_map(student_value)
            s = student_value[mask].float()
            t = teacher_value[mask].float()
            total = total + entry_weight * ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
            weight += entry_weight
        return {"loss": total / max(weight, 1.0)}

    def _perturbed(self, _module: nn.Module, _inputs: Any, embedded: torch.Tensor) -> torch.Tensor | None:
        """The token embeddings' output, perturbed while training: the same noise and mix for both models (the
        first call of a batch, the teacher's, draws them); the models' other calls (evaluations) read them as
        they are."""
        if not (self.training and self._matching):
            return None
        if self._perturbation is None:
            rows = embedded.shape[0]
            size = embedded.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
            noise = torch.randn(embedded.shape, device=embedded.device) * size * self.input_noise \
                if self.input_noise > 0 else None
            other = torch.randperm(rows, device=embedded.device) if self.input_mix > 0 else None
            share = torch.rand(rows, 1, 1, device=embedded.device) * self.input_mix if self.input_mix > 0 else None
            self._perturbation = (noise, other, share)
        noise, other, share = self._perturbation
        if noise is not None and noise.shape != embedded.shape:
            raise NormswapError(f"input noise needs the teacher's and the student's token embeddings to have one "
                                f"shape, not {tuple(noise.shape)} and {tuple(embedded.shape)}; heal without it")
        result = embedded
        if other is not None and share is not None:
            result = (1 - share.to(result.dtype)) * result + share.to(result.dtype) * result[other]
        if noise is not None:
            result = result + noise.to(result.dtype)
        return result

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The student's tensors; tied ones are copied so safetensors can write every key."""
        state = super().state_dict(*args, **kwargs)
        seen: set[int] = set()
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel():
                pointer = value.data_ptr()
                if pointer in seen:
                    state[key] = value.clone()
                seen.add(pointer)
        return state


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise NormswapError("matching the next-token distributions needs models with an LM head (their output has "
                            "logits); heal without logit_weight")
    return logits


def _next_token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over real tokens."""
    teacher_log = torch.log_softmax(teacher_logits[mask].float(), dim=-1)
    student_log = torch.log_softmax(student_logits[mask].float(), dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean()


def _record_output(model: nn.Module, path: str, found: dict[str, torch.Tensor], key: str) -> Any:
    return tap(model, path, found, key)
