# Two commands for a fresh machine (no ROS, no GPU): `make demo` and `make test`.
# Both set up the environment first (scripts/setup_env.sh: quick when nothing changed).
SHELL := /bin/bash
RUN := scripts/in_env.sh

.PHONY: setup demo test lint bench-node clean

setup:
	@mkdir -p log
	@scripts/setup_env.sh

demo: setup
	@$(RUN) install/vlsi_ros/lib/vlsi_ros/demo

test: setup lint
	@$(RUN) pytest

lint: setup
	@$(RUN) ruff check .

bench-node: setup
	@$(RUN) python benchmarks/node_overhead.py

clean:
	rm -rf build install log
