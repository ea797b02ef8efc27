"""soft-jax: SOFT and SOFT+ bootstrapped self-alignment of language models in JAX/Flax."""

__version__ = "0.1.0"
