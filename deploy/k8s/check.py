#!/usr/bin/env python3
"""Checks deploy/k8s (`make k8s-check`, part of `make test`).

1. Every resource the kustomization lists validates, strictly, against the Kubernetes API schemas
   (kubernetes-validate, offline); the KEDA ScaledObjects, which it has no schema for, are checked
   by hand below.
2. What the platform relies on holds across the files: every role runs with its own NATS identity
   (a seed item of its own name, its inbox prefix, both in nats/secure/), has liveness on /healthz
   and readiness on /readyz, resource requests and a memory limit, runs as non-root with a
   read-only root; a role with more than one replica has a PodDisruptionBudget; every
   ScaledObject scales a Deployment here on Prometheus queries with numeric thresholds; the NATS
   Helm values hand the server every public key nats/secure/accounts.conf references.

`--self-test` breaks a copy of the files in memory in each of those ways and fails unless every
break is reported.
"""

import copy
import re
import sys
from pathlib import Path

import kubernetes_validate
import yaml

K8S = Path(__file__).resolve().parent
REPO = K8S.parent.parent
KUBERNETES_VERSION = "1.30.0"
NOT_RESOURCES = {"kustomization.yaml", "nats-values.yaml"}


def load():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {}
    for name in kustomization["resources"]:
        files[name] = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    return kustomization, files, values


def schema_errors(files):
    errors = []
    for name, documents in files.items():
        for document in documents:
            what = f"{name}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
            if document.get("apiVersion", "").startswith("keda.sh/"):
                continue
            try:
                kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"{what}: {err.message} at {'.'.join(map(str, err.path))}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{what}: no Kubernetes schema for {document.get('apiVersion')}")
    return errors


def kinds(files, kind):
    return [d for docs in files.values() for d in docs if d.get("kind") == kind]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def consistency_errors(kustomization, files, values):
    errors = []
    accounts = (REPO / "nats/secure/accounts.conf").read_text()
    permissions = (REPO / "nats/secure/permissions.conf").read_text()
    present = {p.name for p in K8S.glob("*.yaml")} - NOT_RESOURCES
    listed = set(kustomization["resources"])
    if present != listed:
        errors.append(f"kustomization resources {sorted(listed)} differ from the files {sorted(present)}")

    deployments = {d["metadata"]["name"]: d for d in kinds(files, "Deployment")}
    budgets = kinds(files, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/component") != "crm-role":
            continue
        container = pod["containers"][0]
        env = env_of(container)
        what = f"deployment/{name}"
        if container.get("args") != [name]:
            errors.append(f"{what}: runs {container.get('args')}, not the {name} role")
        if env.get("CRM_NATS__NKEY_FILE") != f"/etc/crm/keys/{name}.nk":
            errors.append(f"{what}: CRM_NATS__NKEY_FILE is {env.get('CRM_NATS__NKEY_FILE')}")
        if env.get("CRM_NATS__INBOX_PREFIX") != f"_INBOX_{name}":
            errors.append(f"{what}: CRM_NATS__INBOX_PREFIX is {env.get('CRM_NATS__INBOX_PREFIX')}")
        if f"$CRM_NKEY_{name.upper()}," not in accounts:
            errors.append(f"{what}: no identity CRM_NKEY_{name.upper()} in nats/secure/accounts.conf")
        if f'"_INBOX_{name}.>"' not in permissions:
            errors.append(f"{what}: nats/secure/permissions.conf gives no role the inbox _INBOX_{name}")
        items = [
            item["key"]
            for volume in pod.get("volumes", [])
            for item in volume.get("secret", {}).get("items", [])
        ]
        if items != [f"{name}.nk"]:
            errors.append(f"{what}: mounts the seeds {items}, not its own alone")
        probes = {
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe, path in probes.items():
            got = container.get(probe, {}).get("httpGet", {}).get("path")
            if got != path:
                errors.append(f"{what}: {probe} asks {got}, not {path}")
        resources = container.get("resources", {})
        if not resources.get("requests", {}).get("cpu") or not resources.get("limits", {}).get("memory"):
            errors.append(f"{what}: needs cpu and memory requests and a memory limit")
        security = container.get("securityContext", {})
        if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation", True):
            errors.append(f"{what}: needs a read-only root and no privilege escalation")
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            errors.append(f"{what}: must run as non-root")
        if spec.get("replicas", 1) > 1 and not any(
            b["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"] for b in budgets
        ):
            errors.append(f"{what}: {spec['replicas']} replicas and no PodDisruptionBudget")

    for scaled in kinds(files, "ScaledObject"):
        what = f"scaledobject/{scaled['metadata']['name']}"
        target = scaled["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            errors.append(f"{what}: scales {target}, which is no Deployment here")
        elif scaled["spec"].get("minReplicaCount", 0) < 1:
            errors.append(f"{what}: may scale {target} to zero (a lane would wait for a cold start)")
        triggers = scaled["spec"].get("triggers", [])
        if not any("crm_forecast_ingest_rate" in t.get("metadata", {}).get("query", "") for t in triggers):
            errors.append(f"{what}: does not scale on the ingest forecast")
        for trigger in triggers:
            metadata = trigger.get("metadata", {})
            if trigger.get("type") != "prometheus" or "crm_" not in metadata.get("query", ""):
                errors.append(f"{what}: trigger {trigger.get('name')} is not a crm Prometheus query")
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", str(metadata.get("threshold", ""))):
                errors.append(f"{what}: trigger {trigger.get('name')} has no numeric threshold")

    wanted = set(re.findall(r"\$(CRM_NKEY_[A-Z_]+)", accounts))
    given = {e["name"] for e in values.get("container", {}).get("env", [])}
    if wanted - given:
        errors.append(f"nats-values.yaml: the server lacks {sorted(wanted - given)}")
    if values.get("config", {}).get("cluster", {}).get("replicas") != 3:
        errors.append("nats-values.yaml: the cluster is not 3 nodes (the streams are R3)")
    return errors


def check(kustomization, files, values):
    return schema_errors(files) + consistency_errors(kustomization, files, values)


def self_test(kustomization, files, values):
    """Every kind of break must be reported."""

    def deployment(files, name):
        return next(d for d in kinds(files, "Deployment") if d["metadata"]["name"] == name)

    def container(files, name):
        return deployment(files, name)["spec"]["template"]["spec"]["containers"][0]

    breaks = {
        "an unknown field": lambda k, f, v: deployment(f, "router")["spec"].__setitem__("bogus", 1),
        "a liveness probe on the wrong path": lambda k, f, v: container(f, "projector")["livenessProbe"]["httpGet"].__setitem__("path", "/"),
        "another role's seed": lambda k, f, v: container(f, "notifier")["env"].__setitem__(
            1, {"name": "CRM_NATS__NKEY_FILE", "value": "/etc/crm/keys/operator.nk"}),
        "no memory limit": lambda k, f, v: container(f, "gateway")["resources"].pop("limits"),
        "a missing budget": lambda k, f, v: f.__setitem__(
            "router.yaml", [d for d in f["router.yaml"] if d["kind"] != "PodDisruptionBudget"]),
        "a scaler of nothing": lambda k, f, v: kinds(f, "ScaledObject")[0]["spec"]["scaleTargetRef"].__setitem__("name", "nobody"),
        "no forecast trigger": lambda k, f, v: kinds(f, "ScaledObject")[1]["spec"].__setitem__(
            "triggers", kinds(f, "ScaledObject")[1]["spec"]["triggers"][:1]),
        "a server without a key": lambda k, f, v: v["container"].__setitem__("env", v["container"]["env"][1:]),
    }
    missed = []
    for what, apply in breaks.items():
        k, f, v = copy.deepcopy(kustomization), copy.deepcopy(files), copy.deepcopy(values)
        apply(k, f, v)
        if not check(k, f, v):
            missed.append(what)
    return missed


def main():
    kustomization, files, values = load()
    if "--self-test" in sys.argv:
        missed = self_test(kustomization, files, values)
        if missed:
            print("deploy/k8s/check.py did not notice: " + ", ".join(missed))
            return 1
        print("deploy/k8s/check.py self-test: every break noticed")
        return 0
    errors = check(kustomization, files, values)
    for error in errors:
        print(f"deploy/k8s: {error}")
    if errors:
        return 1
    count = sum(len(d) for d in files.values())
    print(f"deploy/k8s: {count} resources valid against Kubernetes {KUBERNETES_VERSION} and consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
