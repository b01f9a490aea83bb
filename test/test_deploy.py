"""ticrypt.lab.deploy, etc/*.ini and the roles' schemas stay in step: every
key the builder writes is one its role knows, each generated config loads,
and the samples in etc/ set exactly the schema's keys."""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import stat
from typing import Any

from cryptography import x509
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import identity, signed
from ticrypt.config import RoleConfig, Schema, load_config, schema_of
from ticrypt.connect.config import ConnectConfig as CONNECT
from ticrypt.frontend.clientconfig import ClientConfig as CLIENT
from ticrypt.lab.daemons import ROOT
from ticrypt.lab.deploy import START_ORDER, Addresses, Deployment, render_ini
from ticrypt.proxy.config import ProxyConfig as PROXY
from ticrypt.rest.config import RestConfig as REST
from ticrypt.vmc.config import VmcConfig as VMC
from ticrypt.vmhost.config import VmhostConfig as VMHOST

#: role -> (its schema, the sample in etc/)
ROLES: dict[str, Schema | type[RoleConfig]] = {
    "rest": REST, "proxy": PROXY, "vmc": VMC, "client": CLIENT, "vmhost": VMHOST,
    "connect": CONNECT}


def sections(path: str) -> dict[str, set[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return {name: set(parser[name]) for name in parser.sections()}


def build(dep: Deployment) -> dict[str, str]:
    """Every file of a deployment as the lab writes it; role -> config path."""
    dep.ca()
    dep.feed_secret()
    dep.backend()
    dep.user_key("alice")
    paths = {"rest": dep.rest_ini(), "proxy": dep.proxy_ini(),
             "vmc": dep.vmc_ini("a-token"), "client": dep.client_ini("alice"),
             "vmhost": dep.vmhost_ini({1: "127.0.0.1:2222"}), "connect": dep.connect_ini()}
    from ticrypt.admin.cli import main as admin

    with contextlib.redirect_stdout(io.StringIO()):
        code = admin(dep.admin_command("init", "--superadmin", "alice", "--public-key",
                                       dep.path("alice.key.pub"))[1:])
    assert code == 0
    return paths


class InStepTests(SynchronousTestCase):
    def check_deployment(self, dep: Deployment) -> None:
        for role, path in build(dep).items():
            schema = schema_of(ROLES[role])
            for section, keys in sections(path).items():
                self.assertIn(section, schema.sections, f"{role}: [{section}]")
                self.assertLessEqual(keys, set(schema.sections[section]),
                                     f"{role} [{section}]: keys the schema does not know")
            load_config(path, ROLES[role])  # raises ConfigError naming the key

    def test_generated_configs_load_with_each_role_schema(self) -> None:
        self.check_deployment(Deployment(self.mktemp()))

    def test_other_addresses_same_builder(self) -> None:
        """One network namespace per role: other hosts, the same files."""
        a = Addresses(rest_host="10.77.0.1", rest_port=8443, proxy_host="10.77.0.2",
                      proxy_port=8444, vm_host="10.77.1.5:22")
        dep = Deployment(self.mktemp(), a)
        self.check_deployment(dep)
        rest = load_config(dep.rest_config, REST).rest
        self.assertIn("interface=10.77.0.1", rest.listen)
        self.assertEqual(rest.proxy_url, "wss://10.77.0.2:8444")
        proxy = load_config(dep.proxy_config, PROXY).proxy
        self.assertIn("interface=10.77.0.2", proxy.listen)
        self.assertEqual(proxy.rest_url, "https://10.77.0.1:8443")
        with open(dep.server_pem, "rb") as f:
            cert = x509.load_pem_x509_certificates(f.read())[0]
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
        self.assertLessEqual({"10.77.0.1", "10.77.0.2", "127.0.0.1"}, ips)

    def test_samples_set_every_key_of_their_schema(self) -> None:
        for role, spec in ROLES.items():
            schema = schema_of(spec)
            sample = sections(os.path.join(ROOT, "etc", f"{role}.ini"))
            self.assertEqual(set(sample), set(schema.sections), f"etc/{role}.ini sections")
            for section, keys in schema.sections.items():
                self.assertEqual(sample[section], set(keys), f"etc/{role}.ini [{section}]")
                for key, spec_key in keys.items():
                    if not isinstance(spec, Schema):  # typed: every field says what it is
                        self.assertTrue(spec_key.doc, f"{role} [{section}] {key}: no doc")



class _Ready:
    """What a started daemon reports: its listeners."""

    def __init__(self, listening: dict[str, str]):
        self.ready_info = {"listening": listening}

    def address(self, label: str) -> tuple[str, int]:
        host, _, port = self.ready_info["listening"][label].rpartition(":")
        return host, int(port)


class StartOrderTests(SynchronousTestCase):
    def test_proxy_then_rest_each_config_naming_the_other(self) -> None:
        dep = Deployment(self.mktemp())
        started: list[tuple[str, dict[str, set[str]], str]] = []

        async def start(plugin: str, config: str) -> Any:
            with open(config) as f:
                started.append((plugin, sections(config), f.read()))
            if plugin == "ticrypt-proxy":
                return _Ready({"proxy": "127.0.0.1:40001"})
            return _Ready({"https": f"127.0.0.1:{dep.addresses.rest_port}"})

        self.successResultOf(defer.ensureDeferred(dep.start_backend(start)))
        self.assertEqual([p for p, _, _ in started], list(START_ORDER[:2]))
        rest_port = dep.addresses.rest_port
        self.assertNotEqual(rest_port, 0)
        self.assertIn(f"rest_url = https://127.0.0.1:{rest_port}\n", started[0][2])
        self.assertIn("proxy_url = wss://127.0.0.1:40001\n", started[1][2])
        self.assertEqual(dep.addresses.proxy_port, 40001)


class BuilderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dep = Deployment(self.mktemp())

    def mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_modes(self) -> None:
        paths = build(self.dep)
        self.assertEqual(self.mode(self.dep.dir), 0o700)
        for secret in ("tls/ca.key", "tls/server.pem", "feed.secret", "backend.key",
                       "alice.key", "vmc-enroll.token"):
            self.assertEqual(self.mode(self.dep.path(secret)), 0o600, secret)
        for public in ("tls/ca.pem", "backend.pub", "alice.key.pub", *paths.values()):
            self.assertEqual(self.mode(self.dep.path(public)), 0o644, public)

    def test_overrides_are_kept_and_none_removes_a_key(self) -> None:
        self.dep.proxy_ini({"max_pairs": "7"}, rest_url="off", ca_file=None)
        self.dep.addresses.proxy_port = 4321
        path = self.dep.proxy_ini()  # e.g. a restart on the port it got
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path)
        self.assertEqual(parser["limits"]["max_pairs"], "7")
        self.assertEqual(parser["proxy"]["rest_url"], "off")
        self.assertNotIn("ca_file", parser["proxy"])
        self.assertIn("ssl:4321:", parser["proxy"]["listen"])

    def test_made_once(self) -> None:
        ca, pem = self.dep.ca()
        with open(pem, "rb") as f:
            first = f.read()
        self.assertEqual(self.dep.ca(), (ca, pem))
        with open(pem, "rb") as f:
            self.assertEqual(f.read(), first)
        self.assertEqual(self.dep.backend().public, self.dep.backend().public)
        self.assertEqual(identity.public_bytes(self.dep.user_key("bob")[0]),
                         identity.public_bytes(self.dep.user_key("bob")[0]))

    def test_backend_signs_what_the_proxy_checks(self) -> None:
        backend = self.dep.backend()
        self.assertEqual(identity.load_public_file(self.dep.path("backend.pub")),
                         backend.public)
        vm_key = identity.generate()
        credential = signed.verify_vm_credential(
            backend.public, backend.vm_credential("vm1", vm_key, now=1000.0))
        self.assertEqual((credential.vm, credential.vm_key, credential.issued),
                         ("vm1", identity.public_bytes(vm_key), 1000))

    def test_render_ini(self) -> None:
        self.assertEqual(render_ini({"a": {"x": "1", "y": None}, "b": {}}, "hi"),
                         "# hi\n\n[a]\nx = 1\n\n[b]\n")


class BenchmarksTests(SynchronousTestCase):
    def test_benchmarks_import_nothing_from_test(self) -> None:
        bench = os.path.join(ROOT, "bench")
        for name in sorted(os.listdir(bench)):
            if name.endswith(".py"):
                with open(os.path.join(bench, name)) as f:
                    text = f.read()
                for needle in ("from test", "import test"):
                    self.assertNotIn(needle, text, f"bench/{name}")
