"""The GPU image and the cluster manifest agree with pyproject.toml: every version the image pins
satisfies the project's requirement for that package, the training and serving stack is pinned,
vLLM's own pins hold, and the cluster runs the project's image with the image's Ray."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
CLUSTER = REPO / "docker" / "ray-cluster.yaml"
# Packages whose versions decide whether training, generation and sweeps work together.
STACK = {
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "vllm",
    "ray",
    "bitsandbytes",
    "datasets",
    "pydantic",
    "openai",
    "wandb",
}
# vLLM's own requirements (from the vllm 0.33.0 wheel's metadata): the image must meet them.
VLLM_REQUIRES = {"0.33.0": ["torch==2.14.0", "transformers>=5.16.1,<5.21.0", "pydantic>=2.12.0"]}


def image_pins(text: str) -> dict[str, tuple[str, set[str]]]:
    """package -> (version, extras), from `ARG NAME=version` and `"pkg[extras]==${NAME}"`."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    pins: dict[str, tuple[str, set[str]]] = {}
    for name, extras, arg in re.findall(r'"([\w.-]+)(?:\[([\w,]+)\])?==\$\{(\w+)\}"', text):
        version = args[arg]
        key = canonicalize_name(name)
        previous = pins.get(key)
        assert previous is None or previous[0] == version, f"{name} pinned twice, differently"
        pins[key] = (version, set(extras.split(",")) if extras else set())
    return pins


def project_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    out: dict[str, Requirement] = {}
    for r in reqs:
        out.setdefault(canonicalize_name(r.name), r)
    return out


def pin_problems(pins: dict[str, tuple[str, set[str]]], reqs: dict[str, Requirement]) -> list[str]:
    problems = [f"{p} is not pinned" for p in sorted(STACK) if canonicalize_name(p) not in pins]
    for name, (version, extras) in sorted(pins.items()):
        req = reqs.get(name)
        if req is None:
            problems.append(f"{name}: pinned, but pyproject.toml does not require it")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{name}=={version} is outside pyproject's {req}")
        elif not req.extras <= extras:
            problems.append(f"{name} lacks the extras {sorted(req.extras - extras)}")
    return problems


def test_every_image_pin_satisfies_pyproject() -> None:
    pins = image_pins(DOCKERFILE.read_text(encoding="utf-8"))
    assert pin_problems(pins, project_requirements()) == []


def test_a_disagreeing_pin_is_caught() -> None:
    good = DOCKERFILE.read_text(encoding="utf-8")
    reqs = project_requirements()
    newer = good.replace("ARG TORCH=2.14.0", "ARG TORCH=2.16.0")
    assert pin_problems(image_pins(newer), reqs) == [
        "torch==2.16.0 is outside pyproject's torch<2.15,>=2.11"
    ]
    stray = good + '\nARG LEFTPAD=1.0\nRUN pip install "leftpad==${LEFTPAD}"\n'
    assert pin_problems(image_pins(stray), reqs) == [
        "leftpad: pinned, but pyproject.toml does not require it"
    ]
    plain_ray = good.replace("ray[data,default,tune,train,serve]==", "ray==")
    assert pin_problems(image_pins(plain_ray), reqs) == [
        "ray lacks the extras ['data', 'default', 'serve', 'train', 'tune']"
    ]
    with pytest.raises(KeyError):
        image_pins('RUN pip install "torch==${NOPE}"')


def test_image_meets_vllms_own_pins() -> None:
    pins = image_pins(DOCKERFILE.read_text(encoding="utf-8"))
    vllm = pins["vllm"][0]
    assert vllm in VLLM_REQUIRES, f"record vllm {vllm}'s requirements in VLLM_REQUIRES"
    for raw in VLLM_REQUIRES[vllm]:
        req = Requirement(raw)
        assert req.specifier.contains(Version(pins[canonicalize_name(req.name)][0])), raw


def test_cluster_runs_the_projects_image_and_ray() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    docs = list(yaml.safe_load_all(CLUSTER.read_text(encoding="utf-8")))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    ray_pin = image_pins(DOCKERFILE.read_text(encoding="utf-8"))["ray"][0]
    assert cluster["spec"]["rayVersion"] == ray_pin
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert {c["image"] for c in containers} == {f"emmoe-dist:{project['version']}"}
    for c in containers:  # checkpoints, sweeps and the judge cache live on shared storage
        assert "/shared" in {m["mountPath"] for m in c["volumeMounts"]}
