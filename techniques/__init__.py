"""The science: pure functions and classes on numpy arrays, one parameter model per technique.

Nothing here imports Prefect or touches files; each module is testable alone.
"""
