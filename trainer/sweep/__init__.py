"""Scaling-law sweeps after the runs: the fit (fit.py), its pictures (plots.py) and the sweep report (report.py).

numpy, scipy and matplotlib only (never torch or ray); the CLI imports these inside its command functions, never
on start-up, and the planner (trainer/plan, stdlib only) never imports them.
"""
