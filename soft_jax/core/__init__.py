"""The base every layer stands on: user errors, atomic file writes, fault points, preemption, the settings
dataclasses, the compilation cache."""
