"""A run's definition and record: the config, the inputs read before any weights, the work dir and its
TensorBoard events, the evaluation signals, the collapse guard and its statistics, the contamination check."""
