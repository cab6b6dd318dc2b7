"""The HTTP side of the served app: FastAPI routes on a Ray Serve ingress deployment.

Imported only by `app.build_app` (it loads FastAPI and Ray Serve at import). It has no
`from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
(`Request` must be a class, not a string), and Ray Serve's ingress rewrites them.
"""

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from emmoe_dist.serve.protocol import BadRequest, error_body, model_list, parse_chat_request

api = FastAPI()


@serve.deployment
@serve.ingress(api)
class OpenAIRouter:
    """Takes every request and forwards it to the `ModelServer` that serves its `model`."""

    def __init__(self, servers: Mapping[str, Any], served: Mapping[str, str]) -> None:
        self.servers = servers  # model name -> DeploymentHandle of its ModelServer
        self.served = served  # served name (base or adapter) -> model name

    @api.get("/v1/models")
    async def models(self) -> dict:
        return model_list(sorted(self.served))

    @api.post("/v1/chat/completions")
    async def chat(self, http: Request) -> JSONResponse:
        try:
            request = parse_chat_request(await http.json())
        except BadRequest as e:
            return JSONResponse(error_body(str(e)), status_code=400)
        except ValueError:
            return JSONResponse(error_body("the body is not JSON"), status_code=400)
        owner = self.served.get(request.model)
        if owner is None:
            known = ", ".join(sorted(self.served))
            message = f"model {request.model!r} is not served here (served: {known})"
            return JSONResponse(error_body(message, "not_found"), status_code=404)
        return JSONResponse(await self.servers[owner].chat.remote(request))
