"""The deployment configs in cluster/: Ray's cluster-launcher schema for aws.yaml, KubeRay's CRDs (their
required fields, transcribed below) for the manifests, and this project's rules: entrypoints that exist,
credentials only from Kubernetes Secrets or instance roles, and servers on 127.0.0.1 unless listed below."""

import copy
import importlib
import re
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LOOPBACK = "127.0.0.1"

# --- KubeRay's CRDs, transcribed by hand (the CRD files are not copied here) ---------------------------
# Required fields of the ray.io/v1 openAPIV3Schema in ray-project/kuberay at commit
# feeaf72facab4881ba2b179248bb67315634e229, ray-operator/config/crd/bases/ray.io_rayclusters.yaml,
# ray.io_rayjobs.yaml and ray.io_rayservices.yaml: RayClusterSpec requires headGroupSpec; HeadGroupSpec
# requires template; each workerGroupSpecs item requires groupName, minReplicas, maxReplicas and template;
# a pod template's spec requires containers, each container a name; RayService's spec requires
# rayClusterConfig; RayJob's spec requires nothing. "[]" stands for every item of a list (an absent list has
# none: a list that must exist has its own entry). template.spec is listed because KubeRay refuses a group
# without containers (ray-operator/controllers/ray/utils/validation.go, ValidateRayClusterSpec).
STR_MAP = "map of strings"  # rayStartParams: additionalProperties {type: string}, so "0" and never 0
CLUSTER_REQUIRED = {
    "headGroupSpec": dict,
    "headGroupSpec.template": dict,
    "headGroupSpec.template.spec": dict,
    "headGroupSpec.template.spec.containers": list,
    "headGroupSpec.template.spec.containers[].name": str,
    "workerGroupSpecs[].groupName": str,
    "workerGroupSpecs[].minReplicas": int,
    "workerGroupSpecs[].maxReplicas": int,
    "workerGroupSpecs[].template": dict,
    "workerGroupSpecs[].template.spec": dict,
    "workerGroupSpecs[].template.spec.containers": list,
    "workerGroupSpecs[].template.spec.containers[].name": str,
}
CLUSTER_TYPES = {  # checked where present
    "rayVersion": str,
    "enableInTreeAutoscaling": bool,
    "authOptions.mode": ("disabled", "token"),
    "headGroupSpec.serviceType": str,
    "headGroupSpec.rayStartParams": STR_MAP,
    "workerGroupSpecs": list,
    "workerGroupSpecs[].replicas": int,
    "workerGroupSpecs[].rayStartParams": STR_MAP,
}


def under(prefix: str, fields: dict) -> dict:
    return {f"{prefix}.{path}": kind for path, kind in fields.items()}


REQUIRED = {
    "RayCluster": {"spec": dict, **under("spec", CLUSTER_REQUIRED)},
    # rayClusterSpec is optional in the CRD, but validation.go wants it or a clusterSelector; ours are inline
    "RayJob": {"spec": dict, "spec.rayClusterSpec": dict, **under("spec.rayClusterSpec", CLUSTER_REQUIRED)},
    "RayService": {"spec": dict, "spec.rayClusterConfig": dict, **under("spec.rayClusterConfig", CLUSTER_REQUIRED)},
}
TYPES = {
    "RayCluster": under("spec", CLUSTER_TYPES),
    "RayJob": {**under("spec.rayClusterSpec", CLUSTER_TYPES), "spec.entrypoint": str, "spec.runtimeEnvYAML": str,
               "spec.submissionMode": str, "spec.shutdownAfterJobFinishes": bool,
               "spec.ttlSecondsAfterFinished": int},
    "RayService": {**under("spec.rayClusterConfig", CLUSTER_TYPES), "spec.serveConfigV2": str},
}
CLUSTER_AT = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}
# Ours on top of the CRDs: a job says what it runs and cleans up after itself; a service says what it serves.
OURS = {"RayJob": {"spec.entrypoint": str, "spec.submissionMode": str, "spec.shutdownAfterJobFinishes": bool},
        "RayService": {"spec.serveConfigV2": str}}
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)  # validation.go: authOptions.mode token needs rayVersion >= 2.52.0

# --- Binds other than 127.0.0.1, each with the reason; anything not listed must stay on loopback ---------
# KubeRay defaults a head's dashboard-host to 0.0.0.0 (common/pod.go setMissingRayStartParams) and Ray Serve
# its http_options.host to 0.0.0.0 (ray.serve.schema.HTTPOptionsSchema), so both must be written out.
BIND_EXCEPTIONS = {
    ("RayJob", "llm-ray-pipeline", "dashboard-host"):
        "the operator polls and stops the job, and the K8sJobMode submitter pod submits it, through the head "
        "Service <cluster>-head-svc:8265 (rayjob_controller.go, utils/util.go FetchHeadServiceURL, common/job.go)",
    ("RayService", "llm-ray-serve", "dashboard-host"):
        "the operator deploys serveConfigV2 and reads the apps' status through the head Service "
        "<cluster>-head-svc:8265 (rayservice_controller.go, utils/util.go FetchHeadServiceURL)",
    ("RayService", "llm-ray-serve", "http_options.host"):
        "the serve Service sends requests to the pods' IPs, and the operator checks the head's proxy at "
        "http://<pod IP>:8000/-/healthz (rayservice_controller.go, utils/util.go GetRayHttpProxyClientFunc)",
}
# Labels KubeRay puts on every Ray pod whatever the template says (common/pod.go labelPod).
KUBERAY_POD_LABELS = {"head": {"ray.io/node-type": "head"}, "worker": {"ray.io/node-type": "worker"}}

SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY")
JOB_SCRIPT = re.compile(r"(?<![\w.-])(?:/app/)?jobs/([\w-]+\.py)")


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_docs(path)]


def ray_manifests() -> list[dict]:
    return [doc for _, doc in manifests() if doc.get("kind") in REQUIRED]


MISSING = object()


def resolve(tree, path: str) -> list[tuple[str, object]]:
    """(concrete path, value) for every match of a dotted path ("a.b[].c"); value is MISSING where the last
    key is absent. Nothing is returned below an absent or mistyped parent: its own entry reports it."""
    found = [("", tree)]
    for part in path.split("."):
        key, many = part.removesuffix("[]"), part.endswith("[]")
        step = []
        for where, node in found:
            if node is MISSING or not isinstance(node, dict):
                continue
            here = f"{where}.{key}" if where else key
            value = node.get(key, MISSING)
            if not many:
                step.append((here, value))
            elif isinstance(value, list):
                step += [(f"{here}[{i}]", item) for i, item in enumerate(value)]
        found = step
    return found


def type_problem(value, kind) -> str | None:
    if kind is STR_MAP:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return None if ok else "must map names to strings (quote numbers and booleans)"
    if isinstance(kind, tuple):
        return None if value in kind else f"must be one of {list(kind)}"
    ok = type(value) is int if kind is int else isinstance(value, kind)  # bool is not an int here
    return None if ok else f"must be a {kind.__name__}, got {type(value).__name__}"


def kuberay_problems(doc: dict) -> list[str]:
    """Every way the manifest falls short of KubeRay's CRD and validation.go, and of OURS; [] when none."""
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: must be ray.io/v1, got {doc.get('apiVersion')!r}")
    if not (isinstance(name, str) and re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name)):
        problems.append(f"metadata.name: must be a DNS-1035 label, got {name!r}")
    for path, expected in {**REQUIRED[kind], **OURS.get(kind, {})}.items():
        for where, value in resolve(doc, path):
            why = "required field missing" if value is MISSING else type_problem(value, expected)
            if why:
                problems.append(f"{where}: {why}")
    for path, expected in TYPES[kind].items():
        for where, value in resolve(doc, path):
            if value is not MISSING and (why := type_problem(value, expected)):
                problems.append(f"{where}: {why}")
    at = CLUSTER_AT[kind]
    groups = resolve(doc, at + ".headGroupSpec.template.spec.containers")
    groups += resolve(doc, at + ".workerGroupSpecs[].template.spec.containers")
    for where, containers in groups:
        if containers == []:  # validation.go: a group needs at least one container
            problems.append(f"{where}: needs at least one container")
        for i, container in enumerate(containers if isinstance(containers, list) else []):
            # the CRD leaves image optional, but no pod starts without one
            if not (isinstance(container, dict) and isinstance(container.get("image"), str) and container["image"]):
                problems.append(f"{where}[{i}].image: required field missing")
    for where, group in resolve(doc, at + ".workerGroupSpecs[]"):
        if not isinstance(group, dict):
            continue
        lo, n, hi = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if all(type(v) is int for v in (lo, hi)) and not lo <= (n if type(n) is int else lo) <= hi:
            problems.append(f"{where}: needs minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
    cluster = next((v for _, v in resolve(doc, at) if isinstance(v, dict)), {})
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        version = tuple(int(x) for x in re.findall(r"\d+", str(cluster.get("rayVersion", "")))[:3])
        if version < MIN_RAY_FOR_TOKEN_AUTH:
            problems.append(f"{at}.rayVersion: authOptions.mode token needs Ray >= 2.52.0, "
                            f"got {cluster.get('rayVersion')!r}")
    return [f"{kind} {name}: {p}" for p in problems]


def containers_of(tree):
    """Every container and init container anywhere in a manifest."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers_of(value)
    elif isinstance(tree, list):
        for item in tree:
            yield from containers_of(item)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(node type, pod template) of the head and of each worker group."""
    at = CLUSTER_AT[doc["kind"]]
    heads = [("head", t) for _, t in resolve(doc, at + ".headGroupSpec.template")]
    return heads + [("worker", t) for _, t in resolve(doc, at + ".workerGroupSpecs[].template")]


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


# --- KubeRay manifests ------------------------------------------------------------------------------------

def test_manifests_meet_kuberay_crds_and_validation():
    kinds = {doc["kind"] for doc in ray_manifests()}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    for doc in ray_manifests():
        assert kuberay_problems(doc) == []


def test_checker_names_a_removed_required_field():
    job = next(copy.deepcopy(d) for d in ray_manifests() if d["kind"] == "RayJob")
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-cpus": 0}
    assert kuberay_problems(job) == [
        "RayJob llm-ray-pipeline: spec.rayClusterSpec.headGroupSpec.template: required field missing",
        "RayJob llm-ray-pipeline: spec.rayClusterSpec.workerGroupSpecs[0].groupName: required field missing",
        ("RayJob llm-ray-pipeline: spec.rayClusterSpec.workerGroupSpecs[0].rayStartParams: must map names to "
         "strings (quote numbers and booleans)"),
    ]
    service = next(copy.deepcopy(d) for d in ray_manifests() if d["kind"] == "RayService")
    del service["spec"]["rayClusterConfig"]
    assert kuberay_problems(service) == ["RayService llm-ray-serve: spec.rayClusterConfig: required field missing"]


def test_entrypoints_name_scripts_in_jobs():
    named = {m for path in CLUSTER.rglob("*") if path.is_file() for m in JOB_SCRIPT.findall(path.read_text())}
    assert named and sorted(n for n in named if not (ROOT / "jobs" / n).is_file()) == []
    job = next(d for d in ray_manifests() if d["kind"] == "RayJob")
    # the image holds the project at /app (cluster/README.md), and the script puts it on sys.path
    assert re.match(r"python /app/jobs/[\w-]+\.py\b", job["spec"]["entrypoint"])


def test_credentials_come_only_from_secrets():
    for path, doc in manifests():
        for container in containers_of(doc):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
                    assert "value" not in env and ref.get("name") and ref.get("key"), (path.name, env["name"])
        runtime_envs = [yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")] if doc["kind"] == "RayJob" else []
        if doc["kind"] == "RayService":
            runtime_envs += [app.get("runtime_env") or {} for app in serve_config(doc)["applications"]]
        for runtime_env in runtime_envs:  # the dashboard shows a job's runtime_env to whoever opens it
            assert [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)] == [], path.name


def test_servers_bind_loopback_unless_listed():
    used = set()
    for doc in ray_manifests():
        kind, name = doc["kind"], doc["metadata"]["name"]
        binds = {"dashboard-host": [p.get("dashboard-host") for _, p in
                                    resolve(doc, CLUSTER_AT[kind] + ".headGroupSpec.rayStartParams")]}
        if kind == "RayService":
            binds["http_options.host"] = [(serve_config(doc).get("http_options") or {}).get("host")]
        for what, hosts in binds.items():
            assert hosts and None not in hosts, f"{kind} {name}: set {what} explicitly (the default is 0.0.0.0)"
            if (kind, name, what) in BIND_EXCEPTIONS:
                used.add((kind, name, what))
                cluster = resolve(doc, CLUSTER_AT[kind])[0][1]
                assert cluster["authOptions"]["mode"] == "token", f"{kind} {name}: {what} off loopback needs token auth"
            else:
                assert set(hosts) == {LOOPBACK}, f"{kind} {name}: {what} {hosts}"
        assert (resolve(doc, CLUSTER_AT[kind] + ".headGroupSpec.serviceType")[0][1]) in (MISSING, "ClusterIP")
    assert used == set(BIND_EXCEPTIONS), "an exception no manifest needs any more: remove it"


def test_network_policies_cover_every_pod_bound_off_loopback():
    policies = [doc for _, doc in manifests() if doc.get("kind") == "NetworkPolicy"]
    for policy in policies:
        assert policy["apiVersion"] == "networking.k8s.io/v1" and "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without 'from' admits everyone"
            for peer in rule["from"]:
                assert (peer.get("ipBlock") or {}).get("cidr") not in ("0.0.0.0/0", "::/0")
                if "ports" not in rule:  # all ports: only from the Ray pods of the same namespace
                    assert set(peer) == {"podSelector"}, policy["metadata"]["name"]
    selectors = [policy["spec"]["podSelector"]["matchLabels"].items() for policy in policies]
    for doc in ray_manifests():
        if any(key[:2] == (doc["kind"], doc["metadata"]["name"]) for key in BIND_EXCEPTIONS):
            for node_type, template in pod_templates(doc):
                labels = {**template["metadata"]["labels"], **KUBERAY_POD_LABELS[node_type]}
                assert any(sel <= labels.items() for sel in selectors), (doc["metadata"]["name"], node_type)


def test_serve_config_is_rays_and_llm_rays():
    from ray.serve.schema import ServeDeploySchema

    from llm_ray.config.serve import ServeConfig

    service = next(d for d in ray_manifests() if d["kind"] == "RayService")
    config = serve_config(service)
    ServeDeploySchema.model_validate(config)  # what the operator's PUT to the dashboard is checked against
    mounts = [{m["mountPath"] for m in c.get("volumeMounts", [])} for c in containers_of(service)]
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        # Fields only: the checkpoint's files are checked by build_app on the cluster, which needs a real one.
        args = ServeConfig.model_validate(app["args"])
        if args.engine == "builtin":  # a local folder (checkpoint.find_model_dir), on every pod: replicas and the
            checkpoint = Path(args.checkpoint)  # app's build run wherever Ray places them
            assert checkpoint.is_absolute()
            assert all(any(checkpoint.is_relative_to(m) for m in paths) for paths in mounts), args.checkpoint


def test_ray_versions_match_this_install():
    for doc in ray_manifests():
        assert resolve(doc, CLUSTER_AT[doc["kind"]] + ".rayVersion")[0][1] == ray.__version__


# --- aws.yaml: Ray's cluster launcher ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def validated(config: dict) -> dict:
    """What `ray up` does before launching anything: defaults filled in (prepare_config), then Ray's schema
    (ray/autoscaler/ray-schema.json) through validate_config (autoscaler/_private/commands.py _bootstrap_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_config_passes_rays_schema(aws):
    prepared = validated(aws)
    assert prepared["provider"]["type"] == "aws" and prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_config_with_an_unknown_key_fails_rays_schema(aws):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        validated({**aws, "max_worker": 4})


def test_aws_head_keeps_the_dashboard_on_loopback_with_token_auth(aws):
    head, workers = aws["head_start_ray_commands"], aws["worker_start_ray_commands"]
    assert any("ray start --head" in c and f"--dashboard-host={LOOPBACK}" in c for c in head)
    for commands in (head, workers):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)
    every_command = [c for key in aws if key.endswith("_commands") for c in aws[key]]
    assert not [c for c in every_command if "0.0.0.0" in c]
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token every node checks


def test_aws_gpu_workers_and_credentials(aws):
    gpu_types = {name: t for name, t in aws["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types and aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= aws["max_workers"]
    for t in aws["available_node_types"].values():  # S3 through instance roles
        assert t["node_config"]["IamInstanceProfile"]
    text = (CLUSTER / "aws.yaml").read_text()
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)", text)
    assert not re.search(r"WANDB_API_KEY=(?!\"?\$\()", text)  # only from a secret manager, never a literal


def test_aws_setup_installs_the_project(aws):
    project_dir = next(remote for remote, local in aws["file_mounts"].items() if local == ".")
    setup = aws["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*torch --index-url \S+/cu\d+", c))
    project_at = next(i for i, c in enumerate(setup) if re.search(rf"pip install .*-e {re.escape(project_dir)}$", c))
    assert torch_at < project_at  # the CUDA build first, or pip keeps whatever torch it finds
    assert any(f"ray[default,train,data,tune,serve]=={ray.__version__}" in c for c in setup)
