"""The inference engine and what runs on it.

- `engine`: the jitted prefill and decode programs, the decode state, device placement (`Batcher`), shape
  buckets and the shared-prefix machinery.
- `sampler`: generation (`generate`, `generate_tokens`, `generate_continued`).
- `scorer`: log-likelihood scoring (`score`, `score_ids`, `score_tokens`).

Nothing outside this package uses a private name of it; it imports only models, sharding, settings and errors.
"""
