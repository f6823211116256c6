"""embedserve's performance benchmarks (never part of the test suite).

Run ``python -m bench.run`` with the project venv; see docs/benchmarks.md.
"""
