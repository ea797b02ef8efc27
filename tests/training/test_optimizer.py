"""The learning-rate schedule and AdamW (soft_jax.training.optimizer) against references nobody here wrote:
transformers' cosine schedule with warmup, and PyTorch's AdamW after clip_grad_norm_, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_jax.core.errors import UserError
from soft_jax.training import TrainConfig, make_optimizer, make_schedule


@pytest.mark.parametrize("total,warmup_ratio,warmup_steps", [(100, 0.03, None), (37, 0.1, None), (20, 0.0, 5)])
def test_the_schedule_is_transformers_cosine_with_warmup(total, warmup_ratio, warmup_steps):
    import torch
    import transformers

    config = TrainConfig(learning_rate=2e-5, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps)
    ours = make_schedule(config, total)
    warmup = warmup_steps if warmup_steps is not None else int(np.ceil(warmup_ratio * total))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    ref = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    np.testing.assert_allclose([float(ours(s)) for s in range(total)], want, rtol=1e-5, atol=1e-12)


def test_a_warmup_longer_than_the_run_is_refused():
    with pytest.raises(UserError, match="warmup_steps is 30"):
        make_schedule(TrainConfig(warmup_steps=30), 20)


def test_adamw_with_clipping_is_pytorchs_step_by_step():
    import torch

    config = TrainConfig(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5, b1=0.8, b2=0.99, eps=1e-6)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    grads = [{k: (3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    rates = [1e-2, 5e-3, 2e-3, 1e-3]

    tx = make_optimizer(config)  # the direction; the step multiplies it by the schedule's rate
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    for g, lr in zip(grads, rates):
        direction, state = tx.update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = jax.tree.map(lambda p, d, lr=lr: p - lr * d, ours, direction)

    ref = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=rates[0], betas=(config.b1, config.b2), eps=config.eps,
                            weight_decay=config.weight_decay)
    for g, lr in zip(grads, rates):
        for k, p in ref.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(ref.values()), config.max_grad_norm)
        opt.param_groups[0]["lr"] = lr
        opt.step()
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k].detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(np.asarray(ours["a"]), params["a"])  # the steps moved the parameters
