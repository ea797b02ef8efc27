"""`plan` and memory: will a round compile, fit and how fast can it run on a slice, decided by compiling it."""
