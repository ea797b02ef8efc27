"""The inference engine and what runs on it.

- `engine`: the jitted prefill and decode programs, the decode state, device placement (`Batcher`), shape
  buckets and the shared-prefix machinery.
- `sampler`: generation: `Sampler` -> `SampleOutput`; `generate`, `generate_tokens` over it.
- `scorer`: log-likelihood scoring: `Scorer` -> `ScoreOutput`; `score`, `score_tokens` over it; `score_ids`.

Nothing outside this package uses a private name of it; it imports only models, sharding, settings and errors.
"""
