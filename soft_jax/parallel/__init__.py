"""Meshes and logical-axis sharding rules, multi-host start-up, compile-only TPU/GPU topologies, and reading
compiled HLO."""
