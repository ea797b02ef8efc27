"""The SOFT / SOFT+ round loop and its phases: self-align, curriculum, train, evaluate, guard; sweeps of runs."""
