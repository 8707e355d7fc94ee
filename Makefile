# Two commands: `make run` serves, `make test` tests. Both install first.
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := python3.11
UV ?= uv

.PHONY: install run test lint format bench clean

install:
	@command -v $(UV) >/dev/null || python3 -m pip install --quiet uv
	$(UV) sync --frozen

run: install
	$(UV) run centime serve

test: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run pytest

lint: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .

# The benchmark: BENCH_SECONDS (default 20) per scenario; see docs/performance.md.
bench: install
	$(UV) run --group bench python -m bench

format: install
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

clean:
	rm -rf .venv .pytest_cache .ruff_cache
