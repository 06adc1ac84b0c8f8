# Thin wrappers: the real entry points are `python3 scripts/dev.py demo|test`.
.PHONY: demo test bench lint chaos
demo:
	python3 scripts/dev.py demo
test:
	python3 scripts/dev.py test
bench:
	.venv/bin/python -m benchmarks.run
lint:
	python3 scripts/dev.py lint
chaos:
	.venv/bin/python scripts/chaos.py
