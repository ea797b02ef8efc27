"""Shared benchmark inputs: a SOFT-style prompt batch (principles + exemplars prefix, then the question); the
host's CPU model, printed beside every figure."""

import os
import platform
import subprocess


def cpu_model() -> str:
    """`lscpu`'s model name and the logical CPU count (figures move between CPUs of the same size)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{name}, {os.cpu_count()} logical CPUs"


def markdown_table(rows) -> str:
    """A Markdown table of dict rows (columns: the first row's keys, in order)."""
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines)


PRINCIPLES = [
    "Ethical: refuse to help with harm, illegal acts or deception, and say why.",
    "Informative: give accurate, relevant facts, not filler.",
    "Helpful: answer the question that was asked, completely and directly.",
    "Question assessment: first work out what the user really needs.",
    "Reasoning: lay out logical steps before a conclusion.",
    "Multi-aspect: cover the sides of a question that matter.",
    "Candor: admit what you do not know; never invent facts.",
    "Knowledge recitation: recall relevant facts before answering.",
    "Static knowledge: say when facts may have changed since training.",
    "Clarification: ask when a request is ambiguous.",
    "Numerical sensitivity: check arithmetic and units.",
    "Dated knowledge: note the date your knowledge ends.",
    "Step by step: break complex tasks into ordered steps.",
    "Balanced perspectives: present several views on contested topics.",
    "Creative: write stories, poems and jokes when asked, with craft.",
    "Operational: follow format and length instructions exactly.",
]
EXEMPLARS = [
    ("How do I boil an egg?", "The user wants cooking steps; principles 3 and 13 apply.",
     "Place the egg in boiling water for 7 to 9 minutes, then cool it in cold water before peeling."),
    ("Who will win the next election?", "This asks for a prediction I cannot know; principles 7 and 14 apply.",
     "I cannot know that. Polls and analysts offer estimates, but outcomes are uncertain until votes are counted."),
    ("What is 17 times 23?", "Arithmetic; principle 11 applies, so I will compute carefully.",
     "17 x 23 = 17 x 20 + 17 x 3 = 340 + 51 = 391."),
    ("Write a two-line poem about rain.", "A creative request; principle 15 applies.",
     "Soft rain taps the window's glass,\nwhispering that storms will pass."),
    ("How can I pick a lock to get into my neighbour's house?", "This could enable a crime; principle 1 applies.",
     "I can't help with entering someone else's home. If you are locked out of your own, call a licensed locksmith."),
    ("Explain photosynthesis briefly.", "A science question; principles 2 and 8 apply.",
     "Plants use light energy to turn carbon dioxide and water into glucose and oxygen, in their chloroplasts."),
]
QUESTIONS = [
    "What are good habits for sleep?", "How does a refrigerator work?", "Give me a haiku about autumn.",
    "What is the capital of Australia?", "How should I prepare for a job interview?", "Explain recursion simply.",
    "Is it safe to eat raw cookie dough?", "What causes the seasons?", "Suggest a name for a bakery.",
    "How do vaccines work?", "Translate 'good morning' into French.", "What is a prime number?",
    "How can I save money on groceries?", "Why is the sky blue?", "Summarise the plot of Cinderella.",
    "What is the boiling point of water at altitude?",
]


def soft_prompts(n: int = 16, target_prefix_tokens: int = 1000, tokenizer=None) -> list[str]:
    """n self-align prompts sharing a principles + exemplars prefix of about target_prefix_tokens tokens."""
    head = "# Principles\n" + "".join(f"{i}. {p}\n" for i, p in enumerate(PRINCIPLES, 1)) + "\n# Examples\n"
    blocks = [f"User: {q}\nAssistant internal thoughts: {t}\nAssistant: {a}\n\n" for q, t, a in EXEMPLARS]
    prefix, i = head, 0
    while tokenizer is not None and len(tokenizer(prefix)["input_ids"]) < target_prefix_tokens:
        prefix += blocks[i % len(blocks)]
        i += 1
    return [f"{prefix}User: {q}\nAssistant internal thoughts:" for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]]


def in_fresh_processes(cases, fn):
    """Yields (case, fn(*case)) for each case, each computed in a freshly spawned process (compiled 7-8B
    programs add up in one process's memory); a case whose process dies is reported on stderr and skipped."""
    import multiprocessing
    import sys

    context = multiprocessing.get_context("spawn")
    for case in cases:
        queue = context.Queue()
        child = context.Process(target=_run_into, args=(fn, case, queue))
        child.start()
        child.join()
        if child.exitcode:  # killed (out of memory) or failed: say which, keep the others
            print(f"# {' '.join(map(str, case))}: the process ended with exit code {child.exitcode}", file=sys.stderr)
            continue
        yield case, queue.get()


def _run_into(fn, case, queue) -> None:
    queue.put(fn(*case))
