.PHONY: install test test-slow lint bench train-tiny scaling

install:
	pip install -e .[test]

test:  # a module's tests on one worker: its module fixtures are computed once
	python -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=25 tests

test-slow:  # two workers too: most of a slow test is one compile or one process's start
	python -m pytest -q -m slow -n 2 --dist loadfile --durations=25 tests

lint:  # style, then the import layers of pyproject.toml's [tool.importlinter]
	ruff check moejax tests configs
	lint-imports

bench:
	python -m moejax.bench layer

train-tiny:
	python -m moejax.train --config configs/tiny.py --workdir runs/tiny

scaling:  # Switch scaling experiment (~13 min on 2 CPU cores): docs/scaling.md and docs/scaling.png
	pip install -q -e .[experiments]
	python -m moejax.scaling --config configs/switch_scaling.py --out docs
