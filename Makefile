# The two commands of the README. Both create and reuse .venv (see scripts/setup.sh).
.PHONY: setup demo test test-fast lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/tasprune demo

test: setup
	.venv/bin/python -m pytest -q -m "slow or not slow"
	.venv/bin/ruff check .

test-fast: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .

clean:
	rm -rf .venv .pytest_cache .ruff_cache
