"""The self-align prompt (principles + exemplars + the user turn), parsing of what the model wrote, and the
engraving format (prompt and answer only) that SFT, scoring and evaluation use.

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
user turn. Only the answer is kept, and it is trained in the engraving format (engraving_parts below):
no principles, no exemplars, no thoughts.
"""

from __future__ import annotations

from collections.abc import Sequence

from soft_jax.data import Exemplar

INTRO = ("Below are conversations between a user and an AI assistant. Before each answer the assistant "
         "writes its internal thoughts: which principles apply and how.")
USER, THOUGHTS, ANSWER = "User:", "Assistant (internal thoughts):", "Assistant:"
# The engraving format without a chat template (with one, the tokenizer's template is the format).
PLAIN_PROMPT = "User: {prompt}\n\nAssistant: "
# Generation stops once the model starts another user turn.
STOP_STRINGS = ("\nUser:",)


def user_turn(prompt: str, inp: str = "") -> str:
    return f"{prompt}\n\n{inp}" if inp else prompt


def exemplar_block(ex: Exemplar) -> str:
    return f"{USER} {ex.prompt}\n\n{THOUGHTS} {ex.thoughts}\n\n{ANSWER} {ex.answer}"


def prefix(principles: str, exemplars: Sequence[Exemplar]) -> str:
    """Everything before the user turn: the principles, the intro and the exemplars."""
    return "\n\n".join([principles.strip(), INTRO, *(exemplar_block(e) for e in exemplars)]) + "\n\n"


def self_align_prompt(principles: str, exemplars: Sequence[Exemplar], prompt: str, inp: str = "") -> str:
    """The generation prompt. The principles part is the same for every prompt, and prompts that share
    exemplars share a longer token prefix: the sampler prefills a batch's common prefix once."""
    return prefix(principles, exemplars) + f"{USER} {user_turn(prompt, inp)}\n\n{THOUGHTS}"


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


def engraving_parts(tokenizer, prompt: str, response: str, finished: bool = True) -> tuple[str, str, bool]:
    """(prompt text, response text, whether the texts carry their own special tokens).

    finished=False: a response cut by the token limit, which must not learn to end there: the response text
    stops after the response, without the end-of-turn token(s) (Dromedary trains truncated answers so)."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        tail = full[len(head):] if full.startswith(head) else response + (tokenizer.eos_token or "")
        at = tail.rfind(response) if response else -1
        if not finished and at >= 0:
            tail = tail[:at + len(response)]
        return head, tail, True
    return PLAIN_PROMPT.format(prompt=prompt), response + ((tokenizer.eos_token or "") if finished else ""), False
