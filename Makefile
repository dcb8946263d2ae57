# Shortcuts for the commands the README gives. Each one sets up .venv first.
.PHONY: quickstart test bench bench-quick

quickstart:
	bash scripts/quickstart.sh

test:
	bash scripts/test.sh

# Every benchmark, then bench/results/summary.md (each figure beside its baseline, as a ratio).
bench:
	bash scripts/setup.sh && .venv/bin/python bench/run_all.py

bench-quick:
	bash scripts/setup.sh && .venv/bin/python bench/run_all.py --quick
