# Entry points. Each target installs what it needs on a fresh Debian machine
# (run as root): the toolchain in .venv, a container engine, the host image.

.PHONY: demo demo-down test lint setup bench bench-ops bench-soak bench-down

## demo: deploy the chat to a local Debian systemd host, on https://localhost:8443/
demo:
	scripts/demo.sh up

## demo-down: remove the demo host
demo-down:
	scripts/demo.sh down

## test: lint, preflight checks, the app's tests and every Molecule scenario
test:
	scripts/test.sh all

## lint: yamllint and ansible-lint only
lint:
	scripts/test.sh lint

## setup: the toolchain, the container engine and the host image, nothing else
setup:
	bash -c 'source scripts/lib.sh && require_root && ensure_toolchain && ensure_host_image'

## bench: measure the deployed stack on a benchmark host (not part of test)
bench:
	scripts/bench.sh run

## bench-ops: time the day-two runs (fresh converge, no-change rerun, --check) on a demo host and the cluster
bench-ops:
	scripts/bench.sh ops

## bench-soak: an hour of churn on a benchmark host in the split layout, memory and descriptors per unit (DURATION=300 for a smoke run, LAYOUT=daphne|uvicorn)
bench-soak:
	scripts/bench.sh soak soak-$(or $(LAYOUT),split)-$$(date -u +%Y%m%dT%H%M) $(or $(DURATION),3600) $(or $(LAYOUT),split)

## bench-down: remove the benchmark host
bench-down:
	scripts/bench.sh down
