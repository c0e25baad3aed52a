"""Kubernetes CRD schemas (OpenAPI v3 structural) validated as JSON Schema, offline.

The vendored CRD schemas here (SOURCES.md) are validated after this conversion
(`k8s_to_json_schema`):
* unknown fields are errors (additionalProperties: false on every object that lists its
  properties, unless x-kubernetes-preserve-unknown-fields), which is what the API server does
  with kubectl's default --validate=strict (field validation Strict) instead of pruning them;
* `nullable: true` admits null; x-kubernetes-int-or-string admits an integer or a string;
  x-kubernetes-embedded-resource admits apiVersion/kind/metadata;
* `default` is ignored (the server fills defaults; they are not requirements);
* x-kubernetes-validations (CEL) cannot be run here: the rules that compare with oldSelf only
  matter on update; the others are re-implemented in CEL_RULES below, and any rule not in that
  table is returned as "not checked" (the tests require there be none).
metadata is `type: object` in a CRD schema; the name rules the API server applies are checked
separately (DNS-1123 subdomain).
"""

from __future__ import annotations

import copy
import json
import os
import re

import jsonschema

HERE = os.path.dirname(os.path.abspath(__file__))

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# CEL rules (no oldSelf) that appear in the vendored schemas, as Python predicates on `self`.
CEL_RULES = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda s: re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", s["metadata"]["name"]) is not None,
    "size(self.metadata.name) <= 63": lambda s: len(s["metadata"]["name"]) <= 63,
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')":
        lambda s: s == "" or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://.+$", s) is not None,
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"),
    "self >= 1": lambda s: s >= 1,
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)].filter(x, x).size() <= 1":
        lambda s: sum(k in s for k in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1,
    "!self.exists(c, c == 'node')": lambda s: "node" not in s,
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))":
        lambda s: not (s.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder"
                       and any("dependsOn" in job for job in s.get("replicatedJobs", []))),
    "self.templates.all(t, !has(t.metadata.namespace) || size(t.metadata.namespace) == 0)":
        lambda s: all(not t.get("metadata", {}).get("namespace") for t in s.get("templates", [])),
    "has(self.lastUpdatedTime)": lambda s: "lastUpdatedTime" in s,
}


def load_schema(name: str) -> dict:
    with open(os.path.join(HERE, name), encoding="utf-8") as stream:
        return json.load(stream)


def k8s_to_json_schema(schema: dict) -> dict:
    schema = copy.deepcopy(schema)

    def convert(node):
        if isinstance(node, list):
            return [convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: convert(value) for key, value in node.items() if key != "default"}
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("x-kubernetes-embedded-resource"):
            properties = node.setdefault("properties", {})
            properties.setdefault("apiVersion", {"type": "string"})
            properties.setdefault("kind", {"type": "string"})
            properties.setdefault("metadata", {"type": "object"})
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        if node.pop("nullable", False):
            if "type" in node:
                node["type"] = [node["type"], "null"]
            else:
                node = {"anyOf": [node, {"type": "null"}]}
        return node

    return convert(schema)


def cel_findings(schema: dict, instance, path="") -> tuple[list[str], set[str]]:
    """Runs the known CEL rules on the instance; returns (errors, rules not checked)."""
    errors, unchecked = [], set()
    if isinstance(schema, dict) and instance is not None:
        for rule in schema.get("x-kubernetes-validations", []):
            text = rule["rule"]
            if "oldSelf" in text:
                continue  # transition rule: only on update
            predicate = CEL_RULES.get(text)
            if predicate is None:
                unchecked.add(text)
            elif not predicate(instance):
                errors.append(f"{path or '.'}: CEL rule {text!r} fails: {rule.get('message', '')}")
        if isinstance(instance, dict):
            for key, value in instance.items():
                sub = schema.get("properties", {}).get(key)
                if sub is None and isinstance(schema.get("additionalProperties"), dict):
                    sub = schema["additionalProperties"]
                if sub is not None:
                    e, u = cel_findings(sub, value, f"{path}.{key}")
                    errors += e
                    unchecked |= u
        elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
            for index, value in enumerate(instance):
                e, u = cel_findings(schema["items"], value, f"{path}[{index}]")
                errors += e
                unchecked |= u
    return errors, unchecked


def schema_errors(schema: dict, instance, kubernetes: bool) -> tuple[list[str], set[str]]:
    json_schema = k8s_to_json_schema(schema) if kubernetes else schema
    validator_class = jsonschema.validators.validator_for(json_schema, default=jsonschema.Draft202012Validator)
    validator = validator_class(json_schema)
    errors = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "."
        message = error.message
        if error.validator == "not" and isinstance(error.schema, dict) and "x-oneof" in error.schema:
            members = " and ".join(error.schema["not"]["required"])
            message = f"{members} belong to the oneof {error.schema['x-oneof']!r}: set at most one"
        errors.append(f"{where}: {message[:300]}")
    unchecked = set()
    if kubernetes:
        cel_errors, unchecked = cel_findings(schema, instance)
        errors += cel_errors
        name = (instance.get("metadata") or {}).get("name", "")
        if not (DNS1123_SUBDOMAIN.match(name) and len(name) <= 253):
            errors.append(f".metadata.name: {name!r} is not a DNS-1123 subdomain")
    return errors, unchecked
