"""Executable checks of theory/ E2, E3 and E5: each prints a table, writes a PNG and a JSON.

    .venv/bin/python -m theory.checks.sam_optimality [--quick]
    .venv/bin/python -m theory.checks.regularisation [--quick]
    .venv/bin/python -m theory.checks.stability [--quick]
"""
