"""ticrypt.config: every way an ini file can be wrong gets one clear line."""

from __future__ import annotations

import operator
import os
import tempfile

import attrs
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.config import (
    Bool,
    ClientEndpoint,
    ConfigError,
    DirPath,
    Duration,
    FilePath,
    Int,
    Key,
    OptionalUrl,
    Port,
    PortRange,
    RoleConfig,
    Schema,
    ServerEndpoint,
    Size,
    Str,
    StrList,
    Url,
    group,
    load_config,
    schema_of,
    section,
    setting,
)
from ticrypt.service import options_for

SCHEMA = Schema(
    {
        "main": {
            "name": Key(Str(), doc="a name"),
            "port": Key(Port(), default="8080"),
            "range": Key(PortRange(), default="6000-6100"),
            "timeout": Key(Duration(), default="30s"),
            "size": Key(Size(min=16), default="64KiB"),
            "flag": Key(Bool(), default="no"),
            "count": Key(Int(0, 10), default="3"),
            "listen": Key(ServerEndpoint(), default="tcp:0:interface=127.0.0.1"),
            "connect": Key(ClientEndpoint(), default="tcp:host=127.0.0.1:port=1"),
            "url": Key(Url(("https", "wss")), default="https://127.0.0.1:1"),
            "tags": Key(StrList(), default=""),
        },
        "files": {
            "key": Key(FilePath(secret=True), default=None),
            "out": Key(FilePath(must_exist=False), default=None),
            "state": Key(DirPath(), default=None),
        },
    },
    optional_sections=frozenset({"files"}),
)


class LoadConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        os.chmod(self.dir, 0o700)

    def write(self, text: str, name: str = "t.ini", mode: int = 0o600) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def error(self, text: str, **kw: int) -> ConfigError:
        path = self.write(text, **kw)
        return self.assertRaises(ConfigError, load_config, path, SCHEMA)

    def assertNames(self, err: ConfigError, section: str | None, key: str | None,
                    fragment: str) -> None:
        self.assertEqual((err.section, err.key), (section, key))
        self.assertIn(fragment, str(err))
        self.assertNotIn("\n", str(err))
        self.assertTrue(str(err).startswith(os.path.join(self.dir, "t.ini")))

    def test_valid_with_defaults(self) -> None:
        cfg = load_config(self.write("[main]\nname = x\n"), SCHEMA)
        self.assertEqual(cfg.main.name, "x")
        self.assertEqual(cfg.main.port, 8080)
        self.assertEqual(cfg.main.range, (6000, 6100))
        self.assertEqual(cfg.main.timeout, 30.0)
        self.assertEqual(cfg.main.size, 65536)
        self.assertIs(cfg.main.flag, False)
        self.assertEqual(cfg.main.tags, ())
        self.assertIsNone(cfg.files.key)

    def test_values_parsed(self) -> None:
        cfg = load_config(self.write(
            "[main]\nname = x\nport = 1\nrange = 10-10\ntimeout = 500ms\nsize = 1MiB\n"
            "flag = yes\ntags = a, b\n"), SCHEMA)
        self.assertEqual((cfg.main.port, cfg.main.range, cfg.main.timeout, cfg.main.size,
                          cfg.main.flag, cfg.main.tags),
                         (1, (10, 10), 0.5, 1048576, True, ("a", "b")))

    def test_immutable(self) -> None:
        cfg = load_config(self.write("[main]\nname = x\n"), SCHEMA)
        self.assertRaises(AttributeError, setattr, cfg.main, "name", "y")
        self.assertRaises(AttributeError, setattr, cfg, "main", None)
        self.assertRaises(TypeError, operator.setitem, cfg.main, "name", "y")

    def test_missing_file(self) -> None:
        err = self.assertRaises(ConfigError, load_config,
                                os.path.join(self.dir, "nope.ini"), SCHEMA)
        self.assertIn("does not exist", str(err))

    def test_empty_file(self) -> None:
        self.assertIn("empty", str(self.error("  \n")))

    def test_writable_by_others(self) -> None:
        self.assertIn("writable by group or others", str(self.error("[main]\nname=x\n", mode=0o666)))

    def test_unknown_section(self) -> None:
        self.assertNames(self.error("[main]\nname=x\n[extra]\na=1\n"), "extra", None,
                         "unknown section")

    def test_unknown_key(self) -> None:
        self.assertNames(self.error("[main]\nname=x\nnmae=y\n"), "main", "nmae", "unknown key")

    def test_duplicate_key(self) -> None:
        self.assertNames(self.error("[main]\nname=x\nname=y\n"), "main", "name", "duplicate key")

    def test_duplicate_section(self) -> None:
        self.assertNames(self.error("[main]\nname=x\n[main]\n"), "main", None, "duplicate section")

    def test_missing_required_key(self) -> None:
        self.assertNames(self.error("[main]\nport=1\n"), "main", "name", "missing")

    def test_missing_section(self) -> None:
        self.assertNames(self.error("[files]\n"), "main", "name", "missing section")

    def test_empty_value(self) -> None:
        self.assertNames(self.error("[main]\nname=\n"), "main", "name", "non-empty")

    def test_key_outside_section(self) -> None:
        self.assertIn("outside any [section]", str(self.error("name=x\n")))

    def test_wrong_type(self) -> None:
        self.assertNames(self.error("[main]\nname=x\ncount=three\n"), "main", "count", "integer")
        self.assertNames(self.error("[main]\nname=x\nflag=maybe\n"), "main", "flag", "yes or no")

    def test_out_of_range(self) -> None:
        self.assertNames(self.error("[main]\nname=x\nport=70000\n"), "main", "port", "1..65535")
        self.assertNames(self.error("[main]\nname=x\ncount=11\n"), "main", "count", "0..10")
        self.assertNames(self.error("[main]\nname=x\nsize=8\n"), "main", "size", "at least 16")

    def test_negative_or_zero_timeout(self) -> None:
        self.assertNames(self.error("[main]\nname=x\ntimeout=-1\n"), "main", "timeout", "duration")
        self.assertNames(self.error("[main]\nname=x\ntimeout=0\n"), "main", "timeout", "duration")

    def test_reversed_port_range(self) -> None:
        self.assertNames(self.error("[main]\nname=x\nrange=6100-6000\n"), "main", "range",
                         "reversed")

    def test_bad_endpoint(self) -> None:
        self.assertNames(self.error("[main]\nname=x\nlisten=tcp:notaport\n"), "main", "listen",
                         "server endpoint")
        self.assertNames(self.error("[main]\nname=x\nlisten=bogus:1\n"), "main", "listen",
                         "server endpoint")
        self.assertNames(self.error("[main]\nname=x\nconnect=tcp:host=x\n"), "main", "connect",
                         "client endpoint")

    def test_tls_endpoint_with_missing_key_file(self) -> None:
        err = self.error("[main]\nname=x\nlisten=ssl:0:privateKey=missing.pem\n")
        self.assertNames(err, "main", "listen", "server endpoint")

    def test_endpoint_port_out_of_range(self) -> None:
        # Twisted's parser takes any integer; bind() would fail at start-up
        self.make_pem("s.pem")
        for listen in ("tcp:70000:interface=127.0.0.1", "tcp:-1", "ssl:65536:privateKey=s.pem",
                       r"tcp6:70000:interface=\:\:1"):
            self.assertNames(self.error(f"[main]\nname=x\nlisten={listen}\n"), "main",
                             "listen", "not in 0..65535")
        cfg = load_config(self.write("[main]\nname=x\nlisten=tcp:65535\n"), SCHEMA)
        self.assertEqual(cfg.main.listen, "tcp:65535")

    def make_pem(self, name: str, mode: int = 0o600) -> str:
        """A key + certificate PEM (what ssl: privateKey= reads) in the config dir."""
        from ticrypt import tlsutil

        ca, ca_key = os.path.join(self.dir, "ca.pem"), os.path.join(self.dir, "ca.key")
        if not os.path.exists(ca):
            tlsutil.make_ca(ca, ca_key)
        path = os.path.join(self.dir, name)
        tlsutil.make_server_cert(ca, ca_key, path)
        os.chmod(path, mode)
        return path

    def test_tls_private_key_must_be_private(self) -> None:
        self.make_pem("s.pem", 0o640)
        err = self.error("[main]\nname=x\nlisten=ssl:0:privateKey=s.pem\n")
        self.assertNames(err, "main", "listen", "readable by group or others")
        self.assertIn("chmod 600", str(err))
        self.make_pem("w.pem", 0o602)
        self.assertNames(self.error("[main]\nname=x\nlisten=ssl:0:privateKey=w.pem\n"),
                         "main", "listen", "writable by group or others")
        self.make_pem("ok.pem")
        cfg = load_config(self.write("[main]\nname=x\nlisten=ssl:0:privateKey=ok.pem\n"),
                          SCHEMA)
        self.assertIn(os.path.join(self.dir, "ok.pem"), cfg.main.listen)

    def test_tls_cert_key_holding_a_key_must_be_private(self) -> None:
        # certKey= defaults to privateKey= and may hold the key as well
        with open(self.make_pem("k.pem")) as f:
            pem = f.read()
        self.write(pem, name="both.pem", mode=0o644)
        err = self.error("[main]\nname=x\nlisten=ssl:0:privateKey=k.pem:certKey=both.pem\n")
        self.assertNames(err, "main", "listen", "certKey")
        self.assertIn("readable by group or others", str(err))
        # a certificate alone is public
        self.write(pem.split("-----END PRIVATE KEY-----\n", 1)[1], name="cert.pem", mode=0o644)
        load_config(self.write("[main]\nname=x\nlisten=ssl:0:privateKey=k.pem:certKey=cert.pem\n"),
                    SCHEMA)

    def test_endpoints_parsed_without_opening_anything(self) -> None:
        # parsed against a reactor of the check's own: nothing is bound, a
        # unix: path is not created, a tls: client names no resolver problem
        path = os.path.join(self.dir, "s.sock")
        cfg = load_config(self.write(f"[main]\nname=x\nlisten=unix:{path}\n"
                                     "connect=tls:example.com:443\n"), SCHEMA)
        self.assertEqual((cfg.main.listen, cfg.main.connect),
                         (f"unix:{path}", "tls:example.com:443"))
        self.assertFalse(os.path.exists(path))
        self.assertEqual(self.flushWarnings(), [])

    def test_role_that_does_not_listen_skips_endpoint_parsing(self) -> None:
        # ticrypt-admin reads rest.ini but never listens: the TLS key and
        # certificate are not loaded, the key file's mode is still checked
        @attrs.frozen(kw_only=True)
        class Tool(RoleConfig):
            parse_endpoints = False
            main: _Listen = section(_Listen)

        cfg = load_config(self.write("[main]\nlisten=ssl:0:privateKey=missing.pem\n"), Tool)
        self.assertEqual(cfg.main.listen, f"ssl:0:privateKey={self.dir}/missing.pem")
        self.make_pem("g.pem", 0o640)
        for listen, why in (("ssl:0:privateKey=g.pem", "readable by group or others"),
                            ("ssl:0", "needs privateKey=")):
            err = self.assertRaises(ConfigError, load_config,
                                    self.write(f"[main]\nlisten={listen}\n"), Tool)
            self.assertIn(why, str(err))
        # a role's own config parses them
        err = self.assertRaises(ConfigError, load_config,
                                self.write("[main]\nlisten=ssl:0:privateKey=missing.pem\n"),
                                _ListenRole)
        self.assertIn("server endpoint", str(err))

    def test_loading_imports_no_test_tooling(self) -> None:
        """Loading rest.ini (its ssl: endpoint parsed, TLS key and certificate
        loaded) in a fresh process imports neither twisted.trial nor
        twisted.internet.testing, nor unittest, doctest or pdb (they were
        about 5% of every daemon's start-up)."""
        import json
        import subprocess
        import sys

        from test.restfixture import make_rest_dir
        from ticrypt.lab.daemons import daemon_env

        env = make_rest_dir(os.path.join(self.dir, "rest"))
        probe = ("import json, sys\nfrom ticrypt.config import load_config, schema_of\n"
                 "from ticrypt.rest.config import RestConfig\n"
                 f"cfg = load_config({env.config_path!r}, schema_of(RestConfig))\n"
                 "assert cfg.rest.listen.startswith('ssl:'), cfg.rest.listen\n"
                 "print(json.dumps(sorted(sys.modules)))")
        out = subprocess.run([sys.executable, "-c", probe], env=daemon_env(), check=True,
                             capture_output=True, timeout=60).stdout
        modules = set(json.loads(out))
        self.assertTrue({"twisted.internet.endpoints", "twisted.internet.ssl"} <= modules)
        tooling = ("twisted.trial", "twisted.internet.testing", "unittest", "doctest", "pdb")
        self.assertEqual(sorted(m for m in modules
                                if any(m == t or m.startswith(t + ".") for t in tooling)), [])

    def test_tls_endpoint_needs_private_key(self) -> None:
        # Twisted would read server.pem from whatever the working directory is
        self.assertNames(self.error("[main]\nname=x\nlisten=ssl:0\n"), "main", "listen",
                         "needs privateKey=")

    def test_bad_url(self) -> None:
        self.assertNames(self.error("[main]\nname=x\nurl=http://h\n"), "main", "url", "https")

    def test_optional_url(self) -> None:
        def load(kind: OptionalUrl, value: str) -> object:
            schema = Schema({"main": {"url": Key(kind)}})
            return load_config(self.write(f"[main]\nurl={value}\n"), schema).main.url

        off, either = OptionalUrl(), OptionalUrl(allow_empty=True)
        for kind in (off, either):
            self.assertIsNone(load(kind, "OFF"))
            self.assertEqual(load(kind, "https://h:8443/"), "https://h:8443")
            self.assertRaises(ConfigError, load, kind, "ftp://h")
        # empty is none only where allowed (connect's [page] rest_url)
        self.assertIn("an https:// URL, or off", str(self.assertRaises(ConfigError, load, off, "")))
        self.assertIsNone(load(either, ""))
        self.assertIn("an https:// URL, empty or off",
                      str(self.assertRaises(ConfigError, load, either, "ftp://h")))

    def test_key_file_checks(self) -> None:
        self.assertNames(self.error("[main]\nname=x\n[files]\nkey=nokey\n"), "files", "key",
                         "does not exist")
        self.write("secret", name="k.pem", mode=0o644)
        self.assertNames(self.error("[main]\nname=x\n[files]\nkey=k.pem\n"), "files", "key",
                         "readable by group or others")
        self.write("secret", name="k2.pem", mode=0o622)
        self.assertNames(self.error("[main]\nname=x\n[files]\nkey=k2.pem\n"), "files", "key",
                         "writable by group or others")
        self.write("secret", name="k3.pem", mode=0o600)
        cfg = load_config(self.write("[main]\nname=x\n[files]\nkey=k3.pem\n"), SCHEMA)
        self.assertEqual(cfg.files.key, os.path.join(self.dir, "k3.pem"))

    def test_relative_paths_resolve_against_config_dir(self) -> None:
        cfg = load_config(self.write("[main]\nname=x\n[files]\nout=o.db\nstate=st\n"), SCHEMA)
        self.assertEqual(cfg.files.out, os.path.join(self.dir, "o.db"))
        self.assertTrue(os.path.isdir(os.path.join(self.dir, "st")))
        self.assertEqual(os.stat(cfg.files.state).st_mode & 0o777, 0o700)

    def test_output_dir_must_exist(self) -> None:
        self.assertNames(self.error("[main]\nname=x\n[files]\nout=no/such/o.db\n"), "files",
                         "out", "does not exist")

    def test_validate_hook(self) -> None:
        def validate(cfg):  # type: ignore[no-untyped-def]
            if cfg.main.name == "bad":
                raise cfg.error("main", "name", "must not be bad")

        schema = Schema(SCHEMA.sections, SCHEMA.optional_sections, validate)
        err = self.assertRaises(ConfigError, load_config,
                                self.write("[main]\nname=bad\n"), schema)
        self.assertNames(err, "main", "name", "must not be bad")


@attrs.frozen
class _Inner:
    depth: int = setting(Int(1, 9), 2, "nesting depth")


@attrs.frozen(kw_only=True)
class _Main:
    name: str = setting(Str(), doc="a name")
    timeout: float = setting(Duration(), 30.0, "a timeout")
    out: str = setting(FilePath(must_exist=False), "out.log", "read like ini text")
    inner: _Inner = group(_Inner)


@attrs.frozen(kw_only=True)
class _Extra:
    flag: bool = setting(Bool(), False, "a flag")


@attrs.frozen(kw_only=True)
class _Demo(RoleConfig):
    main: _Main = section(_Main)
    extra: _Extra = section(_Extra, optional=True)

    def check(self) -> None:
        if self.main.name == "bad":
            raise self.error("main", "name", "must not be bad")


@attrs.frozen(kw_only=True)
class _Listen:
    listen: str = setting(ServerEndpoint(), doc="where it listens")


@attrs.frozen(kw_only=True)
class _ListenRole(RoleConfig):
    main: _Listen = section(_Listen)


class TypedConfigTests(SynchronousTestCase):
    """A role's config as frozen attrs classes: the loader fills them."""

    def write(self, text: str) -> str:
        d = tempfile.mkdtemp()
        path = os.path.join(d, "t.ini")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path

    def test_defaults_groups_and_optional_sections(self) -> None:
        path = self.write("[main]\nname = x\ndepth = 5\n")
        cfg = load_config(path, _Demo)
        self.assertIsInstance(cfg, _Demo)
        self.assertEqual(cfg.path, os.path.abspath(path))
        self.assertEqual(cfg.main.name, "x")
        self.assertEqual(cfg.main.timeout, 30.0)
        self.assertEqual(cfg.main.inner, _Inner(depth=5))
        self.assertEqual(cfg.main.out, os.path.join(os.path.dirname(path), "out.log"))
        self.assertEqual(cfg.extra, _Extra())

    def test_errors_name_file_section_and_key(self) -> None:
        for text, where in [("[main]\n", "[main] name: missing"),
                            ("[main]\nname = x\ndepth = 10\n", "[main] depth: expected"),
                            ("[main]\nname = x\n[extra]\nnope = 1\n", "[extra] nope: unknown"),
                            ("[main]\nname = bad\n", "[main] name: must not be bad")]:
            path = self.write(text)
            err = self.assertRaises(ConfigError, load_config, path, _Demo)
            self.assertTrue(str(err).startswith(f"{path}: {where}"), str(err))

    def test_schema_view(self) -> None:
        schema = schema_of(_Demo)
        self.assertEqual(list(schema.sections["main"]), ["name", "timeout", "out", "depth"])
        self.assertEqual(schema.optional_sections, frozenset({"extra"}))
        self.assertEqual(schema.sections["main"]["depth"].doc, "nesting depth")


class OptionsTests(SynchronousTestCase):
    def test_config_required(self) -> None:
        from twisted.python.usage import UsageError

        opts = options_for("demo", SCHEMA)()
        err = self.assertRaises(UsageError, opts.parseOptions, [])
        self.assertIn("--config", str(err))

    def bad_config(self) -> str:
        d = tempfile.mkdtemp()
        path = os.path.join(d, "t.ini")
        with open(path, "w") as f:
            f.write("[main]\nname=x\nport=0\n")
        os.chmod(path, 0o600)
        return path

    def test_bad_config_is_usage_error(self) -> None:
        from twisted.python.usage import UsageError

        path = self.bad_config()
        err = self.assertRaises(UsageError, options_for("demo", SCHEMA)().parseOptions,
                                ["--config", path])
        self.assertTrue(str(err).startswith(f"{path}: [main] port: "), str(err))

    def test_bad_config_under_twistd_is_one_line_and_exit(self) -> None:
        # SystemExit(message): Python prints the one line and exits 1; from a
        # UsageError twistd would print its usage text first
        from twisted.python import usage

        class Twistd(usage.Options):
            subCommands = [["demo", None, options_for("demo", SCHEMA), "demo role"]]

        path = self.bad_config()
        err = self.assertRaises(SystemExit, Twistd().parseOptions,
                                ["demo", "--config", path])
        self.assertIsInstance(err.code, str)
        self.assertTrue(str(err.code).startswith(f"ticrypt-demo: {path}: [main] port: "),
                        err.code)
        self.assertNotIn("\n", str(err.code))


class SampleConfigTests(SynchronousTestCase):
    """etc/rest.ini and etc/client.ini set and document every key of their schema."""

    def check(self, name: str, spec: Schema | type[RoleConfig]) -> None:
        import configparser

        schema = schema_of(spec)
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "etc", name)
        with open(path) as f:
            lines = f.read().splitlines()
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string("\n".join(lines))
        for part, keys in schema.sections.items():
            self.assertEqual(sorted(parser[part]), sorted(keys), f"{name} [{part}]")
            for key in keys:
                at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
                self.assertTrue(lines[at - 1].startswith("#"),
                                f"{name}: {key} has no comment above it")

    def test_rest(self) -> None:
        from ticrypt.rest.config import RestConfig as REST

        self.check("rest.ini", REST)

    def test_client(self) -> None:
        from ticrypt.frontend.clientconfig import ClientConfig as CLIENT

        self.check("client.ini", CLIENT)

    def test_vmhost(self) -> None:
        from ticrypt.vmhost.config import VmhostConfig

        self.check("vmhost.ini", VmhostConfig)
