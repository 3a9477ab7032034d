"""Cut a KubeRay CRD's schema down to the fields a manifest uses, for an offline schema check.

Usage::

    python deploy/schema/crd_subset.py ray.io_rayclusters.yaml deploy/kuberay-cluster.yaml \\
        --source "ray-project/kuberay@<commit>" > deploy/schema/raycluster-v1.subset.json

The CRD file is ``ray-operator/config/crd/bases/ray.io_rayclusters.yaml`` of ray-project/kuberay.
The subset keeps, for every field the manifest's RayCluster documents set, the CRD's own schema
(type, enum, pattern, required, maps), drops descriptions, and closes every object that the CRD
does not leave open (``additionalProperties: false``): a field the CRD does not define, or one
added to the manifest after the subset was cut, fails `tests/unit/test_deploy.py` until the subset
is regenerated from the CRD.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

_STRUCTURE = ("description", "properties", "items", "additionalProperties")


def _strip(schema: Any) -> Any:
    """``schema`` without descriptions."""
    if isinstance(schema, dict):
        return {k: _strip(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_strip(v) for v in schema]
    return schema


def subset(schema: dict[str, Any], instances: list[Any]) -> dict[str, Any]:
    """The part of ``schema`` that validates ``instances`` (values found at the same path).

    Objects keep the properties some instance sets and are closed unless the CRD leaves them
    open; maps (``additionalProperties``) and leaves keep their full schema.
    """
    out = {k: _strip(v) for k, v in schema.items() if k not in _STRUCTURE}
    objects = [i for i in instances if isinstance(i, dict)]
    if "properties" in schema:
        keys = sorted({k for o in objects for k in o if k in schema["properties"]})
        out["properties"] = {
            k: subset(schema["properties"][k], [o[k] for o in objects if k in o]) for k in keys
        }
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if "additionalProperties" in schema:
        out["additionalProperties"] = _strip(schema["additionalProperties"])
    if "items" in schema:
        items = [x for i in instances if isinstance(i, list) for x in i]
        out["items"] = subset(schema["items"], items) if items else {}
    return out


def crd_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """The ``openAPIV3Schema`` of one served version of a CRD document."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
            return schema
    raise ValueError(f"CRD {crd['metadata']['name']} has no version {version!r}")


def main(argv: list[str] | None = None) -> int:
    """Print the subset of the CRD's schema that the manifest's documents of its kind use."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--source", default="", help="where the CRD came from (recorded)")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    kind = crd["spec"]["names"]["kind"]
    docs = [d for d in yaml.safe_load_all(args.manifest.read_text()) if d and d["kind"] == kind]
    if not docs:
        raise SystemExit(f"{args.manifest} has no {kind}")
    out = {
        "$comment": f"{kind} v1 schema fields used by {args.manifest.name}, cut from "
        f"{args.source or args.crd.name} by deploy/schema/crd_subset.py",
        **subset(crd_schema(crd), docs),
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
