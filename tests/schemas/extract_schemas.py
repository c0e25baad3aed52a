"""Rebuilds the vendored JSON schemas in this directory from upstream sources (offline).

Not a test and not run by pytest. It reads bare git snapshots of the upstream repositories
(`git show <commit>:<path>`, no work tree needed) and writes the *.json files next to it;
SOURCES.md records what each file came from. Usage:

    python tests/schemas/extract_schemas.py \
        --trainer  /path/to/kubeflow/trainer.git \
        --jobset   /path/to/kubernetes-sigs/jobset.git \
        --googleapis /path/to/googleapis/googleapis.git

Needs PyYAML. Two kinds of extraction:

* CRDs (Kubeflow Trainer v2, Training Operator v1 TFJob, JobSet): the
  `spec.versions[name=<v>].schema.openAPIV3Schema` object of the CustomResourceDefinition,
  copied unchanged (descriptions included) as JSON. It is an OpenAPI v3 *structural* schema,
  not a JSON Schema document: see crd.py for how it is validated.
* Vertex AI CustomJobSpec: no CRD or JSON schema is published, so google.cloud.aiplatform.v1
  proto messages are converted to a JSON Schema (draft 2020-12) by proto_to_json_schema()
  below, following the proto3 JSON mapping (https://protobuf.dev/programming-guides/json/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))

# (output file, repository key, ref, path in repository, CRD version name)
CRDS = [
    ("trainjob.trainer.kubeflow.org_v1alpha1.json", "trainer", "8c0f5059bd51ec3ba6d6a6a7b2e1471de7bc13b3",
     "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
    ("trainingruntime.trainer.kubeflow.org_v1alpha1.json", "trainer", "8c0f5059bd51ec3ba6d6a6a7b2e1471de7bc13b3",
     "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml", "v1alpha1"),
    ("jobset.x-k8s.io_v1alpha2.json", "jobset", "f22e565ac3cc3265c7c45ef67ecffdc689af5d77",  # tag v0.12.0
     "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml", "v1alpha2"),
    ("tfjob.kubeflow.org_v1.json", "trainer", "4445c12aa62e4345b0c2c6ac9b215a70eca46ed7",  # tag v1.9.4
     "manifests/base/crds/kubeflow.org_tfjobs.yaml", "v1"),
]

GOOGLEAPIS_COMMIT = "f8291d2b89f0017ab078a4c7378069bae5686f6f"
AIPLATFORM = "google/cloud/aiplatform/v1/"
PROTO_FILES = ["custom_job.proto", "machine_resources.proto", "env_var.proto", "io.proto",
               "reservation_affinity.proto", "service_networking.proto", "accelerator_type.proto"]


def git_show(git_dir: str, ref: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{ref}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def crd_schema(text: str, version: str) -> dict:
    (crd,) = [doc for doc in yaml.safe_load_all(text) if doc]
    assert crd["kind"] == "CustomResourceDefinition", crd["kind"]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


# --- proto -> JSON Schema ------------------------------------------------------------------

TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z_][\w.]*|-?\d+|[{}\[\]()<>;=,]')


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_proto(text: str) -> tuple[dict, dict]:
    """Messages and enums of a proto file: {name: [field, ...]}, {name: [value names]}.

    A field is a dict: name, type, repeated, oneof (or None), behaviors (google.api.field_behavior
    values), deprecated. Nested messages/enums are registered under their simple name and also
    under Outer.Inner. Enough for the aiplatform v1 files used here, not a general parser.
    """
    tokens = TOKEN.findall(strip_comments(text))
    messages: dict[str, list] = {}
    enums: dict[str, list] = {}
    position = 0

    def skip_block():  # tokens[position] == "{"
        nonlocal position
        depth = 0
        while True:
            token = tokens[position]
            position += 1
            if token == "{":
                depth += 1
            elif token == "}":
                depth -= 1
                if depth == 0:
                    return

    def options() -> tuple[list[str], bool]:
        """Parses [ ... ] after a field; returns field_behavior values and deprecated."""
        nonlocal position
        behaviors, deprecated, depth = [], False, 0
        while True:
            token = tokens[position]
            position += 1
            if token == "[":
                depth += 1
            elif token == "]":
                depth -= 1
                if depth == 0:
                    return behaviors, deprecated
            elif token == "google.api.field_behavior":
                # ( google.api.field_behavior ) = VALUE
                behaviors.append(tokens[position + 2])
            elif token == "deprecated" and tokens[position] == "=" and tokens[position + 1] == "true":
                deprecated = True
            elif token == "{":  # resource_reference = { ... }
                position -= 1
                skip_block()

    def parse_enum(name: str):
        nonlocal position
        assert tokens[position] == "{"
        position += 1
        values = []
        while tokens[position] != "}":
            if tokens[position] in ("option", "reserved"):
                while tokens[position] != ";":
                    position += 1
                position += 1
                continue
            value = tokens[position]
            position += 3  # NAME = NUMBER
            deprecated = False
            if tokens[position] == "[":
                _, deprecated = options()
            assert tokens[position] == ";", (name, value, tokens[position])
            position += 1
            values.append((value, deprecated))
        position += 1
        enums[name] = values

    def parse_message(name: str, prefix: str = ""):
        nonlocal position
        assert tokens[position] == "{"
        position += 1
        fields = []
        oneof = None
        while True:
            token = tokens[position]
            if token == "}":
                position += 1
                if oneof is not None:  # end of a oneof block (it holds only fields)
                    oneof = None
                    continue
                break
            if token in ("message", "enum"):
                inner = tokens[position + 1]
                position += 2
                if token == "message":
                    parse_message(inner, prefix + name + ".")
                else:
                    parse_enum(inner)
                    enums[prefix + name + "." + inner] = enums[inner]
                continue
            if token == "oneof":
                oneof = tokens[position + 1]
                position += 3  # oneof NAME {
                continue
            if token in ("option", "reserved", "extensions"):
                while tokens[position] != ";":
                    position += 1
                position += 1
                continue
            repeated = False
            if token in ("repeated", "optional"):
                repeated = token == "repeated"
                position += 1
            if tokens[position] == "map":
                # map < K , V > name = N
                key_type, value_type = tokens[position + 2], tokens[position + 4]
                field_type = ("map", key_type, value_type)
                position += 6
            else:
                field_type = tokens[position]
                position += 1
            field_name = tokens[position]
            position += 3  # name = NUMBER
            behaviors, deprecated = [], False
            if tokens[position] == "[":
                behaviors, deprecated = options()
            assert tokens[position] == ";", (name, field_name, tokens[position:position + 5])
            position += 1
            fields.append({"name": field_name, "type": field_type, "repeated": repeated, "oneof": oneof,
                           "behaviors": behaviors, "deprecated": deprecated})
        messages[name] = fields
        if prefix:
            messages[prefix + name] = fields

    while position < len(tokens):
        token = tokens[position]
        if token == "message":
            position += 2
            parse_message(tokens[position - 1])
        elif token == "enum":
            position += 2
            parse_enum(tokens[position - 1])
        elif token == "service":
            position += 2
            skip_block()
        else:
            position += 1
    return messages, enums


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


INT_RANGES = {"int32": (-2**31, 2**31 - 1), "sint32": (-2**31, 2**31 - 1), "sfixed32": (-2**31, 2**31 - 1),
              "uint32": (0, 2**32 - 1), "fixed32": (0, 2**32 - 1),
              "int64": (-2**63, 2**63 - 1), "sint64": (-2**63, 2**63 - 1), "sfixed64": (-2**63, 2**63 - 1),
              "uint64": (0, 2**64 - 1), "fixed64": (0, 2**64 - 1)}


def scalar_schema(proto_type: str) -> dict | None:
    if proto_type == "string":
        return {"type": "string"}
    if proto_type == "bool":
        return {"type": "boolean"}
    if proto_type in ("double", "float"):
        return {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]}
    if proto_type == "bytes":
        return {"type": "string", "contentEncoding": "base64"}
    if proto_type in INT_RANGES:
        low, high = INT_RANGES[proto_type]
        # proto3 JSON: parsers accept a number or a decimal string (64-bit values are printed as strings)
        return {"anyOf": [{"type": "integer", "minimum": low, "maximum": high},
                          {"type": "string", "pattern": r"^-?[0-9]+$"}], "x-proto-type": proto_type}
    if proto_type == "google.protobuf.Duration":
        return {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "x-proto-type": proto_type}
    return None


def proto_to_json_schema(messages: dict, enums: dict, root: str, title: str) -> dict:
    definitions: dict[str, dict] = {}

    def resolve(type_name: str, scope: str) -> tuple[str, str]:
        """('message'|'enum', name) for a type used inside message `scope`."""
        for candidate in (f"{scope}.{type_name}", type_name, type_name.split(".")[-1]):
            if candidate in messages:
                return "message", candidate
            if candidate in enums:
                return "enum", candidate
        raise KeyError(f"{scope}: unknown type {type_name}")

    def field_schema(field: dict, scope: str) -> dict:
        proto_type = field["type"]
        if isinstance(proto_type, tuple):  # map<K, V>: a JSON object
            value = scalar_schema(proto_type[2]) or ref(*resolve(proto_type[2], scope))
            schema = {"type": "object", "additionalProperties": value}
        else:
            schema = scalar_schema(proto_type) or ref(*resolve(proto_type, scope))
        if field["repeated"]:
            schema = {"type": "array", "items": schema}
        notes = [b for b in field["behaviors"] if b not in ("REQUIRED",)]
        if notes:
            schema = {**schema, "x-field-behavior": notes}
        if "OUTPUT_ONLY" in field["behaviors"]:
            schema["readOnly"] = True
        if field["deprecated"]:
            schema["deprecated"] = True
        return schema

    def ref(kind: str, name: str) -> dict:
        key = name.replace(".", "_")
        if key not in definitions:
            definitions[key] = {}  # placeholder against recursion
            if kind == "enum":
                values = enums[name]
                definitions[key] = {"type": "string", "enum": [v for v, _ in values],
                                    "x-deprecated-values": [v for v, d in values if d]}
            else:
                definitions[key] = message_schema(name)
        return {"$ref": f"#/$defs/{key}"}

    def message_schema(name: str) -> dict:
        properties, required, oneofs = {}, [], {}
        for field in messages[name]:
            json_name = camel(field["name"])
            properties[json_name] = field_schema(field, name)
            if "REQUIRED" in field["behaviors"] and field["oneof"] is None:
                required.append(json_name)
            if field["oneof"]:
                oneofs.setdefault(field["oneof"], []).append(json_name)
        schema = {"type": "object", "properties": properties, "additionalProperties": False,
                  "x-proto-message": f"google.cloud.aiplatform.v1.{name}"}
        if required:
            schema["required"] = required
        constraints = []
        for oneof_name, members in oneofs.items():
            # at most one member of a oneof may be set
            for i, first in enumerate(members):
                for second in members[i + 1:]:
                    constraints.append({"not": {"required": [first, second]}, "x-oneof": oneof_name})
        if constraints:
            schema["allOf"] = constraints
        return schema

    root_schema = message_schema(root)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **root_schema,
            "$defs": dict(sorted(definitions.items()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", default="/work/.mirror/kubeflow+trainer/repo")
    parser.add_argument("--jobset", default="/work/.mirror/kubernetes-sigs+jobset/repo")
    parser.add_argument("--googleapis", default="/work/.mirror/googleapis+googleapis/repo")
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args()
    repos = {"trainer": args.trainer, "jobset": args.jobset}

    for out, repo, ref, path, version in CRDS:
        schema = crd_schema(git_show(repos[repo], ref, path), version)
        with open(os.path.join(args.out, out), "w", encoding="utf-8") as stream:
            json.dump(schema, stream, indent=1, sort_keys=False)
            stream.write("\n")
        print(f"{out}: {repo}@{ref}:{path} version {version}")

    messages, enums = {}, {}
    for name in PROTO_FILES:
        file_messages, file_enums = parse_proto(git_show(args.googleapis, GOOGLEAPIS_COMMIT, AIPLATFORM + name))
        messages.update(file_messages)
        enums.update(file_enums)
    schema = proto_to_json_schema(
        messages, enums, "CustomJobSpec",
        title=f"Vertex AI google.cloud.aiplatform.v1.CustomJobSpec (proto3 JSON mapping), from "
              f"googleapis/googleapis@{GOOGLEAPIS_COMMIT}")
    out = "vertex_ai_customjobspec_v1.json"
    with open(os.path.join(args.out, out), "w", encoding="utf-8") as stream:
        json.dump(schema, stream, indent=1)
        stream.write("\n")
    print(f"{out}: googleapis@{GOOGLEAPIS_COMMIT}:{AIPLATFORM}{{{','.join(PROTO_FILES)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
