"""The Label Studio client: label-studio-sdk for the API, plain HTTP only where the SDK cannot.

Retries. label-studio-sdk (Fern-generated) re-sends a request on a connection error or a 5xx/
408/409/429 answer, up to ``max_retries`` times (``core/http_client.py``, ``HttpClient.request``:
``max_retries = request_options.get("max_retries", self.base_max_retries)``, then
``if retries < max_retries:`` before each re-send). A re-sent import duplicates tasks, so the SDK
client is built with ``max_retries=0`` and every write also passes ``request_options=
{"max_retries": 0}``: it is sent exactly once, and the caller re-reads the server's state after a
failure. Reads are retried here, with exponential backoff, on the connection and on 5xx, never on
4xx (they pass the same ``request_options``, so the SDK's retries never multiply ours).

Plain HTTP (httpx) remains for the two things the SDK has no call for: uploading image files
(``upload``) and reading a served image's bytes (``download``).

The token is held here and nowhere else; no error message or error attribute includes it, raw or
escaped. A token holding whitespace or a control character (CR, LF, NUL: a newline read from a
file) is refused before any request, by ``checked_token``, with a message that does not show it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from sinks.label_studio.errors import AuthError, LabelStudioError, UnreachableError

TOKEN_VARIABLES = ("LABEL_STUDIO_API_KEY",)  # the SDK reads the same variable
ONCE = {"max_retries": 0}  # request_options: the SDK sends the request once, whatever happens
DETAIL_CHARS = 2000  # how much of a server's error answer a message quotes
_CONTROL_NAMES = {  # what a token must not hold, by name (the token itself is never shown)
    "\r": "a carriage return (CR)", "\n": "a line feed (LF)", "\0": "a NUL character",
    "\t": "a tab", " ": "a space"}


def api_token(environ: dict | None = None) -> str:
    """The API token from the environment (``LABEL_STUDIO_API_KEY``), checked by ``checked_token``."""
    env = os.environ if environ is None else environ
    for name in TOKEN_VARIABLES:
        if env.get(name):
            return checked_token(env[name], name)
    raise LabelStudioError(f"no Label Studio API token: set {TOKEN_VARIABLES[0]} (Account & Settings -> "
                           "Access Token in Label Studio)")


def checked_token(token: str, where: str = "the Label Studio API token") -> str:
    """The token, or an error that names what is wrong with it and never shows it, raw or escaped.

    A token never holds whitespace or control characters; one that does is almost always a token
    read from a file with its newline. Sent as it is, the HTTP layer rejects the header and quotes
    it escaped (``...\\n``), a form the redaction of the raw token does not catch."""
    kinds = sorted({_CONTROL_NAMES.get(c, "a control character" if not c.isspace() else "whitespace")
                    for c in token if c.isspace() or ord(c) < 32 or ord(c) == 127})
    if kinds:
        raise LabelStudioError(f"{where} contains {', '.join(kinds)} (often the newline of a file it was read from); "
                               f"set {TOKEN_VARIABLES[0]} to the token alone. The token is not shown.")
    return token



class LabelStudio:
    """Thin client over the server's API. Every method returns plain JSON values (dicts, lists)
    and raises ``LabelStudioError`` (``AuthError`` for 401/403, ``UnreachableError`` when the
    server does not answer)."""

    def __init__(self, url: str, token: str, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"Label Studio URL {url!r} must start with http:// or https://")
        import httpx
        from label_studio_sdk import LabelStudio as Sdk  # ~1 s (it imports pandas): only when a client is built
        from label_studio_sdk.core.api_error import ApiError
        from label_studio_sdk.core.parse_error import ParsingError

        self.url = url.rstrip("/")
        self._token = checked_token(token)
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self._transport_error = httpx.TransportError  # the server did not answer
        self._errors = (httpx.TransportError, ApiError, ParsingError)  # what the SDK and httpx raise
        # One connection pool for the SDK and the plain-HTTP calls. Its Authorization header serves
        # the plain calls (a legacy token); the SDK sets its own per request (legacy or JWT).
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {token}"}, timeout=timeout)
        try:  # a JWT token that has expired is refused here, before any request
            self._sdk = Sdk(base_url=self.url, api_key=token, httpx_client=self._http, timeout=timeout, max_retries=0)
        except ApiError as e:
            self._http.close()
            raise self._fail("reading the API token", e.status_code, e.body) from None

    # errors ---------------------------------------------------------------------------------------
    def _safe(self, text: str) -> str:
        """``text`` with the token redacted, raw and in the escaped forms a message may quote it in."""
        if not self._token:
            return text
        for form in (self._token, repr(self._token)[1:-1], json.dumps(self._token)[1:-1]):
            text = text.replace(form, "***")
        return text

    def _fail(self, what: str, status: int | None, body) -> LabelStudioError:
        if status in (401, 403):
            return AuthError(f"Label Studio at {self.url} refused the API token ({status}) for {what}; "
                             f"set {TOKEN_VARIABLES[0]} to a valid token of a user with access", status)
        detail = self._safe(body if isinstance(body, str) else json.dumps(body, default=str))
        return LabelStudioError(f"Label Studio at {self.url} answered {status} to {what}: {detail[:DETAIL_CHARS]}",
                                status, detail)

    def _unreachable(self, what: str, err: Exception) -> UnreachableError:
        return UnreachableError(self._safe(f"Label Studio at {self.url} is unreachable ({what}: "
                                           f"{type(err).__name__}: {err})"))

    def _error(self, what: str, err: Exception) -> LabelStudioError:
        """The roiscribe error for one of ``self._errors``: a transport error means the server did
        not answer; ApiError / ParsingError carry the status and body it answered."""
        if isinstance(err, self._transport_error):
            return self._unreachable(what, err)
        return self._fail(what, err.status_code, err.body)

    # reads: retried with backoff on the connection and on 5xx, never on 4xx -----------------------
    def _read(self, what: str, call: Callable, *args, **kwargs):
        for attempt in range(self.retries + 1):
            try:
                return call(*args, **kwargs, request_options=ONCE)
            except self._errors as e:
                error = self._error(what, e)
                retryable = isinstance(error, UnreachableError) or (error.status or 0) >= 500
                if not retryable or attempt == self.retries:
                    raise error from None
            self.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    # writes: one attempt; the caller re-reads the server's state after a failure -------------------
    def _write(self, what: str, call: Callable, *args, **kwargs):
        try:
            return call(*args, **kwargs, request_options=ONCE)
        except self._errors as e:
            raise self._error(what, e) from None

    def wait_healthy(self) -> None:
        """Returns once the server answers (reads retried with backoff)."""
        self._read("waiting for the server", self._sdk.versions.get)

    def check_token(self) -> None:
        self._read("checking the API token", self._sdk.users.whoami)

    # projects -------------------------------------------------------------------------------------
    def project(self, name_or_id: str | int) -> dict | None:
        """A project by id (404: an error) or by exact title (None when no project has it)."""
        if str(name_or_id).isdigit():
            return _plain(self._read(f"reading project {name_or_id}", self._sdk.projects.get, int(name_or_id)))
        page = 1
        while True:
            data = self._read("listing projects", self._sdk.projects.list, title=str(name_or_id), page=page,
                              page_size=100).response
            for p in data.results or []:
                if p.title == str(name_or_id):
                    return _plain(p)
            if not data.next:
                return None
            page += 1

    def create_project(self, title: str, config: str) -> dict:
        return _plain(self._write(f"creating project {title!r}", self._sdk.projects.create, title=title,
                                  label_config=config))

    def update_project(self, pid: int, **fields) -> dict:
        return _plain(self._write(f"updating project {pid}", self._sdk.projects.update, pid, **fields))

    # tasks ----------------------------------------------------------------------------------------
    def task_pages(self, pid: int, fields: str = "all", include: str | None = None,
                   page_size: int = 500) -> Iterator[list[dict]]:
        """The project's tasks, one page at a time (``include``: the task fields to return, e.g.
        ``"id,data,predictions_model_versions"``). Stops when ``total`` tasks were read or a page
        comes back empty, so a server that caps ``page_size`` (``TASK_API_PAGE_SIZE_MAX``) is still read
        to the end; a listing that ends short of ``total`` is an error, never a silent half listing."""
        page, ids, total = 1, set(), 0
        while True:
            what = f"listing tasks of project {pid}"
            try:
                data = self._read(what, self._sdk.tasks.list, project=pid, page=page, page_size=page_size,
                                  fields=fields, include=include).response
                raw, total = data.tasks or [], int(data.total or 0)
            except LabelStudioError as e:
                if e.status != 404 or page == 1:
                    raise
                raw = []  # a page past the end (Django answers 404): the same as an empty page
            if not raw:
                if len(ids) < total:  # the listing ended short of the count: never act on half a listing
                    raise LabelStudioError(f"Label Studio at {self.url} listed {len(ids)} of the {total} tasks it "
                                           f"counts in project {pid} (tasks added or deleted meanwhile?); run again")
                return
            tasks = [t for t in map(_plain, raw) if t["id"] not in ids]  # a task that moved pages comes once
            ids.update(t["id"] for t in tasks)
            if tasks:
                yield tasks
            if len(ids) >= total:
                return
            page += 1

    def list_tasks(self, pid: int, fields: str = "all", include: str | None = None,
                   page_size: int = 500) -> list[dict]:
        return [t for page in self.task_pages(pid, fields, include, page_size) for t in page]

    def task_count(self, pid: int) -> int:
        data = self._read(f"counting tasks of project {pid}", self._sdk.tasks.list, project=pid, page=1,
                          page_size=1, include="id").response
        return int(data.total or 0)

    def import_tasks(self, pid: int, tasks: list[dict]) -> list[int]:
        """Create tasks (with their predictions); checks that the server created every one."""
        r = self._write(f"importing {len(tasks)} tasks into project {pid}", self._sdk.projects.import_tasks, pid,
                        request=tasks, return_task_ids=True, commit_to_project=True)
        ids = r.task_ids or []
        if (r.task_count if r.task_count is not None else -1) != len(tasks) or len(ids) != len(tasks):
            raise LabelStudioError(f"Label Studio at {self.url} created {r.task_count} tasks of {len(tasks)} "
                                   f"sent to project {pid}; run the push again to reconcile")
        return [int(i) for i in ids]

    def import_predictions(self, pid: int, predictions: list[dict]) -> int:
        """Add predictions to existing tasks; checks that the server created every one."""
        r = self._write(f"importing {len(predictions)} predictions into project {pid}",
                        self._sdk.projects.import_predictions, pid, request=predictions)
        created = int(r.created if r.created is not None else -1)
        if created != len(predictions):
            raise LabelStudioError(f"Label Studio at {self.url} created {created} predictions of {len(predictions)} "
                                   f"sent to project {pid}; run the push again to reconcile")
        return created

    # storage and files ----------------------------------------------------------------------------
    def ensure_local_storage(self, pid: int, paths: set[str]) -> None:
        """A local-files storage on the project for each folder (created once; never synced:
        it only lets the server serve those files to the project's tasks)."""
        have = {s.path for s in self._read(f"listing storages of project {pid}", self._sdk.import_storage.local.list,
                                           project=pid)}
        for path in sorted(paths - have):
            self._write(f"adding local storage {path} to project {pid}", self._sdk.import_storage.local.create,
                        project=pid, path=path, title=f"roiscribe {Path(path).name}", use_blob_urls=False)

    def upload(self, pid: int, paths: Sequence[Path]) -> list[str]:
        """Upload image files (one request for the batch) -> their ``/data/upload/...`` URLs."""
        import httpx

        # Plain HTTP: the SDK's projects.import_tasks sends only a JSON body; the files of an
        # upload go to the same endpoint as multipart form data. One attempt, like every write.
        what = f"uploading {len(paths)} images to project {pid}"
        handles = [open(p, "rb") for p in paths]
        try:
            files = {f"file{i}": (p.name, h) for i, (p, h) in enumerate(zip(paths, handles))}
            r = self._http.post(f"/api/projects/{pid}/import", files=files, params={"commit_to_project": "false"})
        except httpx.TransportError as e:
            raise self._unreachable(what, e) from None
        finally:
            for h in handles:
                h.close()
        if r.status_code not in (200, 201):
            raise self._fail(what, r.status_code, _body(r))
        ids = r.json().get("file_upload_ids") or []
        if len(ids) != len(paths):
            raise LabelStudioError(f"Label Studio at {self.url} stored {len(ids)} of {len(paths)} uploaded images")
        uploads = self._read("reading uploaded files", self._sdk.files.list, pid, ids=json.dumps(ids))
        by_id = {u.id: u.file for u in uploads}
        return ["/data/" + by_id[i] for i in ids]

    def download(self, url: str) -> bytes:
        """An image the server serves (uploads, local files), read with the token."""
        import httpx

        # Plain HTTP: the SDK has no call that returns a served file's bytes (files.download
        # returns None and covers uploads only, not local files).
        path = url if url.startswith("/") else httpx.URL(url).raw_path.decode()
        if url.startswith(("http://", "https://")) and not url.startswith(self.url + "/"):
            raise LabelStudioError(f"image {url} is not on {self.url}; roiscribe reads only the server it was given")
        try:
            r = self._http.get(path)
        except httpx.TransportError as e:
            raise self._unreachable(f"downloading {url}", e) from None
        if r.status_code != 200:
            raise self._fail(f"downloading {url}", r.status_code, r.text[:200])
        return r.content

    def close(self) -> None:
        self._http.close()


def _plain(model) -> dict:
    """An SDK response model as the JSON the server sent (fields it did not send are left out)."""
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _body(r):
    try:
        return r.json()
    except ValueError:
        return r.text[:DETAIL_CHARS]
