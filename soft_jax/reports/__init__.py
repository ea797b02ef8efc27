"""Reading finished work dirs: the report, comparisons of runs, plots."""
