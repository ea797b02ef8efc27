"""The GGUF's tokenizer built without torch equals transformers' own."""

import os

import pytest


def check_tokenizer(ours, ref, texts):
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"]) == ref.decode(ref(text)["input_ids"])
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (ours.eos_token, ours.pad_token, len(ours)) == (ref.eos_token, ref.pad_token, len(ref))


@pytest.mark.slow
def test_gguf_tokenizer_without_torch_equals_transformers(tmp_path, monkeypatch):
    """Our torch-free GGUF tokenizer, as built and as loaded back from its cache, gives transformers' own GGUF
    tokenizer's ids, text and chat prompt."""

    import transformers

    from soft_jax.models import tokenizer as tokenizer_lib
    from soft_jax.models.weights import GGUFSource, smollm2_path

    monkeypatch.setenv("SOFT_JAX_CACHE", str(tmp_path))
    path = smollm2_path()
    built = GGUFSource(path).tokenizer()
    assert len(os.listdir(tmp_path / "tokenizers")) == 1
    cached = tokenizer_lib.cached_gguf(path, lambda: pytest.fail("the cached tokenizer was not used"))
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = ["Hello world", "  leading spaces\tand tabs\n\nnew lines", "Ünïcödé — 漢字 😀",
             "def f(x):\n    return x**2  # code", "<|im_start|>user\nHi<|im_end|>"]
    for ours in (built, cached):
        check_tokenizer(ours, ref, texts)
