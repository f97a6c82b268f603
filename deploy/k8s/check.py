#!/usr/bin/env python3
"""Render every overlay of deploy/k8s and check what it would deploy, without a cluster.

  1. Render: `kustomize build` (the pinned kustomize of scripts/install-k8s-tools.sh) and, where
     a kubectl is installed, `kubectl kustomize` too; both must give the same objects.
  2. Schemas: `kubernetes-validate --strict` against a pinned Kubernetes release for every
     built-in kind; the custom resources (cert-manager, Prometheus Operator) against their CRDs'
     schemas in schemas/, strictly too (an unknown field fails, as `kubectl apply
     --validate=strict` would).
  3. Rules the schemas cannot express: Pod Security "restricted"; requests and limits; a
     disruption budget and spreading for every replicated workload; NetworkPolicy coverage;
     references that must resolve (Services to pods and ports, Secrets to Certificates, issuers,
     claims, service accounts, ServiceMonitors to Services); the coordinator's expected worker
     count against the pools; the drain wiring of every worker pool.

usage: check.py TOOLS_DIR            (from scripts/install-k8s-tools.sh)
       check.py TOOLS_DIR --self-test  (each rule catches what it is for)
"""

import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys

KUBERNETES_VERSION = "1.32.0"
HERE = os.path.dirname(os.path.abspath(__file__))
OVERLAYS = sorted(glob.glob(os.path.join(HERE, "overlays", "*")))
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")

# Pod Security Standards, "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def render(overlay, tools):
    import yaml

    out = subprocess.run(
        [os.path.join(tools, "kustomize"), "build", overlay], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"kustomize build {overlay} failed:\n{out.stderr}")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kubectl = shutil.which("kubectl")
    if kubectl:
        k = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True)
        if k.returncode != 0:
            raise SystemExit(f"kubectl kustomize {overlay} failed:\n{k.stderr}")
        if [d for d in yaml.safe_load_all(k.stdout) if d] != docs:
            raise SystemExit(f"kubectl kustomize and kustomize build render {overlay} differently")
    return docs, out.stdout, bool(kubectl)


def strict_schema(s):
    """A CRD's structural schema as JSON Schema that refuses unknown fields."""
    if isinstance(s, list):
        return [strict_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = {k: strict_schema(v) for k, v in s.items() if not k.startswith("x-kubernetes-") or k == "x-kubernetes-int-or-string"}
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s and "additionalProperties" not in s:
        s["additionalProperties"] = False
    return s


def crd_validators():
    import jsonschema

    out = {}
    for path in glob.glob(os.path.join(HERE, "schemas", "*.json")):
        group, version, kind = os.path.basename(path)[: -len(".json")].split("_")
        schema = strict_schema(json.load(open(path)))
        # The API server fills these; a manifest may carry any metadata.
        schema["properties"]["metadata"] = {"type": "object"}
        out[(f"{group}/{version}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def validate_schemas(text, docs, crds):
    """kubernetes-validate --strict on the rendered text; the CRD schemas on custom kinds."""
    import tempfile

    errors = []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        r = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION, f.name],
            capture_output=True,
            text=True,
        )
    said = (r.stdout + r.stderr).strip()
    for line in said.splitlines():
        m = re.search(r"Couldn't find schema for kind (\S+) with api version (\S+)", line)
        if m and (m.group(2), m.group(1)) in crds:
            continue
        errors.append(f"kubernetes-validate: {line}")
    if r.returncode != 0 and not errors:
        errors.append(f"kubernetes-validate exited {r.returncode}: {said}")
    for d in docs:
        v = crds.get((d["apiVersion"], d["kind"]))
        if v:
            for e in v.iter_errors(d):
                path = ".".join(str(p) for p in e.absolute_path)
                errors.append(f"{kn(d)}: {path}: {e.message}")
    return errors


def kn(d):
    return f"{d['kind']}/{d['metadata']['name']}"


def pod_spec(d):
    if d["kind"] == "CronJob":
        return d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return d["spec"]["template"]["spec"]


def pod_labels(d):
    return d["spec"]["template"]["metadata"].get("labels", {})


def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", []) + spec.get("ephemeralContainers", [])


def selects(selector, labels):
    if selector is None:
        return False
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        has, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and val not in e["values"]) or (op == "NotIn" and val in e["values"]):
            return False
        if (op == "Exists" and not has) or (op == "DoesNotExist" and has):
            return False
    return True


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def check_restricted(d):
    """Pod Security "restricted", every control of the standard (v1.32)."""
    errs = []
    spec = pod_spec(d)
    psc = spec.get("securityContext", {})
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(f):
            errs.append(f"{f} is set")
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            errs.append(f"volume {v['name']} is {sorted(kinds)}; restricted allows {sorted(RESTRICTED_VOLUMES)}")
    if psc.get("runAsUser") == 0:
        errs.append("pod runAsUser 0")
    if psc.get("sysctls"):
        errs.append("sysctls set")
    for c in containers(spec):
        sc = c.get("securityContext", {})
        name = f"container {c['name']}"
        if sc.get("privileged"):
            errs.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            errs.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            errs.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            errs.append(f"{name}: adds capabilities {caps['add']}")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            errs.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            errs.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            errs.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost (is {seccomp})")
        if sc.get("procMount", "Default") != "Default":
            errs.append(f"{name}: procMount")
        for p in c.get("ports", []):
            if p.get("hostPort"):
                errs.append(f"{name}: hostPort {p['hostPort']}")
        se = sc.get("seLinuxOptions", psc.get("seLinuxOptions", {}))
        if se.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t") or se.get("user") or se.get("role"):
            errs.append(f"{name}: seLinuxOptions {se}")
    return errs


def check(docs):
    """Every rule on one overlay's objects; returns the violations."""
    errs = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    pdbs = by_kind.get("PodDisruptionBudget", [])
    netpols = by_kind.get("NetworkPolicy", [])
    cert_secrets = {c["spec"]["secretName"] for c in by_kind.get("Certificate", [])}
    issuers = {i["metadata"]["name"] for i in by_kind.get("Issuer", [])}

    for w in workloads:
        spec, labels, name = pod_spec(w), pod_labels(w), kn(w)
        errs += [f"{name}: Pod Security restricted: {e}" for e in check_restricted(w)]
        for c in containers(spec):
            r = c.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in r.get(kind, {}):
                        errs.append(f"{name}: container {c['name']} has no {kind}.{res}")
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                errs.append(f"{name}: image {image!r} must name a tag other than latest")
        replicas = w["spec"].get("replicas", 1)
        if replicas > 1:
            if not any(selects(p["spec"]["selector"], labels) for p in pdbs):
                errs.append(f"{name}: {replicas} replicas and no PodDisruptionBudget selects them")
            aff = spec.get("affinity", {}).get("podAntiAffinity")
            if not spec.get("topologySpreadConstraints") and not aff:
                errs.append(f"{name}: {replicas} replicas with neither anti-affinity nor topology spread")
        sa = spec.get("serviceAccountName")
        if not sa or ("ServiceAccount", sa) not in names:
            errs.append(f"{name}: service account {sa!r} is not deployed")
        if spec.get("automountServiceAccountToken") is not False:
            errs.append(f"{name}: mounts an API token it never uses (automountServiceAccountToken)")
        for v in spec.get("volumes", []):
            if "secret" in v and v["secret"]["secretName"] not in cert_secrets:
                errs.append(f"{name}: secret {v['secret']['secretName']} is made by no Certificate here")
            if "persistentVolumeClaim" in v and ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) not in names:
                errs.append(f"{name}: claim {v['persistentVolumeClaim']['claimName']} is not deployed")
            if "csi" in v and v["csi"]["driver"] == "csi.cert-manager.io":
                issuer = v["csi"].get("volumeAttributes", {}).get("csi.cert-manager.io/issuer-name")
                if issuer not in issuers:
                    errs.append(f"{name}: CSI certificate issuer {issuer!r} is not deployed")
        if not any(selects(n["spec"]["podSelector"], labels) and not n["spec"].get("ingress") for n in netpols):
            errs.append(f"{name}: no default-deny NetworkPolicy selects its pods")
        for n in netpols:
            if selects(n["spec"]["podSelector"], labels):
                for rule in n["spec"].get("ingress", []):
                    if not rule.get("from"):
                        errs.append(f"{name}: NetworkPolicy {n['metadata']['name']} lets anyone in")

    # Services reach pods, by ports the pods have.
    for s in by_kind.get("Service", []):
        sel = {"matchLabels": s["spec"].get("selector", {})}
        backs = [w for w in workloads if selects(sel, pod_labels(w))]
        if not backs:
            errs.append(f"{kn(s)}: selects no pods")
        for p in s["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            for w in backs:
                ports = [cp for c in pod_spec(w)["containers"] for cp in c.get("ports", [])]
                if not any(cp.get("name") == t or cp["containerPort"] == t for cp in ports):
                    errs.append(f"{kn(s)}: port {p['name']} targets {t!r}, which {kn(w)} does not expose")
    for m in by_kind.get("ServiceMonitor", []):
        svcs = [s for s in by_kind.get("Service", []) if selects(m["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not svcs:
            errs.append(f"{kn(m)}: selects no Service")
        for e in m["spec"]["endpoints"]:
            for s in svcs:
                if not any(p.get("name") == e["port"] for p in s["spec"]["ports"]):
                    errs.append(f"{kn(m)}: {kn(s)} has no port {e['port']!r}")
    for c in by_kind.get("Certificate", []):
        ref = c["spec"]["issuerRef"]
        if ref.get("kind", "Issuer") == "Issuer" and ref["name"] not in issuers:
            errs.append(f"{kn(c)}: issuer {ref['name']} is not deployed")

    # The control plane and the worker pools agree.
    coords = [w for w in by_kind.get("Deployment", []) if w["metadata"]["name"] == "expertmesh-coordinator"]
    pools = [w for w in by_kind.get("StatefulSet", []) if pod_labels(w).get("app.kubernetes.io/component") == "worker"]
    if len(coords) != 1:
        errs.append(f"{len(coords)} coordinator Deployments; expected one")
    if not pools:
        errs.append("no worker pool")
    for cd in coords:
        env = env_of(pod_spec(cd)["containers"][0])
        want = sum(p["spec"].get("replicas", 1) for p in pools)
        if env.get("EXPERTMESH_EXPECT_WORKERS") != str(want):
            errs.append(f"coordinator expects {env.get('EXPERTMESH_EXPECT_WORKERS')} workers; the pools run {want}")
        replicas, strategy = cd["spec"].get("replicas", 1), cd["spec"].get("strategy", {}).get("type")
        store = env.get("EXPERTMESH_STORE", "embedded")
        if replicas == 1 and store == "embedded" and strategy != "Recreate":
            errs.append("a single coordinator with an embedded store must be replaced with Recreate")
        if replicas > 1 and not store.startswith(("etcd://", "etcds://")):
            errs.append(f"{replicas} coordinators need a shared store (etcd); EXPERTMESH_STORE is {store}")
        if store.startswith("etcds://"):
            hosts = [h.rsplit(":", 1)[0].split(".")[0] for h in store[len("etcds://"):].split(",")]
            etcd = [s for s in by_kind.get("StatefulSet", []) if s["metadata"]["name"] == "expertmesh-etcd"]
            if etcd:
                members = [f"expertmesh-etcd-{i}" for i in range(etcd[0]["spec"]["replicas"])]
                if sorted(hosts) != members:
                    errs.append(f"EXPERTMESH_STORE names {hosts}; the etcd StatefulSet runs {members}")
    for p in pools:
        spec, name = pod_spec(p), kn(p)
        c = spec["containers"][0]
        env = env_of(c)
        if env.get("EXPERTMESH_WORKER_ID") != "$(POD_NAME)":
            errs.append(f"{name}: the worker id must be the pod name (stable under a StatefulSet)")
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if "drain" not in cmd:
            errs.append(f"{name}: no preStop drain")
        else:
            wait = int(cmd[cmd.index("--wait-s") + 1]) if "--wait-s" in cmd else 60
            drain = int(env.get("EXPERTMESH_DRAIN_TIMEOUT_MS", "25000")) // 1000
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace < wait + drain + 10:
                errs.append(f"{name}: terminationGracePeriodSeconds {grace} < preStop drain {wait} s + SIGTERM drain {drain} s + 10")
        for probe, path in (("startupProbe", "/health/expertmesh.v1.MoeLayer"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            got = c.get(probe, {}).get("httpGet", {})
            if got.get("path") != path or got.get("port") != "metrics":
                errs.append(f"{name}: {probe} must GET {path} on the metrics port (is {got})")
        if "EXPERTMESH_TLS_CERT" not in env:
            errs.append(f"{name}: workers run without mutual TLS")
    return errs


def self_test(docs):
    """Each rule fails on the manifest it is written against."""
    cases = [
        ("allowPrivilegeEscalation", lambda ds: pod_spec(first(ds, "StatefulSet", "worker"))["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
        ("hostPath", lambda ds: pod_spec(first(ds, "StatefulSet", "worker"))["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("runAsNonRoot", lambda ds: pod_spec(first(ds, "Deployment", "coordinator"))["securityContext"].pop("runAsNonRoot")),
        ("no limits.memory", lambda ds: pod_spec(first(ds, "StatefulSet", "worker"))["containers"][0]["resources"]["limits"].pop("memory")),
        ("no PodDisruptionBudget", lambda ds: ds.remove(first(ds, "PodDisruptionBudget", "worker"))),
        ("expects", lambda ds: first(ds, "StatefulSet", "worker")["spec"].__setitem__("replicas", 99)),
        ("preStop drain", lambda ds: pod_spec(first(ds, "StatefulSet", "worker"))["containers"][0].pop("lifecycle")),
        ("terminationGracePeriodSeconds", lambda ds: pod_spec(first(ds, "StatefulSet", "worker")).__setitem__("terminationGracePeriodSeconds", 30)),
        ("default-deny", lambda ds: ds.remove(first(ds, "NetworkPolicy", "default-deny"))),
        ("lets anyone in", lambda ds: first(ds, "NetworkPolicy", "expertmesh-worker")["spec"]["ingress"][0].pop("from")),
        ("made by no Certificate", lambda ds: ds.remove(first(ds, "Certificate", "expertmesh-coordinator"))),
        ("does not expose", lambda ds: pod_spec(first(ds, "StatefulSet", "worker"))["containers"][0]["ports"].pop()),
        ("readinessProbe", lambda ds: pod_spec(first(ds, "StatefulSet", "worker"))["containers"][0]["readinessProbe"].__setitem__("grpc", {"port": 7500})
         or pod_spec(first(ds, "StatefulSet", "worker"))["containers"][0]["readinessProbe"].pop("httpGet")),
        ("neither anti-affinity", lambda ds: pod_spec(first(ds, "Deployment", "coordinator")).pop("topologySpreadConstraints")),
        ("shared store", lambda ds: env_entry(pod_spec(first(ds, "Deployment", "coordinator"))["containers"][0], "EXPERTMESH_STORE").__setitem__("value", "embedded")),
    ]
    for says, mutate in cases:
        ds = copy.deepcopy(docs)
        mutate(ds)
        errs = check(ds)
        if not any(says in e for e in errs):
            raise SystemExit(f"self-test: breaking `{says}` went unnoticed; found only {errs}")
    # The schema side: an unknown field in a custom resource fails strictly.
    crds = crd_validators()
    cert = copy.deepcopy(first(docs, "Certificate", "expertmesh-coordinator"))
    cert["spec"]["dnsName"] = ["typo"]
    if not list(crds[(cert["apiVersion"], "Certificate")].iter_errors(cert)):
        raise SystemExit("self-test: a Certificate with an unknown field `spec.dnsName` validated")
    # ... and so does one in a built-in kind, through kubernetes-validate.
    import yaml

    broken = copy.deepcopy(docs)
    first(broken, "Service", "expertmesh-moe")["spec"]["bogus"] = 1
    errs = validate_schemas(yaml.safe_dump_all(broken), broken, crds)
    if not any("bogus" in e for e in errs):
        raise SystemExit(f"self-test: a Service with an unknown field `spec.bogus` validated: {errs}")
    print(f"self-test: {len(cases) + 2} broken manifests, each caught")


def first(docs, kind, name_part):
    return next(d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"])


def env_entry(c, name):
    return next(e for e in c["env"] if e["name"] == name)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    tools = sys.argv[1]
    crds = crd_validators()
    failed = False
    for overlay in OVERLAYS:
        docs, text, both = render(overlay, tools)
        errs = validate_schemas(text, docs, crds) + check(docs)
        rel = os.path.relpath(overlay)
        kinds = len(docs)
        if errs:
            failed = True
            print(f"FAIL {rel}: {kinds} objects")
            for e in errs:
                print(f"  {e}")
        else:
            how = "kustomize build and kubectl kustomize" if both else "kustomize build (no kubectl here)"
            print(f"ok   {rel}: {kinds} objects rendered by {how}, valid against Kubernetes {KUBERNETES_VERSION} (strict) and the CRDs, all rules hold")
        if "--self-test" in sys.argv and overlay.endswith("/mixed"):
            self_test(docs)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
