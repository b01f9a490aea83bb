"""The ``ticrypt`` CLI end to end against a real ticrypt-rest (run in this
process: test/restfixture.py).  The commands run in this process too
(:func:`ticrypt_here`: the CLI's ``main`` on trial's reactor, no Python
start-up each); the console script itself, its exit codes (0, 1 with one
line, 2 for usage) and a command under ``task.react``, through a process
(:func:`ticrypt`) in the few places that show it."""

from __future__ import annotations

import os
import stat
from collections.abc import Coroutine
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.daemon import daemon_env, run_command, script_path
from test.restfixture import RestEnv, run_ticrypt, start_rest
from ticrypt import identity, tlsutil
from ticrypt.frontend import cli


def write_client_config(env: RestEnv, user: str, ca_file: str | None = None) -> str:
    """``client-USER.ini`` (key ``USER.key``, state in ``client-USER-state``)."""
    extra = {"ca_file": ca_file} if ca_file else {}
    return env.deployment.client_ini(user, f"client-{user}", **extra)


async def ticrypt(config: str, *args: str, **extra_env: str) -> tuple[int, str, str]:
    """The console script ``ticrypt --config CONFIG ARGS`` (a process),
    without $TICRYPT_PASSPHRASE unless ``extra_env`` sets it."""
    env = daemon_env()
    env.pop("TICRYPT_PASSPHRASE", None)
    env.update(extra_env)
    return await run_command([script_path("ticrypt"), "--config", config, *args], env=env)


async def ticrypt_here(config: str, *args: str, **extra_env: str) -> tuple[int, str, str]:
    """:func:`ticrypt` run in this process (:func:`test.restfixture.run_ticrypt`)."""
    changes: dict[str, str | None] = {"TICRYPT_PASSPHRASE": None, **extra_env}
    return await run_ticrypt(["--config", config, *args], changes)


async def together(*runs: Coroutine[Any, Any, tuple[int, str, str]]
                   ) -> list[tuple[int, str, str]]:
    """Independent CLI runs (that change nothing each other reads) at once
    (processes; in-process runs take their turns); their results in order."""
    return list(await defer.gatherResults([defer.ensureDeferred(r) for r in runs],
                                          consumeErrors=True))


class CliEndToEndTests(TestCase):
    timeout = 180

    def one_line(self, err: str, prefix: str) -> None:
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith(prefix), err)

    async def test_keygen_login_whoami_vms_logout(self) -> None:
        env = await start_rest(self, in_process=True)
        config = write_client_config(env, "bob")
        key_file = env.deployment.path("bob.key")

        code, out, err = await ticrypt_here(config, "keygen", "--passphrase-from-env", "PW",
                                            PW="correct horse")
        self.assertEqual(code, 0, err)
        self.assertEqual(stat.S_IMODE(os.stat(key_file).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(key_file + ".pub").st_mode), 0o644)
        code, _, err = await ticrypt_here(config, "keygen", "--no-passphrase")
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt: keygen failed: {key_file} already exists")

        code, out, err = env.admin_here("user", "add", "bob", "--public-key",
                                        key_file + ".pub")
        self.assertEqual(code, 0, err)
        code, out, err = env.admin_here("--json", "vm", "add", "lab1", "--owner", "bob",
                                        "--host", "127.0.0.1:2201")
        self.assertEqual(code, 0, err)
        vm_id = __import__("json").loads(out)["vm"]["id"]

        # three refusals that change nothing
        whoami, no_passphrase, wrong = await together(
            ticrypt_here(config, "whoami"), ticrypt_here(config, "login"),
            ticrypt_here(config, "login", TICRYPT_PASSPHRASE="wrong"))
        code, out, err = whoami
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: whoami failed: not logged in; run: ticrypt login")
        code, out, err = no_passphrase
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: cannot read your key: ")
        self.assertIn("TICRYPT_PASSPHRASE", err)
        code, out, err = wrong
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: cannot read your key: ")

        # the console script: the command under task.react, exit code 0
        code, out, err = await ticrypt(config, "login", TICRYPT_PASSPHRASE="correct horse")
        self.assertEqual(code, 0, err)
        self.assertIn("logged in as bob (user)", out)
        session = env.deployment.path("client-bob-state/session.json")
        self.assertEqual(stat.S_IMODE(os.stat(session).st_mode), 0o600)

        # reads of the logged-in session
        whoami, vm_list, vm_show, vm_nope = await together(
            ticrypt_here(config, "whoami"), ticrypt_here(config, "vm", "list"),
            ticrypt_here(config, "vm", "show", vm_id),
            ticrypt_here(config, "vm", "show", "vm-nope"))
        code, out, err = whoami
        pub = identity.load_public_file(key_file + ".pub")
        self.assertEqual((code, out.strip()), (0, f"bob (user) {identity.public_text(pub)}"))
        code, out, err = vm_list
        self.assertEqual(code, 0, err)
        self.assertIn(vm_id, out)
        self.assertIn("lab1", out)
        code, out, err = vm_show
        self.assertEqual(code, 0, err)
        self.assertIn("state:           created", out)
        self.assertIn("public_key:      -", out)
        code, out, err = vm_nope
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: vm show vm-nope failed: no such VM (HTTP 404 no-such-vm)")

        code, out, err = await ticrypt_here(config, "logout")
        self.assertEqual((code, out.strip()), (0, "logged out bob"), err)
        self.assertFalse(os.path.exists(session))
        code, out, err = await ticrypt_here(config, "vm", "list")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: vm list failed: not logged in")

    async def test_untrusted_server_and_bad_config(self) -> None:
        # the server the CLI must not trust: a TLS listener with rest's
        # certificate (the handshake fails before any request)
        env = await start_rest(self, start=False)
        factory = protocol.ServerFactory.forProtocol(protocol.Protocol)
        port = await endpoints.serverFromString(
            reactor, tlsutil.server_endpoint(0, env.server_pem, "127.0.0.1")).listen(factory)
        self.addCleanup(port.stopListening)
        env.deployment.addresses.rest_port = port.getHost().port
        other_ca = os.path.join(env.dir, "other-ca.pem")
        tlsutil.make_ca(other_ca, os.path.join(env.dir, "other-ca.key"))
        config = write_client_config(env, "alice", ca_file=other_ca)
        code, out, err = await ticrypt(config, "login")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: login failed: TLS with https://127.0.0.1:")
        with open(config, "a") as f:
            f.write("colour = blue\n")
        (code, out, err), (usage, _, _) = await together(ticrypt(config, "login"),
                                                         ticrypt(config, "vm"))
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt: cannot load client config: {config}: [client] colour: "
                           "unknown key")
        self.assertEqual(usage, 2)


class KeygenBeforeTheCATests(TestCase):
    """A new user creates a key before the administrator hands out the CA
    file (and maybe before rest_url is known): keygen reads key_file alone."""

    timeout = 60

    async def test_keygen_without_the_ca_file(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, mode=0o700)
        config = os.path.join(directory, "client.ini")
        with open(config, "w") as f:
            f.write("[client]\nrest_url = https://rest.example:8443\nca_file = tls/ca.pem\n"
                    "key_file = keys/id_ed25519\nuser = bob\n")
        os.makedirs(os.path.join(directory, "keys"), mode=0o700)
        code, out, err = await ticrypt_here(config, "keygen", "--no-passphrase")
        self.assertEqual(code, 0, err)
        key_file = os.path.join(directory, "keys", "id_ed25519")
        pub = identity.load_public_file(key_file + ".pub")
        self.assertIn(f"public key  {key_file}.pub: {identity.public_text(pub)}", out)
        self.assertFalse(os.path.exists(os.path.join(directory, "state")))
        # everything else still needs the whole config, the CA file included
        code, out, err = await ticrypt_here(config, "login")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip().splitlines(), [
            f"ticrypt: cannot load client config: {config}: [client] ca_file: expected a "
            f"readable file not writable by others; {directory}/tls/ca.pem does not exist"])

        # no rest_url yet either; a misspelt key is still refused
        with open(config, "w") as f:
            f.write("[client]\nkey_file = second\n")
        code, out, err = await ticrypt_here(config, "keygen", "--no-passphrase")
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(directory, "second.pub")))
        with open(config, "a") as f:
            f.write("keyfile = third\n")
        code, out, err = await ticrypt_here(config, "keygen", "--no-passphrase")
        self.assertEqual((code, err.strip()), (1, f"ticrypt: cannot load client config: "
                                                  f"{config}: [client] keyfile: unknown key"))

    async def test_keygen_without_client_ini(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, mode=0o700)
        env: dict[str, str | None] = {"XDG_CONFIG_HOME": directory,
                                      "TICRYPT_CLIENT_CONFIG": None}
        code, out, err = await run_ticrypt(["keygen", "--no-passphrase"], env)
        missing = os.path.join(directory, "ticrypt", "client.ini")
        self.assertEqual((code, err.strip()), (1, (
            f"ticrypt: keygen failed: {missing} does not exist; name the key with "
            "--key-file PATH, or create client.ini with key_file = PATH")))
        key_file = os.path.join(directory, "k")
        code, out, err = await run_ticrypt(["keygen", "--no-passphrase", "--key-file",
                                            key_file], env)
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(key_file + ".pub"))


class ParserTests(SynchronousTestCase):
    def test_commands_come_from_their_registers(self) -> None:
        from ticrypt.frontend import cmd_account

        parser = cli.build_parser((cmd_account.register,))
        args = parser.parse_args(["vm", "show", "x"])
        self.assertEqual((args.vm_id, args.func.__name__), ("x", "cmd_vm_show"))
        args = cli.build_parser().parse_args(["info", "x"])
        self.assertEqual(args.func.__name__, "cmd_info")

    def test_parser_loads_no_command_dependencies(self) -> None:
        """``ticrypt --help`` and a usage error build the parser of every
        command in a process that loads neither Twisted nor attrs (the
        config), cryptography or autobahn's websocket code: each command
        imports those when it runs (about 0.5 s of CPU at every start)."""
        import json
        import subprocess
        import sys

        probe = ("import json, sys\nimport ticrypt.frontend.cli as c\nc.build_parser()\n"
                 "print(json.dumps(sorted(sys.modules)))")
        out = subprocess.run([sys.executable, "-c", probe], env=daemon_env(), check=True,
                             capture_output=True, timeout=60).stdout
        heavy = ("twisted", "attr", "attrs", "cryptography", "OpenSSL", "zope",
                 "autobahn.websocket", "ticrypt.config", "ticrypt.frontend.client",
                 "ticrypt.frontend.session", "ticrypt.channel")
        loaded = [m for m in json.loads(out) if any(m == h or m.startswith(h + ".")
                                                    for h in heavy)]
        self.assertEqual(loaded, [])
