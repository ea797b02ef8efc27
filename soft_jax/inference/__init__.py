"""The inference engine and what runs on it.

- `engine`: the jitted prefill and decode programs, the decode state, device placement (`Batcher`), shape
  buckets and the shared-prefix machinery.
- `sampler`: generation: `SamplingConfig`, `Sampler` -> `SampleOutput`; `generate`, `generate_tokens` over it.
- `scorer`: log-likelihood scoring: `Scorer` -> `ScoreOutput`; `score`, `score_tokens` over it; `score_ids`.

Nothing outside this package uses a private name of it; it imports only models, sharding and errors. Its
objects are this package's names: `soft_jax.inference.Sampler`, ...
"""

from soft_jax.inference.sampler import SampleOutput, Sampler, SamplingConfig, generate, generate_tokens
from soft_jax.inference.scorer import ScoreOutput, Scorer, score, score_tokens

__all__ = ["SampleOutput", "Sampler", "SamplingConfig", "ScoreOutput", "Scorer", "generate", "generate_tokens", "score",
           "score_tokens"]
