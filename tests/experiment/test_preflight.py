"""The one preflight of `soft-jax run` and `soft-jax plan`: a RunPlan from a run config, before any weight."""

import jax
import pytest
from helpers import config

from soft_jax.core.errors import UserError
from soft_jax.experiment import preflight
from soft_jax.inference import sampler
from soft_jax.models.config import ModelConfig
from soft_jax.scale import memory


def tiny():
    return ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, dtype="float32", param_dtype="float32")


def test_run_shapes_and_the_estimate_read_the_run_config():
    c = config("soft.py")
    shapes = preflight.run_shapes(c, prompt_tokens=100, prefix_tokens=60)
    e = memory.for_shapes(tiny(), shapes, (1, 1, 1))
    # sampling pads the shared prefix (60 -> 64) and each row's own part (40 -> 64) to its buckets
    assert e == memory.estimate(tiny(), mesh_shape=(1, 1, 1), train_batch=c.train.batch_size,
                                train_seq=c.train.max_prompt_len + c.train.max_response_len,
                                sample_batch=c.sampling.batch_size, sample_len=64 + 64 + c.sampling.max_new_tokens,
                                sample_new=c.sampling.max_new_tokens, sample_prefix=64, keep_base=c.rounds > 1)
    # several batches as one device batch, each with its prefix, a forced answer's slots, and a longer row
    c = c.replace("sampling", group_batches=3, force_answer=True).replace("train", seq_len=1024, grad_accum=2)
    e = memory.for_shapes(tiny(), preflight.run_shapes(c, 100, 60), (1, 1, 1))
    assert e == memory.estimate(tiny(), mesh_shape=(1, 1, 1), train_batch=c.train.batch_size, train_seq=1024,
                                grad_accum=2, sample_batch=3 * c.sampling.batch_size,
                                sample_len=64 + 64 + c.sampling.max_new_tokens,
                                sample_new=c.sampling.max_new_tokens, sample_prefix=64, sample_groups=3,
                                sample_extra=sampler.TAIL_SLOTS + c.sampling.max_new_tokens, keep_base=True)


def test_prepare_on_cpu_estimates_and_resolves_what_the_run_records():
    c = config("ablation_exemplars.py:fixed")
    assert c.exemplars.fixed_ids == ()
    p = preflight.prepare(c, jax.devices()[:1], None, compile=False)
    assert len(p.config.exemplars.fixed_ids) == c.exemplars.k  # chosen once, here, and recorded in config.json
    assert p.programs == [] and p.estimate == memory.for_shapes(p.model_config, p.shapes, (1, 1, 1))
    assert p.gen_mesh is None and dict(p.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert p.shapes == preflight.run_shapes(p.config, p.prompt_tokens, p.shared_tokens)
    assert p.prompt_tokens > p.shared_tokens > 0 and sum(p.inputs.sizes) == c.rounds * c.prompts.per_round


def test_prepare_compiles_the_rounds_programs_on_the_devices():
    logs = []
    p = preflight.prepare(config("tiny.py"), jax.devices()[:1], None, log=logs.append, name="one CPU")
    assert [x.name for x in p.programs] == ["train_step", "prefix_prefill", "prefill", "decode", "score"]
    assert all(x.total > 0 and not x.refused for x in p.programs) and p.estimate is None
    assert logs[0].startswith("[plan] ") and "on one CPU, mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in logs[0]


def test_prepare_refuses_before_any_weight():
    with pytest.raises(UserError, match="sampling.batch_size"):  # 4 rows on a mesh of 8 data shards (fake CPUs)
        preflight.prepare(config("tiny.py", "mesh.data=8"), [jax.devices()[0]] * 8, None, compile=False)
    with pytest.raises(UserError, match="max_prompt_len 2 .* leave no room"):  # cannot hold the chat format
        preflight.prepare(config("tiny.py", "train.max_prompt_len=2"), jax.devices()[:1], None, compile=False)


def test_round_counts_are_the_scoring_a_round_does(tmp_path, monkeypatch, smollm2_tokenizer):
    """What plan's round table multiplies its programs by: the relevance filter scores each answer twice (after its
    prompt and after none); difficulty scoring is skipped where the round reuses the filter's perplexities
    (response_ppl, the previous round's model generating) or counts tokens (response_length); the eval tasks'
    pairs are counted where their files are on hand, and named where not (plan downloads nothing)."""
    import types

    from helpers import INHOUSE_BIGBENCH

    from soft_jax import evaluation
    from soft_jax.data import sources

    p = types.SimpleNamespace(inputs=types.SimpleNamespace(sizes=[10, 12], validation=[0] * 5),
                              tokenizer=smollm2_tokenizer)
    monkeypatch.setenv(sources.DIR_ENV, "")
    monkeypatch.setenv(sources.ARCHIVE_ENV, "")
    monkeypatch.setenv("SOFT_JAX_CACHE", str(tmp_path / "cache"))
    c = config("soft_plus.py").replace("eval", tasks="hhh", limit=4).replace("open_ended", limit=3)
    got = preflight.round_counts(c.replace("filters", max_relevance_ratio=0.0), p)
    assert (got["prompts"], got["validation"], got["relevance"], got["difficulty"]) == (12, 5, 0, 12)
    assert got["eval"] == 0 and got["eval_missing"] == ["hhh"] and got["not_counted"] == ["3 open-ended answers"]
    on = c.replace("filters", max_relevance_ratio=1.0)
    assert preflight.round_counts(on.replace("curriculum", score="prompt_ppl"), p)["difficulty"] == 12
    reused = on.replace("curriculum", score="response_ppl").replace("", generator="previous", train_data="replace")
    assert preflight.round_counts(reused, p)["relevance"] == 24 and preflight.round_counts(reused, p)["difficulty"] == 0
    assert preflight.round_counts(c.replace("curriculum", score="response_length"), p)["difficulty"] == 0
    monkeypatch.setenv(sources.DIR_ENV, INHOUSE_BIGBENCH)
    got = preflight.round_counts(c, p)
    want = 4 * len(evaluation.load_items("hhh", 4))  # A and B in both orders, an item
    assert got["eval"] == want > 0 and got["eval_missing"] == []
