"""The OpenAPI document of the scoring API (served at /openapi.json, used by the fuzz tests)."""

from __future__ import annotations

from ctr.schema import CAT_COLUMNS, INT_COLUMNS

_ROW = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{c: {"type": ["integer", "null"], "minimum": -(2**53), "maximum": 2**53} for c in INT_COLUMNS},
        **{c: {"type": ["string", "null"], "pattern": "^[0-9a-fA-F]{8}$"} for c in CAT_COLUMNS},
        "label": {"type": ["integer", "null"]},
    },
}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "row": {"type": "integer"}, "field": {"type": "string"}},
          "required": ["error"]}
_ERR_RESPONSES = {str(s): {"description": d, "content": {"application/json": {"schema": _ERROR}}}
                  for s, d in [(400, "malformed body"), (401, "missing or wrong token"), (413, "too large"),
                               (415, "unsupported content type"), (422, "invalid rows")]}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "ctr scoring service", "version": "1"},
    "paths": {
        "/v1/score": {
            "post": {
                "summary": "Click probabilities for rows of Criteo features",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"type": "object", "required": ["rows"], "additionalProperties": False,
                                                     "properties": {"rows": {"type": "array", "items": _ROW}}}},
                    "text/tab-separated-values": {"schema": {"type": "string"}},
                }},
                "responses": {"200": {"description": "probabilities in row order", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["model_version", "probabilities"],
                    "properties": {"model_version": {"type": "string"},
                                   "probabilities": {"type": "array", "items": {"type": "number"}}}}}}},
                              **_ERR_RESPONSES},
            }
        },
        "/invocations": {
            "post": {
                "summary": "MLflow scoring protocol (dataframe_split or dataframe_records)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": {"description": "predictions"}, **_ERR_RESPONSES},
            }
        },
        "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "readiness and model version", "responses": {"200": {"description": "ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
    },
}
