# The two commands a new machine needs: `make demo` and `make test`. Both install what they need first.
.PHONY: demo test lint bench docs setup serve

setup:
	@scripts/bootstrap.sh

demo: setup
	.venv/bin/python examples/qa_app.py --threads 2 demo

serve: setup  # the server and its page over the demo collection (added on first use) at http://127.0.0.1:8000
	.venv/bin/adaskip-rag --threads 2 serve --chroma-path .chroma --demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

bench: setup
	.venv/bin/python benchmarks/bench_engine.py
