.PHONY: install test test-slow lint bench train-tiny

install:
	pip install -e .[test]

test:
	python -m pytest -q -m "not slow" -n 2 tests

test-slow:
	python -m pytest -q -m slow tests

lint:
	ruff check moejax tests configs

bench:
	python -m moejax.bench layer

train-tiny:
	python -m moejax.train --config configs/tiny.py --workdir runs/tiny
