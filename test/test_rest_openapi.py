"""ticrypt/rest/openapi.json against the running service: the documented
routes are exactly the served ones, and every documented operation is driven
with real requests whose responses must match the documented schemas."""

from __future__ import annotations

import json
import os
from typing import Any

from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.restfixture import RestEnv, start_rest
from test.test_rest import raw
from ticrypt import identity, signed
from ticrypt.encoding import b64
from ticrypt.http import load_secret
from ticrypt.rest import api

DOC_PATH = os.path.join(os.path.dirname(api.__file__), "openapi.json")
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

    async def test_every_operation_matches_the_document(self) -> None:
        env = await start_rest(self)
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
        enroll = {"token": created["enrollment_token"],
                  "vm_public_key": identity.public_text(identity.generate()),
                  "tls_fingerprint": "sha256:" + "0f" * 32}
        await h(env, "POST", "/v1/enroll", {}, enroll, expect=200)
        await h(env, "POST", "/v1/enroll", {}, enroll, expect=409)
        await h(env, "POST", "/v1/enroll", {}, dict(enroll, token=b64(os.urandom(32))),
                expect=401)
        await h(env, "POST", "/v1/vms/{id}/ticket", {"id": vm_id}, {}, token=tok, expect=200)
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
