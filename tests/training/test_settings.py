"""TrainConfig (soft_jax.training.settings) checks itself where it is made: one line naming the field, its value and
what it must be; the packed row length."""

import pytest

from soft_jax.core.errors import UserError
from soft_jax.training import TrainConfig


@pytest.mark.parametrize("field,value,must", [
    ("order", "random", "must be shuffle | given"), ("batch_size", 0, "must be >= 1"), ("epochs", 0, "must be >= 1"),
    ("learning_rate", 0.0, "must be > 0"), ("warmup_ratio", 1.0, r"must be in \[0, 1\)"),
    ("weight_decay", -0.1, "must be >= 0"), ("max_grad_norm", -1.0, "must be >= 0"),
    ("lora_rank", -1, "must be >= 0"), ("lora_alpha", 0.0, "must be > 0"),
    ("lora_dropout", 1.0, r"must be in \[0, 1\)"), ("checkpoint_every", -1, "must be >= 0"),
])
def test_a_bad_field_is_refused_in_one_line_naming_it(field, value, must):
    with pytest.raises(UserError, match=f"^{field} = {value!r}: {must}"):
        TrainConfig(**{field: value})


def test_grad_accum_divides_the_batch_and_rows_hold_the_longest_pair():
    with pytest.raises(UserError, match=r"grad_accum = 3: must be >= 1 and divide batch_size \(8\)"):
        TrainConfig(batch_size=8, grad_accum=3)
    assert TrainConfig(max_prompt_len=100, max_response_len=28).row_len == 128
    assert TrainConfig(max_prompt_len=100, max_response_len=28, seq_len=512).row_len == 512
    with pytest.raises(UserError, match="seq_len = 127: must be at least max_prompt_len"):
        TrainConfig(max_prompt_len=100, max_response_len=28, seq_len=127)
