"""The self-align prompt (principles + exemplars + the user turn) and parsing of what the model wrote.

A self-align prompt is plain text, the same for every model (the base model may have no chat template):

    {principles}

    {INTRO}

    User: {exemplar prompt}

    Assistant (internal thoughts): {exemplar thoughts}

    Assistant: {exemplar answer}
    ... (k exemplars)

    User: {prompt}

    Assistant (internal thoughts):

The model continues with its thoughts, then "Assistant:" and its answer; generation stops at the next
user turn. Only the answer is kept, and it is trained in the engraving format (training.engraving_parts):
no principles, no exemplars, no thoughts.
"""

from __future__ import annotations

from typing import Sequence

from soft_jax.data import Exemplar

INTRO = ("Below are conversations between a user and an AI assistant. Before each answer the assistant "
         "writes its internal thoughts: which principles apply and how.")
USER, THOUGHTS, ANSWER = "User:", "Assistant (internal thoughts):", "Assistant:"
# Generation stops once the model starts another user turn.
STOP_STRINGS = ("\nUser:",)


def user_turn(prompt: str, inp: str = "") -> str:
    return f"{prompt}\n\n{inp}" if inp else prompt


def exemplar_block(ex: Exemplar) -> str:
    return f"{USER} {ex.prompt}\n\n{THOUGHTS} {ex.thoughts}\n\n{ANSWER} {ex.answer}"


def self_align_prompt(principles: str, exemplars: Sequence[Exemplar], prompt: str, inp: str = "") -> str:
    """The generation prompt. Everything before the user turn depends only on the exemplars, so prompts
    that share exemplars share a token prefix (the sampler prefills it once per batch)."""
    blocks = [principles.strip(), INTRO, *(exemplar_block(e) for e in exemplars)]
    return "\n\n".join(blocks) + f"\n\n{USER} {user_turn(prompt, inp)}\n\n{THOUGHTS}"


def with_answer_marker(thoughts: str) -> str:
    """The model's thoughts followed by the answer marker: the prompt of a forced second stage."""
    return thoughts.rstrip() + f"\n\n{ANSWER}"


def parse(completion: str) -> tuple[str, str | None]:
    """(thoughts, answer) from the text after the prompt; answer is None when no answer marker follows.

    The answer is cut at the next user turn (the model may go on writing the conversation)."""
    at = completion.find(f"\n{ANSWER}")
    if at < 0:
        return completion.strip(), None
    thoughts, answer = completion[:at], completion[at + 1 + len(ANSWER):]
    cut = answer.find(f"\n{USER}")
    if cut >= 0:
        answer = answer[:cut]
    return thoughts.strip(), answer.strip()
