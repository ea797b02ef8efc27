"""The filters over self-aligned generations: each drops the failures it targets and keeps good answers.

Must-drop cases are what a small model (SmolLM2-135M) writes when it fails; must-keep cases are the shipped
exemplars, the validation responses and long, well-formed answers with lists, tables and code."""

import dataclasses

import pytest

from soft_jax import data
from soft_jax.data import filters

PRINCIPLES = data.load_principles()  # 16 principles
EXEMPLARS = data.load_exemplars()
VALIDATION = data.load_pairs()
PROMPT = "What day of the year is March 1?"
THOUGHTS = "The user asks a calendar question. Principle 11 (numerical sensitivity) applies: count the days."

# Loops seen in a SmolLM2-135M demo run and written after its failures; ~2000 characters is 512 tokens.
DATE_LOOP = ("March 1 is the 60th day of the year in a common year and the 61st in a leap year. In other words, it is "
             + "the 100th day of the 12th month of the 12th day of the 1st month of the 1st month of " * 25)[:2000]
ANSWER_IS_LOOP = 'The answer is: "' * 60
LIST_LOOP = "Here are some tips:\n" + "".join(f"{i}. Water the plant every day and keep the soil moist.\n"
                                              for i in range(1, 40))


def _ordinal(i):
    return f"{i}{'th' if 10 <= i % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(i % 10, 'th')}"


# every 4-gram holds a new number and no line repeats: only the compression test (ratio 5.0) sees this loop
COUNTING_LOOP = "It is " + " of ".join(f"the {_ordinal(i)} day of the {_ordinal(i + 1)} month" for i in range(4, 30))
PARAGRAPH = ("Exercise is good for your health. It strengthens the heart, improves your mood, and helps you sleep "
             "better. Even a short walk every day can make a big difference over time.")

# Long, normal answers with repeated structure.
RECIPE = """Here is a simple recipe for banana bread.

Ingredients:
- 3 ripe bananas
- 1/3 cup melted butter
- 3/4 cup sugar
- 1 egg, beaten
- 1 teaspoon vanilla extract
- 1 teaspoon baking soda
- a pinch of salt
- 1 1/2 cups all-purpose flour

Steps:
1. Preheat the oven to 350°F (175°C) and butter a 4x8-inch loaf pan.
2. In a mixing bowl, mash the bananas with a fork until smooth.
3. Stir the melted butter into the mashed bananas.
4. Mix in the baking soda and salt.
5. Stir in the sugar, beaten egg, and vanilla extract.
6. Mix in the flour until just combined; do not overmix.
7. Pour the batter into the prepared loaf pan.
8. Bake for 55 to 65 minutes, until a toothpick inserted in the center comes out clean.
9. Let it cool in the pan for 10 minutes, then turn it out onto a rack.
10. Slice and serve once it has cooled completely.

Tip: the riper the bananas, the sweeter and more moist the bread will be."""
_NAMES = ("Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy Rupert Sybil Trent Victor "
          "Walter Zoe Amy Ben Cal Dan Eve Fay Gus Hal Ida Jon Kim Lou Max Ned Oscar Pam Quinn Ray Sam Tom").split()
_CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome"]
TABLE = ("Here are the employees by city:\n\n| Name     | Age | City     | Salary    |\n"
         "|----------|-----|----------|-----------|\n" + "\n".join(
             f"| {n:8s} | {23 + 17 * i % 41:3d} | {_CITIES[i * 3 % 5]:8s} | {41000 + 7300 * i % 52000:>9,} |"
             for i, n in enumerate(_NAMES)))  # 40 padded rows: compression ratio 3.2
CODE = '''Here is a small class for a bank account:

```python
class BankAccount:
    def __init__(self, owner, balance=0.0):
        self.owner = owner
        self.balance = balance

    def deposit(self, amount):
        if amount <= 0:
            raise ValueError("Deposit amount must be positive.")
        self.balance += amount
        return self.balance

    def withdraw(self, amount):
        if amount <= 0:
            raise ValueError("Withdrawal amount must be positive.")
        if amount > self.balance:
            raise ValueError("Insufficient funds.")
        self.balance -= amount
        return self.balance
```

Each method checks its input first, so a negative amount or an overdraft raises a clear error.'''
WEEK = """Here is a simple weekly workout plan for a beginner:
Monday: 30 minutes of brisk walking and 10 minutes of stretching.
Tuesday: 20 minutes of bodyweight exercises (squats, push-ups, and lunges).
Wednesday: Rest or gentle yoga for 20 minutes.
Thursday: 30 minutes of brisk walking and 10 minutes of stretching.
Friday: 20 minutes of bodyweight exercises (squats, push-ups, and lunges).
Saturday: A longer walk, bike ride, or swim of 45 minutes.
Sunday: Rest.
Start slowly, drink plenty of water, and increase the time a little each week."""


def context(exemplars=(), principles=PRINCIPLES, **config):
    return filters.Context(list(exemplars), principles, filters.FilterConfig(**config))


def test_config_defaults_are_the_documented_ones():
    c = filters.FilterConfig()
    assert (c.keep_truncated, c.min_cited_principles, c.repeat_ngram, c.max_compression_ratio,
            c.min_compression_chars) == (False, 1, 4, 4.0, 200)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.min_words = 0
    assert filters.REASONS == ("no_answer_marker", "truncated", "too_short", "copies_prompt",
                               "leaked_exemplar_or_marker", "bad_principles", "repetition", "exemplar_topic",
                               "irrelevant")


def test_shipped_exemplars_and_validation_answers_are_kept():
    ctx = context()
    for e in EXEMPLARS:
        assert filters.verdict(e.answer, e.prompt, ctx, e.thoughts) is None, e.id
        assert filters.cut_repeated_sentence(e.answer) == e.answer, e.id
    # in a round's context the exemplars are the leak source: their own text is a leak, nothing else objects
    ctx = context(EXEMPLARS)
    assert {filters.verdict(e.answer, e.prompt, ctx, e.thoughts) for e in EXEMPLARS} == {"leaked_exemplar_or_marker"}
    ctx = context(min_cited_principles=0)  # validation pairs have no thoughts
    for v in VALIDATION:
        assert filters.verdict(v["response"], v["prompt"], ctx) is None, v["id"]
        assert filters.cut_repeated_sentence(v["response"]) == v["response"], v["id"]


@pytest.mark.parametrize("answer", [RECIPE, TABLE, CODE, WEEK], ids=["recipe", "table", "code", "week"])
def test_long_structured_answers_are_kept(answer):
    assert filters.verdict(answer, "q", context(), THOUGHTS) is None
    assert filters.cut_repeated_sentence(answer) == answer


@pytest.mark.parametrize("answer,reason", [
    (None, "no_answer_marker"),
    ("Yes.", "too_short"),
    ("What is the capital city of France?", "copies_prompt"),
    ("Sure. User: and another question", "leaked_exemplar_or_marker"),
    ("The answer is " + "very very very " * 10, "repetition"),
    ("line one here\nline one here\nline one here\nsomething else", "repetition"),
    ("Paris is the capital of France, and it has been for a long time.", None),
])
def test_each_filter_drops_what_it_targets(answer, reason):
    ex = [data.Exemplar("e1", "Q?", "T.", "Water boils at one hundred degrees Celsius at sea level, which "
                                       "is a standard fact taught in school")]
    ctx = context(ex, "1 (ethical). The assistant is kind and honest in everything it says.")
    assert filters.verdict(answer, "What is the capital city of France?", ctx, "Principle 1 applies.") == reason


def test_leaked_exemplar_text_and_principles_are_dropped_and_counted():
    ex = [data.Exemplar("e1", "Q?", "T.", "Water boils at one hundred degrees Celsius at sea level, which "
                                       "is a standard fact taught in school")]
    principle = "1 (ethical). The assistant is kind and honest in everything it says."
    ctx = context(ex, principle)
    leak = "Well, water boils at one hundred degrees Celsius at sea level, which is a standard fact indeed."
    assert filters.verdict(leak, "q", ctx, "Principle 1 applies.") == "leaked_exemplar_or_marker"
    assert filters.verdict("As I was told: " + principle, "q", ctx, "Principle 1 applies.") == \
        "leaked_exemplar_or_marker"
    counts = filters.counts([None, "too_short", "too_short", "no_answer_marker", "truncated", "bad_principles"])
    assert counts["kept"] == 1 and counts["too_short"] == 2 and counts["bad_principles"] == 1
    assert sum(counts.values()) == 6


def test_answers_cut_by_the_token_limit_are_dropped_unless_kept_on_purpose():
    good = EXEMPLARS[1]
    ctx = context()
    assert filters.verdict(good.answer, good.prompt, ctx, good.thoughts, "length") == "truncated"
    assert filters.verdict(good.answer, good.prompt, ctx, good.thoughts, "stop") is None
    assert filters.verdict(good.answer, good.prompt, ctx, good.thoughts, "eos") is None
    assert filters.verdict(good.answer, good.prompt, context(keep_truncated=True), good.thoughts, "length") is None
    # first after the marker check: a cut loop is counted as truncated, not as repetition
    assert filters.verdict(DATE_LOOP, PROMPT, ctx, THOUGHTS, "length") == "truncated"
    assert filters.verdict(None, PROMPT, ctx, THOUGHTS, "length") == "no_answer_marker"
    with pytest.raises(ValueError, match="finish must be one of"):
        filters.verdict(good.answer, good.prompt, ctx, good.thoughts, "max_tokens")


def test_cut_repeated_sentence_keeps_the_text_before_the_first_repeat():
    cut = filters.cut_repeated_sentence
    assert cut("Paris is the capital of France. It is famous for the Eiffel Tower. Paris is the capital of "
               "France. It is famous") == "Paris is the capital of France. It is famous for the Eiffel Tower."
    # compared lowercased, without punctuation, with collapsed whitespace; a newline ends a sentence too
    assert cut("Drink more water!\nIt keeps you healthy.\n  drink MORE   water\nSleep well.") == \
        "Drink more water!\nIt keeps you healthy."
    assert cut(PARAGRAPH + "\n\n" + PARAGRAPH + "\n\n" + PARAGRAPH) == PARAGRAPH
    # list numbers and short fragments repeat in normal answers: never a cut
    lists = "Pros:\n1. Cheap to run.\n2. Easy to learn.\nCons:\n1. Slow on big data.\n2. Few local jobs.\nYes. Yes."
    assert cut(lists) == lists
    assert cut(DATE_LOOP) == DATE_LOOP  # one sentence: the repetition filter has to catch it
    # code repeats lines on purpose: only the prose around it is cut
    code = "Use this:\n```python\nif x > 0:\n    print(x)\nif x > 0:\n    print(x)\n```\nIt prints x twice."
    assert cut(code) == code
    assert cut(code + "\nIt prints x twice.") == code


@pytest.mark.parametrize("thoughts", [
    "The user asks about dates. Principle 21 (strategic) applies: I should count.",  # the demo run's failure
    "Principles 1 (ethical), 7 (candor) and 17 (loyalty) apply.",
    "Principles 3 and 21 apply: I should be helpful.",
    "principle 42 says I should answer.",
    "I should answer helpfully and count the days.",  # cites nothing
    "",  # no thoughts at all
])
def test_thoughts_citing_no_or_nonexistent_principles_are_dropped(thoughts):
    assert filters.verdict(EXEMPLARS[1].answer, PROMPT, context(), thoughts) == "bad_principles"


@pytest.mark.parametrize("thoughts", [
    "Principle 3 (helpful) and 13 (step-by-step) apply: I should give a short list.",
    "Principles 1 (ethical), 7 (candor) apply.",
    "principle 5 applies, so I reason it through.",
    "Principle 11 (numerical sensitivity) applies: 2 cups is 16 fluid ounces, and the recipe is from 1969 "
    "(the moon landing year) and serves 24 people.",  # quantities and years are not citations
])
def test_thoughts_citing_existing_principles_are_kept(thoughts):
    assert filters.verdict(EXEMPLARS[1].answer, PROMPT, context(), thoughts) is None


def test_principle_numbers_and_citations_are_parsed():
    assert filters.principle_numbers(PRINCIPLES) == set(range(1, 17))
    assert filters.principle_numbers("Rules:\n1. Be kind.\n2) Be brief.\n3 (honest). Be honest.") == {1, 2, 3}
    assert filters.cited_principles("Principle 12 (dated knowledge), 9 (static knowledge), and 7 (candor) apply") \
        == {12, 9, 7}
    assert filters.cited_principles("Add 2 cups in 1969 (the moon landing) for 30 minutes.") == set()


def test_min_cited_principles_sets_how_many_citations_are_required():
    answer = EXEMPLARS[1].answer
    assert filters.verdict(answer, PROMPT, context(min_cited_principles=0), "") is None  # random tiny models
    assert filters.verdict(answer, PROMPT, context(min_cited_principles=0), "I will just answer.") is None
    # a non-existent number drops even without a minimum
    assert filters.verdict(answer, PROMPT, context(min_cited_principles=0), "Principle 21 applies.") == "bad_principles"
    two = context(min_cited_principles=2)
    assert filters.verdict(answer, PROMPT, two, "Principle 8 (knowledge recitation) applies.") == "bad_principles"
    assert filters.verdict(answer, PROMPT, two, "Principle 8 and 2 apply.") is None


@pytest.mark.parametrize("answer", [
    DATE_LOOP,  # the demo run's loop, here ended by the end-of-turn token
    ANSWER_IS_LOOP,
    LIST_LOOP,  # every line differs by its number
    COUNTING_LOOP,  # no repeated 4-gram nor line
    "Sure! " + PARAGRAPH + " " + PARAGRAPH + " Try to start today.",  # a paragraph repeated on one line
    PARAGRAPH + "\n" + PARAGRAPH + "\n" + PARAGRAPH,
    'The answer is: "' * 10,  # short: n-grams only
], ids=["date_loop", "answer_is", "list_numbers", "counting", "paragraph_twice", "paragraph_lines", "short_loop"])
def test_degenerate_repetition_is_dropped(answer):
    assert filters.verdict(answer, PROMPT, context(), THOUGHTS) == "repetition"


def test_compression_test_threshold_and_minimum_length():
    assert filters.compression_ratio(COUNTING_LOOP) > 4.0 > filters.compression_ratio(TABLE)
    no_ngrams = dict(max_repeated_ngram_fraction=1.0, max_line_repeats=10**6)
    assert filters.verdict(COUNTING_LOOP, PROMPT, context(**no_ngrams), THOUGHTS) == "repetition"
    assert filters.verdict(COUNTING_LOOP, PROMPT, context(max_compression_ratio=8.0), THOUGHTS) is None
    # a stricter ratio drops long tables (3.2): the default leaves room for them
    assert filters.verdict(TABLE, PROMPT, context(max_compression_ratio=3.0), THOUGHTS) == "repetition"
    short = 'The answer is: "' * 12  # 192 characters, ratio ~7: too short for the compression test by default
    assert filters.verdict(short, PROMPT, context(**no_ngrams), THOUGHTS) is None
    assert filters.verdict(short, PROMPT, context(**no_ngrams, min_compression_chars=150), THOUGHTS) == "repetition"


def test_repeat_ngram_sets_the_ngram_size():
    # the counting loop repeats its word pairs but no 4-gram: 2-grams see it, the default 4-grams do not
    no_ratio = dict(max_compression_ratio=100.0)
    assert filters.verdict(COUNTING_LOOP, PROMPT, context(**no_ratio), THOUGHTS) is None
    assert filters.verdict(COUNTING_LOOP, PROMPT, context(**no_ratio, repeat_ngram=2), THOUGHTS) == "repetition"


# --- Dromedary-2's string rules: each off unless a config turns it on -----------------------------------------

def test_dromedary2_rules_are_off_by_default():
    c = filters.FilterConfig()
    assert (c.min_chars, c.cut_repeated, c.exemplar_topics, c.max_relevance_ratio) == (0, "sentence", False, 0.0)


def test_min_chars_drops_short_answers_as_too_short():
    short = "The answer is no. It is no longer possible to make a small apartment feel more spacious."
    assert filters.verdict(short, "How can I make my small apartment feel more spacious?",
                           context(min_cited_principles=0)) is None
    ctx = context(min_chars=160, min_cited_principles=0)
    assert filters.verdict(short, "How can I make it feel bigger?", ctx) == "too_short"
    assert filters.verdict(PARAGRAPH, "A plan for exercise?", ctx) is None  # 160 characters and more: kept
    assert len(short) < 160 <= len(PARAGRAPH)


def test_the_clause_cut_stops_at_the_first_repeated_clause():
    answer = ("Water your plants in the morning, check the soil with a finger, water your plants in the morning, "
              "and rest.")
    assert filters.cut(answer, "sentence") == answer  # no sentence repeats
    assert filters.cut(answer, "clause") == "Water your plants in the morning, check the soil with a finger,"
    assert filters.cut(answer, "off") == answer
    repeat = "It is blue. It is blue."
    assert filters.cut(repeat, "sentence") == "It is blue." and filters.cut(repeat, "off") == repeat


def test_the_exemplar_topic_blacklist_is_built_from_the_runs_own_data():
    """Words in the answers of two exemplars or more and in (almost) no pool prompt; an answer using one that
    its own prompt does not use is dropped."""
    ex = [data.Exemplar(f"e{i}", "q", "", a) for i, a in enumerate([
        "The Eiffel Tower in Paris is tall, and Paris is lovely.",
        "Visit Paris in spring: the Eiffel Tower lights up at night.",
        "Cook the pasta in salted water until it is tender."])]
    pool = [f"How do I cook {x}?" for x in ("pasta", "rice", "beans", "eggs")] + ["What should I visit in Paris?"]
    words = filters.topic_words(ex, pool)
    assert {"eiffel", "tower"} <= words and "paris" not in words  # in a pool prompt: not a topic word
    assert "pasta" not in words and "water" not in words  # in one exemplar only
    ctx = filters.Context(ex, PRINCIPLES, filters.FilterConfig(exemplar_topics=True, min_words=1,
                                                                min_cited_principles=0), pool)
    assert filters.verdict("You could see the Eiffel Tower from the boat.", "Plan a boat trip.", ctx) == \
        "exemplar_topic"
    assert filters.verdict("The Eiffel Tower is 330 metres tall.", "How tall is the Eiffel Tower?", ctx) is None
    assert context(exemplars=ex).topic_words == set()  # off: nothing is built


@pytest.mark.parametrize("key,value,what", [("min_chars", -1, "an integer >= 0"),
                                            ("cut_repeated", "word", "sentence |"),
                                            ("max_relevance_ratio", 2.5, "between 0 (off) and 2.0"),
                                            ("max_relevance_ratio", -0.1, "between 0 (off)")])
def test_bad_filter_settings_are_refused_in_one_line(key, value, what):
    from soft_jax.core.errors import UserError

    with pytest.raises(UserError) as e:
        filters.FilterConfig(**{key: value})
    assert str(e.value).startswith(f"{key} = {value!r}: must be {what}") and len(str(e.value).splitlines()) == 1
