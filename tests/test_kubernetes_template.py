"""The kubernetes `cuda` pool: its base job template and the GPU deployments' job variables.

``deploy/kubernetes/cuda-base-job-template.json`` is prefect-kubernetes' default template
plus a GPU limit, an emptyDir cache (the data root is in S3, the pod only caches it) and
node placement. Checked without a cluster or a Prefect server:

- the template is the installed prefect-kubernetes default plus exactly those additions,
  and passes Prefect's own work-pool check (every placeholder is a declared variable);
- ``deploy/kubernetes/job-variables.yaml`` conforms to the template's variables schema the
  way Prefect's server validates a flow run's job variables, and bad values are rejected;
- the Job that prefect-kubernetes renders from them (the worker's own configuration class)
  gets its GPU, its cache, its service account, and no AWS keys.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.schema_tools import ValidationError, is_valid_schema, validate
from prefect.utilities.templating import find_placeholders
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
TEMPLATE = DEPLOY / "cuda-base-job-template.json"
JOB_VARIABLES = DEPLOY / "job-variables.yaml"
CACHE = "/cache"
ADDED_VARIABLES = {"gpu_count", "node_selector", "tolerations"}
GPU = "nvidia.com/gpu"
# long-lived or session keys: the pod gets its AWS role from its service account (IRSA)
AWS_KEYS = re.compile(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)")


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def job_variables() -> dict[str, Any]:
    return yaml.safe_load(JOB_VARIABLES.read_text())


def _pod(job_manifest: dict[str, Any]) -> dict[str, Any]:
    return job_manifest["spec"]["template"]["spec"]


def _without_cuda_additions(job_manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with this project's additions undone: what the default should be."""
    manifest = copy.deepcopy(job_manifest)
    pod = _pod(manifest)
    for key in ("nodeSelector", "tolerations", "volumes"):
        pod.pop(key)
    container = pod["containers"][0]
    container["env"] = "{{ env }}"
    container.pop("volumeMounts")
    container["resources"]["limits"].pop(GPU)
    return manifest


class _NoAPI:
    """Stands in for the Prefect client: the template references no blocks or variables,
    so rendering it must not need the API."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"rendering the template used the Prefect API ({name})")


def _render(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest the kubernetes worker would create for a flow run with ``values``."""
    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=_NoAPI())
    )
    config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="gpu-category"))
    return config.job_manifest


def _validate_for_flow_run(template: dict[str, Any], values: dict[str, Any]) -> None:
    """Prefect server's check of a flow run's job variables: the pool's defaults overlaid
    with ``values``, required fields included (``prefect.server.api.validation``)."""
    schema = template["variables"]
    defaults = {k: p["default"] for k, p in schema["properties"].items() if "default" in p}
    validate(
        {**defaults, **values},
        schema,
        raise_on_error=True,
        preprocess=True,
        ignore_required=False,
        allow_none_with_default=True,
    )


@pytest.fixture(scope="module")
def manifest(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    return _render(template, job_variables)


def test_template_is_the_default_plus_gpu_cache_and_placement(template: dict[str, Any]) -> None:
    default = KubernetesWorker.get_default_base_job_template()
    assert template.keys() == default.keys() == {"job_configuration", "variables"}

    conf, default_conf = template["job_configuration"], default["job_configuration"]
    assert conf.keys() == default_conf.keys()
    for key in conf.keys() - {"job_manifest"}:
        assert conf[key] == default_conf[key], key
    assert _without_cuda_additions(conf["job_manifest"]) == default_conf["job_manifest"]

    variables, default_variables = template["variables"], default["variables"]
    assert variables.keys() == default_variables.keys()
    properties, default_properties = variables["properties"], default_variables["properties"]
    assert properties.keys() - default_properties.keys() == ADDED_VARIABLES
    for name, schema in default_properties.items():
        assert properties[name] == schema, name


def test_placeholders_are_declared_variables(template: dict[str, Any]) -> None:
    validate_base_job_template(template)  # what `prefect work-pool create` runs server-side
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= template["variables"]["properties"].keys()
    assert used >= ADDED_VARIABLES  # each new variable reaches the manifest
    gpu_count = template["variables"]["properties"]["gpu_count"]
    assert (gpu_count["type"], gpu_count["minimum"], gpu_count["default"]) == ("integer", 0, 1)


def test_job_variables_conform(template: dict[str, Any], job_variables: dict[str, Any]) -> None:
    is_valid_schema(template["variables"], preprocess=False)
    _validate_for_flow_run(template, {})  # the pool's defaults alone
    _validate_for_flow_run(template, job_variables)
    assert job_variables["gpu_count"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"gpu_count": -1},
        {"gpu_count": "two"},
        {"gpu_count": 1.5},
        {"node_selector": {"gpu": 1}},
        {"tolerations": "all"},
        {"image_pull_policy": "Sometimes"},
    ],
    ids=lambda bad: json.dumps(bad),
)
def test_bad_job_variables_are_rejected(
    template: dict[str, Any], job_variables: dict[str, Any], bad: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError, match=next(iter(bad))):
        _validate_for_flow_run(template, job_variables | bad)


def test_pod_gets_its_gpus(template: dict[str, Any], manifest: dict[str, Any]) -> None:
    limits = _pod(manifest)["containers"][0]["resources"]["limits"]
    assert limits == {GPU: 1}  # an int: the whole-string placeholder takes the value's type
    assert isinstance(limits[GPU], int)
    two = _render(template, {"gpu_count": 2})
    assert _pod(two)["containers"][0]["resources"]["limits"] == {GPU: 2}


def test_pod_caches_the_store_in_an_empty_dir(manifest: dict[str, Any]) -> None:
    pod = _pod(manifest)
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ANOMALY_FACTORY_CACHE"] == CACHE
    assert env["ANOMALY_FACTORY_HOME"] == CACHE  # the pull step needs a folder to enter
    # the deployment's env and Prefect's own reach the container too
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert "PREFECT__FLOW_RUN_ID" in env

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[CACHE]] == {"name": mounts[CACHE], "emptyDir": {}}
    assert all("emptyDir" in v for v in pod["volumes"])  # no shared filesystem


def test_pod_runs_as_its_service_account(
    manifest: dict[str, Any], job_variables: dict[str, Any]
) -> None:
    pod = _pod(manifest)
    assert pod["serviceAccountName"] == job_variables["service_account_name"] == "anomaly-factory"
    assert manifest["metadata"]["namespace"] == job_variables["namespace"]
    assert pod["containers"][0]["image"] == job_variables["image"]
    assert manifest["spec"]["ttlSecondsAfterFinished"] == job_variables["finished_job_ttl"]
    assert pod["nodeSelector"] == {}
    assert pod["tolerations"] == []


def test_no_aws_keys_anywhere(
    template: dict[str, Any], job_variables: dict[str, Any], manifest: dict[str, Any]
) -> None:
    for name, document in (
        ("template", template),
        ("job variables", job_variables),
        ("rendered manifest", manifest),
    ):
        assert not AWS_KEYS.search(json.dumps(document)), name
