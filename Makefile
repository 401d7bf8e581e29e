# make demo — the main job, end to end, on this machine (no AWS account, no device)
# make test — the whole test suite
# Both do all set-up on a fresh Debian/Ubuntu machine: mosquitto from apt, a venv at .venv/.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo docker-demo test bench setup system-deps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,train,emulator]'
	touch $(STAMP)

setup: system-deps $(STAMP)

system-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
		echo "installing mosquitto (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; }
	@$(PY) -c 'import ensurepip, venv' >/dev/null 2>&1 || { \
		echo "installing python3-venv (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@command -v openssl >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
		echo "installing chromium and chromium-driver (apt-get), for the dashboard's browser test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@{ [ -x /usr/sbin/dockerd ] && command -v docker-compose >/dev/null 2>&1 && [ -x /usr/sbin/debootstrap ]; } || { \
		echo "installing docker.io, docker-compose and debootstrap (apt-get), for make docker-demo and tests/test_docker.py"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null; }

demo: setup
	$(BIN)/gateway demo

# The demo in containers: base image from debootstrap (cached in var/docker/), our own dockerd
# with host networking only, images built from docker/Dockerfile, docker-compose.yml's demo service.
docker-demo: setup
	$(BIN)/python -m emulator.docker demo

test: setup
	$(BIN)/pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/gateway bench

clean:
	rm -rf $(VENV) var build greengrass-build
