"""How a document becomes the scoring model's input: plain text, or a task prompt with an answer position.

One place for both backends and for the CPU tokenize tasks of GPU runs, so every engine sees the same ids.

- Plain text (``score.task.template`` unset): BOS + the document's tokens; the Scorer reports token entropy.
- Task prompt: the template with ``{text}`` (and ``{choices}``, the label names joined by ", ") rendered through
  the model's chat template when it has one (a user turn, then the assistant header: the answer position). The
  rendered prompt is split around the document, so the document alone is truncated to the window and the
  instruction always survives. Each choice is its tokens followed by the end-of-turn (EOS) token, so a choice
  that is a prefix of another ("Sports" / "Sports news") gets its own probability.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional, Sequence

from pydantic import Field, field_validator, model_validator

from labelnext.ops.core.settings import StageSettings
from labelnext.ops.score.inputs import Encoded, bos_prefix, text_token_ids, truncate

PLACEHOLDERS = ("text", "choices")
# Stands for the document while the chat template renders; split out again before tokenising.
_SENTINEL = "\u2063LABELNEXT_DOCUMENT\u2063"


class TaskPrompt(StageSettings):
    """``score.task``: tell the scoring model the task; unset ``template`` keeps plain-text token entropy."""

    template: Optional[str] = Field(
        default=None, description="instruction with {text} where the document goes and, optionally, {choices} "
        "(the label names joined by ', '); rendered with the model's chat template when it has one. Unset: the "
        "model reads each document as plain text and reports its mean token entropy")
    choices: Optional[list[str]] = Field(
        default=None, description="label names the model chooses between; uncertainty is then the entropy of its "
        "calibrated distribution over them. Unset with a template: the labels of input.labels when given, else a "
        "generative task (uncertainty is the entropy of the first answer token over the whole vocabulary)")
    calibrate: bool = Field(default=True, description="contextual calibration (Zhao et al. 2021): divide the "
                            "choice probabilities by those the same prompt gives a content-free document")
    content_free: str = Field(default="N/A", min_length=1,
                              description="the content-free document used for calibration")

    @field_validator("template")
    @classmethod
    def _placeholders(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
        unknown = sorted({n for n in names if n not in PLACEHOLDERS})
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; the template may use {{text}} and {{choices}}")
        if "text" not in names:
            raise ValueError("the template has no {text} placeholder for the document")
        return v

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is None:
            return v
        if not v:
            raise ValueError("the choice list is empty; give at least two label names or leave it unset")
        names = [str(c).strip() for c in v]
        if any(not n for n in names):
            raise ValueError("a choice is empty")
        seen = set()
        for n in names:
            if n in seen:
                raise ValueError(f"duplicate choice {n!r}")
            seen.add(n)
        if len(names) < 2:
            raise ValueError("one choice leaves nothing to be unsure about; give at least two")
        return names

    @model_validator(mode="after")
    def _needs_template(self) -> "TaskPrompt":
        if self.template is None and self.choices is not None:
            raise ValueError("choices need a template (score.task.template) that shows the model the document")
        if self.template is not None and self.choices is None and "{choices}" in self.template:
            raise ValueError("the template uses {choices} but no choices are given (score.task.choices)")
        return self

    @property
    def prompted(self) -> bool:
        return self.template is not None


@dataclass(frozen=True)
class PromptFormat:
    """A task prompt tokenised once: the ids before and after the document, and each choice's ids."""

    head: list[int]
    tail: list[int]
    choices: list[list[int]]  # empty: generative (the answer position's next-token distribution)

    @classmethod
    def build(cls, tokenizer, task: TaskPrompt, choices: Optional[Sequence[str]] = None) -> "PromptFormat":
        names = list(choices if choices is not None else (task.choices or []))
        instruction = task.template.format(text=_SENTINEL, choices=", ".join(names))
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                     add_generation_prompt=True)
            prefix: list[int] = []  # the chat template writes its own special tokens
        else:
            rendered, prefix = instruction, bos_prefix(tokenizer)
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("score.task.template: the chat template did not keep the document exactly once")
        head, tail = rendered.split(_SENTINEL)
        head_ids, tail_ids = text_token_ids(tokenizer, [head, tail]) if head or tail else ([], [])
        eos = getattr(tokenizer, "eos_token_id", None)
        end = [int(eos)] if eos is not None else []
        choice_ids = [ids + end for ids in text_token_ids(tokenizer, names)]
        return cls(prefix + head_ids, tail_ids, choice_ids)

    @property
    def overhead(self) -> int:
        """Tokens a prompt adds around its document."""
        return len(self.head) + len(self.tail)

    @property
    def choice_tokens(self) -> int:
        return sum(len(c) for c in self.choices)

    def max_prompt(self, window: int) -> int:
        """The longest prompt that leaves room in ``window`` for every choice's tokens but its last (a target only)."""
        return window - (max((len(c) for c in self.choices), default=1) - 1)

    def encode(self, tokenizer, texts: Sequence[str], *, window: int, truncation: str) -> Encoded:
        """Prompt ids per document within ``window`` positions, the choices' tokens included."""
        budget = self.max_prompt(window) - self.overhead
        if budget < 1:
            raise ValueError(f"score.task.template: the prompt and the longest choice take {window - budget + 1} "
                             f"tokens, more than the scoring window of {window} (score.max_tokens)")
        ids, flags = [], []
        for text_ids in text_token_ids(tokenizer, texts):
            kept, cut = truncate(text_ids, budget, truncation)
            ids.append(self.head + kept + self.tail)
            flags.append(cut)
        return Encoded(ids, flags)
