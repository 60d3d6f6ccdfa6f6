"""Pipelines: a job submitted (as JSON, as YAML, or under the caller's own
id), the jobs the mesh knows, a job's status, a cancel; and placement, the
ranking a step that names no node is placed by."""

from __future__ import annotations

from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from ..errors import MeshError
from ..jobs import Jobs
from ..pipelines import DOC_BYTES_MAX, load_document
from .parts import ApiParts
from .responses import JOBS_PAGE_DEFAULT, body_json, json_response, paged

__all__ = ["add_job_routes"]

# The short status gswarm shows: these fields of a job, and these of each action.
STATUS_FIELDS = ("job_id", "name", "status", "progress", "error", "coordinator")
ACTION_STATUS_FIELDS = ("action_id", "status", "attempts", "error")


def add_job_routes(app: QuartTrio, parts: ApiParts) -> None:
    def created(jobs: Jobs, taken: tuple[Any, list[str]]) -> Response:
        out = jobs.job_json(taken[0])
        out["held_by"] = [parts.node_id, *taken[1]]  # on disk here, and seen by these peers
        r = json_response(out, 202)
        r.headers["Location"] = f"/jobs/{out['job_id']}"
        return r

    @app.post("/jobs")
    async def submit_job() -> Response:
        # A pipeline is checked whole by the pipeline's own parser (422 with every problem), not by its schema.
        data = await request.get_data(cache=True)
        if len(data) > DOC_BYTES_MAX:
            raise MeshError("TOO_LARGE", f"a pipeline is at most {DOC_BYTES_MAX} bytes; this one is {len(data)}")
        doc = await body_json()
        if doc is None:
            raise MeshError("INVALID_PIPELINE",
                            "the request has no pipeline: POST it as JSON (or YAML to /jobs/from-yaml)")
        r = parts.live()
        return created(r.jobs, await r.jobs.submit(doc))

    @app.post("/jobs/<jid>/create")
    async def create_job(jid: str) -> Response:
        """gswarm's form: the pipeline under the caller's own job id (409 when taken)."""
        doc = await body_json()
        if doc is None:
            raise MeshError("INVALID_PIPELINE", "the request has no pipeline: POST it as JSON")
        r = parts.live()
        return created(r.jobs, await r.jobs.submit(doc, job_id=jid))

    @app.post("/jobs/from-yaml")
    async def submit_job_yaml() -> Response:
        if (request.mimetype or "").startswith("multipart/"):
            files = await request.files
            if not files:
                raise MeshError("INVALID_PIPELINE", "the form holds no file: send the YAML as a file field")
            data = next(iter(files.values())).read(DOC_BYTES_MAX + 1)
        else:
            data = await request.get_data(cache=True)
        assert isinstance(data, bytes)
        r = parts.live()
        return created(r.jobs, await r.jobs.submit(load_document(data)))

    @app.get("/jobs")
    async def jobs() -> Response:
        return paged("jobs", parts.live().jobs.jobs_json(), default=JOBS_PAGE_DEFAULT)

    @app.get("/jobs/<jid>")
    async def job(jid: str) -> Response:
        j = parts.live().jobs
        return json_response(j.job_json(j.view(jid)))

    @app.get("/jobs/<jid>/status")
    async def job_status(jid: str) -> Response:
        j = parts.live().jobs
        full = j.job_json(j.view(jid))
        return json_response({k: full[k] for k in STATUS_FIELDS}
                             | {"actions": [{k: a[k] for k in ACTION_STATUS_FIELDS} for a in full["actions"]]})

    @app.post("/jobs/<jid>/cancel")
    async def cancel_job(jid: str) -> Response:
        j = parts.live().jobs
        return json_response(j.job_json(await j.cancel(jid)))

    @app.get("/placement")
    async def placement() -> Response:
        model = request.args.get("model")
        if not model:
            raise MeshError("INVALID_REQUEST", "give ?model=NAME (and &device=disk, dram or gpu)")
        return json_response(parts.live().jobs.placement(model, request.args.get("device", "disk")))
