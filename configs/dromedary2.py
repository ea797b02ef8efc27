"""SOFT with Dromedary-2's engraving: QLoRA on a frozen NF4 base, as SALMON's
`training/step3_principle_engraving/scripts/finetune_dromedary2_70b_sft.sh` (IBM/SALMON) fine-tunes Llama-2-70B.

    soft-jax run --config configs/dromedary2.py --workdir runs/dromedary2 --config.model.name=llama2-7b \
        --config.model.path=/path/to/Llama-2-7b-hf

What it takes from that script: 4-bit NF4 with double quantization (`--quant_type nf4 --double_quant True
--bits 4`), LoRA rank 64 (`--lora_r 64`), learning rate 1e-4 with a cosine schedule and 3% warmup, no weight
decay, one epoch, 512 + 512 tokens per example (`--source_max_len 512 --target_max_len 512`), a batch of 128
(4 per GPU x 4 accumulation steps x 8 GPUs), bf16 compute. The script does not set lora_alpha; its trainer
(finetune_qlora.py, from QLoRA's qlora.py) defaults to 16, used here, with no dropout. LoRA targets every
projection of the layers, as QLoRA does.

What it takes from Dromedary-2's merge script (IBM/Dromedary, `merge_and_fileter_self_align_with_dummy.py`), which
filtered its self-aligned data with string rules: answers under 160 characters are dropped, an answer is cut at its
first repeated clause, and words of the in-context exemplars' topics that leak into answers are blacklisted (here
built from the run's own exemplars and prompt pool). Its prompt-echo rule is the default copies_prompt filter; its
self-identification prefix and identity data are not taken (the engraving format has no such prefix). Everything
else (rounds, exemplars, guard, evaluation) is configs/soft.py's.
"""

from soft_jax.experiment.config import sibling


def get_config(arg=None):
    config = sibling(__file__, "soft.py", arg)
    config.model.update(quant="nf4", dtype="bfloat16", param_dtype="float32")  # float32 adapters: their Adam updates
    config.train.update(lora_rank=64, lora_alpha=16.0, learning_rate=1e-4, warmup_ratio=0.03, weight_decay=0.0,
                        epochs=1, batch_size=128, max_prompt_len=512, max_response_len=512)
    config.filters.update(min_chars=160, cut_repeated="clause", exemplar_topics=True)
    return config
