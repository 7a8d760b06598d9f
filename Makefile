# The two commands of the README. Both create and reuse .venv (see scripts/setup.sh).
.PHONY: setup demo test lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/tasprune flops resnet56

test: setup
	.venv/bin/python -m pytest -q
	.venv/bin/ruff check .

lint: setup
	.venv/bin/ruff check .

clean:
	rm -rf .venv .pytest_cache .ruff_cache
