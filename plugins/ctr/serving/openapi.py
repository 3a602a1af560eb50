"""The OpenAPI 3.1 document of the scoring API (served at /openapi.json; the contract tests run from it).

tests/integration/test_serving_contract.py runs schemathesis against the live service's copy: every
operation must answer only the status codes, content types and bodies listed here, never a 5xx, and
accept what the request schemas call valid (they are exact where JSON Schema can say it: labels 0/1,
8-hex categoricals, integers within +/-2^53, whole Criteo TSV lines).
"""

from __future__ import annotations

from ctr.schema import CAT_COLUMNS, INT_COLUMNS

_ROW = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{c: {"type": ["integer", "null"], "minimum": -(2**53), "maximum": 2**53} for c in INT_COLUMNS},
        **{c: {"type": ["string", "null"], "pattern": "^[0-9a-fA-F]{8}$"} for c in CAT_COLUMNS},
        "label": {"type": ["integer", "null"], "enum": [0, 1, None]},
    },
}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "row": {"type": "integer"}, "field": {"type": "string"}},
          "required": ["error"]}
_ERR_RESPONSES = {str(s): {"description": d, "content": {"application/json": {"schema": _ERROR}}}
                  for s, d in [(400, "malformed body"), (401, "missing or wrong token"), (404, "no such route"),
                               (405, "wrong method"), (408, "body not received in time"), (413, "body, row or candidate count over the limit"),
                               (415, "unsupported content type"), (422, "invalid rows: names row and field")]}
_ERR_BODY = {"application/json": {"schema": _ERROR}}
# 503: the batch lane's queue is full or a lane worker died (big bodies only); retry after a second
_BUSY = {"503": {"description": "batch lane busy or restarted; retry", "content": _ERR_BODY,
                 "headers": {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}}}}
# A raw Criteo line as ctr serve's fast paths read it: label (0, 1 or empty), 13 integers, 26 categoricals
# (8 hex digits), tab-separated, any of them empty. (The service also pads short lines and reads other
# spellings through the general reader; the document states the plain form.)
_TSV_LINE = r"(0|1)?(\t(-?[0-9]{1,15})?){13}(\t([0-9a-fA-F]{8})?){26}"
_TSV = {"schema": {"type": "string", "pattern": f"^({_TSV_LINE}\\n)*{_TSV_LINE}\\n?$"}}

_ADMIN_403 = {"description": "no admin token configured and the client is not on loopback", "content": _ERR_BODY}
_DRILL = {"type": "object", "additionalProperties": False,
          "properties": {"latency_ms": {"type": "number", "minimum": 0, "maximum": 60000},
                         "error_rate": {"type": "number", "minimum": 0, "maximum": 1}}}
_CANDIDATE = {"type": "object", "required": ["model_version", "bundle", "mode", "canary_percent", "drill", "since"],
              "properties": {"model_version": {"type": "string"}, "bundle": {"type": "string"},
                             "mode": {"enum": ["canary", "shadow"]}, "canary_percent": {"type": ["number", "null"]},
                             "drill": _DRILL, "since": {"type": "number"}, "champion": {"type": "string"}}}

OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {"title": "ctr scoring service", "version": "1"},
    "paths": {
        "/v1/score": {
            "post": {
                "summary": "Click probabilities for rows of Criteo features",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"type": "object", "required": ["rows"], "additionalProperties": False,
                                                     "properties": {"rows": {"type": "array", "items": _ROW}}}},
                    "text/tab-separated-values": _TSV,
                    "text/plain": _TSV,
                }},
                "responses": {"200": {"description": "probabilities in row order", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["model_version", "probabilities"],
                    "properties": {"model_version": {"type": "string"},
                                   "probabilities": {"type": "array", "items": {"type": "number"}}}}}}},
                              **_ERR_RESPONSES, **_BUSY},
            }
        },
        "/v1/rank": {
            "post": {
                "summary": "Rank a user's candidate items: the top k by click probability (descending, ties in input "
                           "order). The row scored for a candidate is the context merged with the candidate; a field "
                           "in both is a 422 unless override is 'candidate'. At most CTR_RANK_MAX_CANDIDATES "
                           "candidates (413 beyond); errors name the field and, as row, the candidate's index.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["candidates"], "additionalProperties": False, "properties": {
                        "context": {**_ROW, "description": "fields shared by every candidate (the user's, the page's)"},
                        "candidates": {"type": "array", "items": {
                            **_ROW, "required": ["id"],
                            "properties": {**_ROW["properties"], "id": {
                                "oneOf": [{"type": "string", "minLength": 1, "maxLength": 256},
                                          {"type": "integer", "minimum": -(2**53), "maximum": 2**53}],
                                "description": "the caller's item id, echoed back; unique within the request"}}}},
                        "k": {"type": ["integer", "null"], "minimum": 1, "description": "how many to return (default all)"},
                        "override": {"type": ["string", "null"], "enum": ["candidate", None],
                                     "description": "'candidate': a candidate's field wins over the context's"},
                    }}}}},
                "responses": {"200": {"description": "the top k, best first", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["model_version", "items"],
                    "properties": {"model_version": {"type": "string"},
                                   "items": {"type": "array", "items": {
                                       "type": "object", "required": ["id", "probability"],
                                       "properties": {"id": {"type": ["string", "integer"]},
                                                      "probability": {"type": "number", "minimum": 0, "maximum": 1}}}}}}}}},
                              **_ERR_RESPONSES},
            }
        },
        "/invocations": {
            "post": {
                "summary": "MLflow scoring protocol (dataframe_split or dataframe_records); NaN = missing",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                    {"type": "object", "required": ["dataframe_split"], "additionalProperties": False, "properties": {
                        "dataframe_split": {"type": "object", "required": ["columns", "data"], "properties": {
                            "columns": {"type": "array", "uniqueItems": True,
                                        "items": {"enum": [*INT_COLUMNS, *CAT_COLUMNS, "label"]}},
                            "data": {"type": "array", "items": {"type": "array"}},
                            "index": {"type": "array"}}},
                        "params": {"type": "object"}}},
                    {"type": "object", "required": ["dataframe_records"], "additionalProperties": False, "properties": {
                        "dataframe_records": {"type": "array", "items": _ROW}, "params": {"type": "object"}}},
                ]}}}},
                "responses": {"200": {"description": "predictions in row order", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["model_version", "predictions"],
                    "properties": {"model_version": {"type": "string"},
                                   "predictions": {"type": "array", "items": {"type": "number"}}}}}}},
                              **_ERR_RESPONSES, **_BUSY},
            }
        },
        "/healthz": {"get": {"summary": "liveness (no auth)", "responses": {"200": {"description": "alive", "content": {
            "application/json": {"schema": {"type": "object", "required": ["status"],
                                            "properties": {"status": {"const": "ok"}}}}}}}}},
        "/readyz": {"get": {"summary": "readiness: model version, digest, bundle, loaded_at, fast paths (no auth)",
                            "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": {
                                "type": "object",
                                "required": ["status", "model_version", "digest", "bundle", "loaded_at", "loaded_at_iso",
                                             "fast_paths"],
                                "properties": {"status": {"const": "ready"}, "model_version": {"type": "string"},
                                               "digest": {"type": "string"}, "bundle": {"type": "string"},
                                               "loaded_at": {"type": "number"}, "loaded_at_iso": {"type": "string"},
                                               "fast_paths": {"type": "object",
                                                              "additionalProperties": {"type": "boolean"}},
                                               "compiled_predictor": {"enum": ["off", "compiling", "ready", "failed"]}}}}}}}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition format 0.0.4, by prometheus_client (no auth)",
                             "responses": {"200": {"description": "metrics; see docs/serving.md", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3.1",
                                                                                   "content": {"application/json": {
                                                                                       "schema": {"type": "object"}}}}}}},
        "/admin/load": {
            "post": {
                "summary": "hot swap: load, probe-check and switch to another bundle (admin token, or loopback only)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["bundle"],
                    "properties": {"bundle": {"type": "string", "minLength": 1}}}}}},
                "responses": {"200": {"description": "switched", "content": {"application/json": {"schema": {
                                  "type": "object", "required": ["model_version", "previous"],
                                  "properties": {"model_version": {"type": "string"}, "previous": {"type": "string"}}}}}},
                              "403": {"description": "no admin token configured and the client is not on loopback",
                                      "content": _ERR_BODY},
                              "409": {"description": "bundle refused; the old one keeps serving", "content": _ERR_BODY},
                              **_ERR_RESPONSES},
            }
        },
        # the candidate beside the champion (serving/traffic.py, docs/rollout.md); admin token, or loopback only
        "/admin/candidate": {
            "post": {
                "summary": "load a canary or shadow beside the champion, or (bundle omitted) re-weight the loaded one",
                "description": "A canary needs canary_percent when it is loaded (a rule across fields: without it "
                               "the answer is a 422 naming canary_percent).",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"bundle": {"type": "string", "minLength": 1},
                                   "mode": {"enum": ["canary", "shadow"]},
                                   "canary_percent": {"type": "number", "minimum": 0, "maximum": 100},
                                   "drill": {"anyOf": [{"type": "null"}, _DRILL]}}}}}},
                "responses": {"200": {"description": "loaded or re-weighted", "content": {"application/json": {
                                  "schema": _CANDIDATE}}},
                              "403": _ADMIN_403,
                              "409": {"description": "bundle refused, or no candidate to re-weight; nothing changed",
                                      "content": _ERR_BODY},
                              **_ERR_RESPONSES},
            }
        },
        "/admin/promote": {"post": {"summary": "make the candidate the champion (100% of traffic)", "responses": {
            "200": {"description": "promoted", "content": {"application/json": {"schema": {
                "type": "object", "required": ["model_version", "previous"],
                "properties": {"model_version": {"type": "string"}, "previous": {"type": "string"}}}}}},
            "403": _ADMIN_403, "409": {"description": "no candidate loaded", "content": _ERR_BODY}, **_ERR_RESPONSES}}},
        "/admin/drop": {"post": {"summary": "remove the candidate (0%); the champion answers everything", "responses": {
            "200": {"description": "dropped (or nothing was loaded: dropped is null)", "content": {"application/json": {
                "schema": {"type": "object", "required": ["dropped", "model_version"],
                           "properties": {"dropped": {"type": ["string", "null"]},
                                          "model_version": {"type": "string"}}}}}},
            "403": _ADMIN_403, **_ERR_RESPONSES}}},
        "/admin/traffic": {"get": {"summary": "champion, candidate and the shadow's comparison so far", "responses": {
            "200": {"description": "the traffic state", "content": {"application/json": {"schema": {
                "type": "object", "required": ["champion", "candidate", "shadow", "pending_shadow"],
                "properties": {"champion": {"type": "string"},
                               "candidate": {"anyOf": [{"type": "null"}, _CANDIDATE]},
                               "shadow": {"type": ["object", "null"]},
                               "pending_shadow": {"type": "integer", "minimum": 0}}}}}},
            "403": _ADMIN_403, **_ERR_RESPONSES}}},
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
}

for _path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
    OPENAPI["paths"][_path]["get"]["security"] = []  # open even when a token is configured
