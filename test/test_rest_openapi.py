"""ticrypt/rest/openapi.json against the running service: the documented
routes are exactly the served ones, and every documented operation is driven
with real requests whose responses must match the documented schemas."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
from typing import Any

from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.restfixture import RestEnv, start_rest
from test.test_rest import raw
from ticrypt import identity, signed
from ticrypt.encoding import b64
from ticrypt.http import load_secret
from ticrypt.http import server as http_server
from ticrypt.rest import api, store

DOC_PATH = os.path.join(os.path.dirname(api.__file__), "openapi.json")
PROTOCOL_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "PROTOCOL.md")
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def load_doc() -> dict[str, Any]:
    with open(DOC_PATH) as f:
        return json.load(f)  # type: ignore[no-any-return]


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item
            if m in METHODS}


class DocumentTests(SynchronousTestCase):
    def test_document_is_valid_openapi(self) -> None:
        validate_spec(load_doc())

    def test_documented_routes_equal_served_routes(self) -> None:
        served = {(r.method, r.template) for r in api.ROUTES}
        self.assertEqual(documented_routes(load_doc()), served)


def rest_section() -> str:
    """PROTOCOL.md §1.1, the REST API."""
    with open(PROTOCOL_PATH, encoding="utf-8") as f:
        text = f.read()
    return text[text.index("### 1.1 REST API"):text.index("### 1.2 ")]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the table rows whose first cell matches ``first_cell``."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if re.match(r"\|\s*" + first_cell + r"\s*\|", line)]


#: functions whose ApiError or error_body gets its code from a variable
PASS_THROUGH = ("_store_error", "_unauthorized", "_answer", "enabled")


def raised_error_codes() -> set[tuple[int, str]]:
    """Every (HTTP status, error code) rest can answer, read from its source
    and from the JSON server it runs on (ticrypt/http/server.py):
    ``ApiError(status, "code", ...)``, ``_unauthorized("code", ...)`` (401),
    ``enabled(value, "code", ...)`` (503),
    ``error_body("code", ...)`` beside a literal status, and every
    ``StoreError("code", ...)`` with the status ``api._store_error`` gives it."""
    found: set[tuple[int, str]] = set()
    for path in [*sorted(glob.glob(os.path.join(os.path.dirname(api.__file__), "*.py"))),
                 http_server.__file__]:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            name = node.func.id
            literals = [a.value for a in node.args if isinstance(a, ast.Constant)]
            codes = [v for v in literals if isinstance(v, str)]
            if name in ("ApiError", "error_body") and not codes:
                # only these pass a code through, from what is read here too:
                # StoreError, _unauthorized's and enabled's callers, a caught ApiError
                func: ast.AST = node
                while not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                    func = parents[func]
                assert func.name in PASS_THROUGH, (path, ast.dump(node))
            elif name == "ApiError":
                status, code = node.args[:2]
                assert isinstance(status, ast.Constant) and isinstance(code, ast.Constant), \
                    (path, ast.dump(node))
                found.add((status.value, code.value))
            elif name == "_unauthorized":
                found.add((401, codes[0]))
            elif name == "enabled":
                found.add((503, codes[0]))
            elif name == "error_body":
                beside = parents[node]
                items = beside.args if isinstance(beside, ast.Call) else beside.elts  # type: ignore
                status = next(i.value for i in items if isinstance(i, ast.Constant)
                              and isinstance(i.value, int))
                found.add((status, codes[0]))
            elif name == "StoreError" and codes:
                found.add((api._store_error(store.StoreError(codes[0], "")).status, codes[0]))
    return found


class ProtocolTests(SynchronousTestCase):
    """PROTOCOL.md §1.1 is enough to write a client: its tables name every
    route rest serves and every error it answers, with the right statuses."""

    def test_every_route_in_the_endpoint_table(self) -> None:
        rows = table_rows(rest_section(), r"`(GET|POST|PUT|DELETE|PATCH) /v1/[^`]*`")
        documented = {tuple(row[0].strip("`").split(" ", 1)) for row in rows}
        self.assertEqual(documented, {(r.method, r.template) for r in api.ROUTES})
        self.assertEqual(len(rows), len(documented))
        # the success status is the one of the OpenAPI document, checked live below
        doc = load_doc()
        for row in rows:
            method, template = row[0].strip("`").split(" ", 1)
            ok = [s for s in doc["paths"][template][method.lower()]["responses"]
                  if s.startswith("2")]
            self.assertEqual([row[3].split()[0].rstrip(";")], ok, row)

    def test_every_error_code_in_the_error_table(self) -> None:
        rows = table_rows(rest_section(), r"`[a-z0-9]+(-[a-z0-9]+)*`")
        documented = {(int(status), row[0].strip("`")) for row in rows
                      for status in row[1].split(", ")}
        self.assertEqual(documented, raised_error_codes())
        self.assertEqual(len(rows), len({row[0] for row in rows}))
        self.assertIn((404, "no-such-vm"), documented)

    def test_own_errors_of_each_endpoint_are_in_the_error_table(self) -> None:
        section = rest_section()
        codes = {row[0].strip("`"): row[1] for row in
                 table_rows(section, r"`[a-z0-9]+(-[a-z0-9]+)*`")}
        for row in table_rows(section, r"`(GET|POST) /v1/[^`]*`"):
            for status, code in re.findall(r"(\d{3}) `([a-z0-9-]+)`", row[4]):
                self.assertIn(code, codes, row)
                self.assertIn(status, codes[code].split(", "), row)


class LiveTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.doc = load_doc()
        self.seen: set[tuple[str, str, str]] = set()

    def _schema(self, ref_holder: dict[str, Any]) -> OAS30Validator:
        schema = dict(ref_holder["content"]["application/json"]["schema"])
        schema["components"] = self.doc["components"]
        return OAS30Validator(schema)

    async def hit(self, env: RestEnv, method: str, template: str, params: dict[str, str],
                  body: dict[str, Any] | bytes | None = None, token: str | None = None,
                  expect: int | None = None) -> Any:
        """Request a documented operation; check status and body against the document."""
        op = self.doc["paths"][template][method.lower()]
        path = template
        for k, v in params.items():
            path = path.replace("{" + k + "}", v)
        if isinstance(body, dict):
            if "requestBody" in op and expect is not None:
                # The document accepts exactly what the service accepts.
                valid = self._schema(op["requestBody"]).is_valid(body)
                self.assertEqual(valid, expect != 400, body)
            data: bytes | None = json.dumps(body).encode()
        else:
            data = body
        headers = {b"Authorization": [b"Bearer " + token.encode()]} if token else {}
        status, obj, _ = await raw(env, method, path, data, headers)
        self.assertIn(str(status), op["responses"],
                      f"{method} {template} answered undocumented {status}: {obj}")
        response = op["responses"][str(status)]
        if "content" in response:
            self._schema(response).validate(obj)
            if status >= 400:
                self.assertIn(obj["error"]["code"], response["description"])
        else:
            self.assertIsNone(obj)
        if expect is not None:
            self.assertEqual(status, expect, obj)
        self.seen.add((method.upper(), template, str(status)))
        return obj

    async def control_api(self, env: RestEnv) -> str:
        """An in-process proxy control API (TLS, the deployment's
        certificate) whose leases open no port; its URL."""
        from twisted.internet import endpoints
        from twisted.internet import reactor as r

        from test.test_proxy_ctlapi import RecordingOpener
        from ticrypt.audit import AuditLog
        from ticrypt.http.server import LimitedFactory
        from ticrypt.proxy.ctlapi import ControlResource, control_site
        from ticrypt.proxy.leases import LeaseService
        from ticrypt.proxy.ports import LeaseLimits, LeaseTable
        from ticrypt.tlsutil import server_endpoint

        opener = RecordingOpener()
        audit = AuditLog(None, r)  # type: ignore[arg-type]
        leases = LeaseService(table=LeaseTable((6000, 6001), LeaseLimits()), opener=opener,
                              clock=r, audit=audit, journal=None, public_host="127.0.0.1")
        opener.service = leases
        resource = ControlResource(leases, backend_public=env.backend_public, clock=r,  # type: ignore[arg-type]
                                   audit=audit)
        port = await endpoints.serverFromString(r, server_endpoint(0, env.server_pem)).listen(
            LimitedFactory(control_site(resource, reactor=r), 8, 8))
        self.addCleanup(port.stopListening)
        return f"https://127.0.0.1:{port.getHost().port}"

    async def test_every_operation_matches_the_document(self) -> None:
        env = await start_rest(self, start=False)
        env.write_config(proxy_control_url=await self.control_api(env),
                         proxy_control_ca_file=env.ca_file)
        await env.start(self)
        h = self.hit
        await h(env, "GET", "/v1/backend", {}, expect=200)
        await h(env, "GET", "/v1/backend", {}, {"x": 1}, expect=400)
        served = await h(env, "GET", "/v1/openapi.json", {}, expect=200)
        self.assertEqual(served, self.doc)
        c = await h(env, "POST", "/v1/auth/challenge", {}, {"user": "alice"}, expect=200)
        sig = b64(signed.sign(env.admin_key, signed.LOGIN, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": "alice"}))
        s = await h(env, "POST", "/v1/auth/login", {}, {
            "user": "alice", "challenge_id": c["challenge_id"], "signature": sig}, expect=200)
        await h(env, "POST", "/v1/auth/login", {}, {
            "user": "alice", "challenge_id": c["challenge_id"], "signature": sig}, expect=401)
        tok = s["token"]
        await h(env, "GET", "/v1/me", {}, token=tok, expect=200)
        await h(env, "GET", "/v1/me", {}, expect=401)
        bob_key = identity.generate()
        await h(env, "POST", "/v1/users", {}, {"name": "bob", "public_key":
                identity.public_text(bob_key)}, token=tok, expect=201)
        await h(env, "POST", "/v1/users", {}, {"name": "bob", "public_key":
                identity.public_text(bob_key)}, token=tok, expect=409)
        await h(env, "POST", "/v1/users", {}, {"name": "bob", "extra": 1}, token=tok,
                expect=400)
        await h(env, "GET", "/v1/users", {}, token=tok, expect=200)
        created = await h(env, "POST", "/v1/vms", {}, {"name": "lab1", "owner": "bob",
                          "host": "127.0.0.1:2201"}, token=tok, expect=201)
        await h(env, "POST", "/v1/vms", {}, {"name": "lab2", "owner": "nobody",
                "host": "127.0.0.1:2201"}, token=tok, expect=404)
        vm_id = created["vm"]["id"]
        await h(env, "GET", "/v1/vms", {}, token=tok, expect=200)
        await h(env, "GET", "/v1/vms/{id}", {"id": vm_id}, token=tok, expect=200)
        await h(env, "GET", "/v1/vms/{id}", {"id": "vm-0"}, token=tok, expect=404)
        await h(env, "POST", "/v1/vms/{id}/ticket", {"id": vm_id}, {}, token=tok, expect=409)
        await h(env, "POST", "/v1/vms/{id}/pathways", {"id": vm_id}, {}, token=tok,
                expect=409)
        enroll = {"token": created["enrollment_token"],
                  "vm_public_key": identity.public_text(identity.generate()),
                  "tls_fingerprint": "sha256:" + "0f" * 32}
        await h(env, "POST", "/v1/enroll", {}, enroll, expect=200)
        await h(env, "POST", "/v1/enroll", {}, enroll, expect=409)
        await h(env, "POST", "/v1/enroll", {}, dict(enroll, token=b64(os.urandom(32))),
                expect=401)
        await h(env, "POST", "/v1/vms/{id}/ticket", {"id": vm_id}, {}, token=tok, expect=200)
        pathway = (await h(env, "POST", "/v1/vms/{id}/pathways", {"id": vm_id}, {}, token=tok,
                           expect=201))["pathway"]
        self.assertEqual((pathway["allowed"], pathway["tls_fingerprint"]),
                         ("127.0.0.1", enroll["tls_fingerprint"]))
        await h(env, "POST", "/v1/vms/{id}/pathways", {"id": "vm-0"}, {}, token=tok,
                expect=404)
        listed = await h(env, "GET", "/v1/pathways", {}, token=tok, expect=200)
        self.assertEqual(listed["pathways"], [pathway])
        await h(env, "DELETE", "/v1/pathways/{id}", {"id": pathway["id"]}, token=tok,
                expect=204)
        await h(env, "DELETE", "/v1/pathways/{id}", {"id": pathway["id"]}, token=tok,
                expect=404)
        await h(env, "GET", "/v1/vms/{id}", {"id": vm_id}, token=tok, expect=200)
        await h(env, "POST", "/v1/vms/{id}/ticket", {"id": vm_id}, b"x" * 70000, token=tok,
                expect=413)
        # a plain user is forbidden the superadmin operations
        bc = await h(env, "POST", "/v1/auth/challenge", {}, {"user": "bob"}, expect=200)
        bsig = b64(signed.sign(bob_key, signed.LOGIN, {
            "challenge": bc["challenge"], "challenge_id": bc["challenge_id"], "user": "bob"}))
        bob = (await h(env, "POST", "/v1/auth/login", {}, {
            "user": "bob", "challenge_id": bc["challenge_id"], "signature": bsig}))["token"]
        await h(env, "GET", "/v1/users", {}, token=bob, expect=403)
        await h(env, "POST", "/v1/users/{name}/disable", {"name": "alice"}, {}, token=bob,
                expect=403)
        await h(env, "POST", "/v1/users/{name}/disable", {"name": "nobody"}, {}, token=tok,
                expect=404)
        await h(env, "POST", "/v1/users/{name}/disable", {"name": "bob"}, {}, token=tok,
                expect=200)
        await h(env, "GET", "/v1/vms", {}, token=bob, expect=401)
        feed_secret = load_secret(env.feed_secret_file)
        await h(env, "GET", "/v1/revocations", {}, token=feed_secret, expect=200)
        await h(env, "GET", "/v1/revocations", {}, token=tok, expect=401)
        entry = (await h(env, "POST", "/v1/allowlist", {}, {
            "name": "lic.example.org", "ports": [27000], "comment": "x"}, token=tok,
            expect=201))["entry"]
        await h(env, "POST", "/v1/allowlist", {}, {"name": "lic.example.org", "ports": [1]},
                token=tok, expect=409)
        await h(env, "POST", "/v1/allowlist", {}, {"name": "lic.example.org", "ports": [0]},
                token=tok, expect=400)
        await h(env, "GET", "/v1/allowlist", {}, token=tok, expect=200)
        allow_secret = load_secret(env.deployment.path(env.deployment.allowlist_feed_secret()))
        await h(env, "GET", "/v1/allowlist/feed", {}, token=allow_secret, expect=200)
        await h(env, "GET", "/v1/allowlist/feed", {}, token=tok, expect=401)
        await h(env, "DELETE", "/v1/allowlist/{id}", {"id": entry["id"]}, token=tok,
                expect=204)
        await h(env, "DELETE", "/v1/allowlist/{id}", {"id": entry["id"]}, token=tok,
                expect=404)
        await h(env, "POST", "/v1/auth/logout", {}, {}, token=tok, expect=204)
        await h(env, "POST", "/v1/auth/logout", {}, {}, token=tok, expect=401)
        for _ in range(25):
            await h(env, "POST", "/v1/auth/login", {}, {
                "user": "x", "challenge_id": c["challenge_id"], "signature": sig})
        await h(env, "POST", "/v1/auth/login", {}, {
            "user": "x", "challenge_id": c["challenge_id"], "signature": sig}, expect=429)

        # Every documented operation was driven to its documented success status.
        for method, template in documented_routes(self.doc):
            op = self.doc["paths"][template][method.lower()]
            ok = [s for s in op["responses"] if s.startswith("2")]
            self.assertTrue(any((method, template, s) in self.seen for s in ok),
                            f"{method} {template} never answered {ok}")
        # Methods not documented on a documented path are refused with 405.
        for template, item in self.doc["paths"].items():
            path = template.replace("{id}", vm_id).replace("{name}", "bob")
            for m in ("GET", "POST", "PUT", "DELETE"):
                if m.lower() not in item:
                    status, obj, _ = await raw(env, m, path, b"{}")
                    self.assertEqual((status, obj["error"]["code"]),
                                     (405, "method-not-allowed"), (m, path))
