"""Each part installs on its own: the project's wheel, built here, goes into a fresh
virtual environment with one extra (``cityedge[gateway]``, ``[fleet]``, ``[provisioning]``,
``[hardware]``) from the package index, and that part runs there. A Raspberry Pi's
gateway install holds no FastAPI, SQLAlchemy or Pillow; a part left out says which extra
to install instead of a traceback. The installed size of each is printed (``-s``) and
written to ``<tmp>/sizes.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("fastapi", "sqlalchemy", "sqlmodel", "PIL", "uvicorn", "psycopg")

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(out), str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("cityedge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _clean_environ() -> dict[str, str]:
    """This process's environment without what would point a command at this project's
    own virtual environment or configuration."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CITYEDGE_", "PYTHON", "VIRTUAL_ENV"))}


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"

    def run(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        clean = _clean_environ()
        clean.update(env or {})
        return subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=300, cwd=cwd, env=clean)

    def has(self, module: str) -> bool:
        r = self.run("python", "-c", "import importlib.util, sys; "
                     "sys.exit(0 if importlib.util.find_spec(%r) else 1)" % module)
        return r.returncode == 0

    def size(self) -> int:
        """Bytes in site-packages, without the pip and setuptools every venv starts with."""
        site = next(self.root.glob("lib/python*/site-packages"))
        tools = ("pip", "setuptools", "_distutils_hack", "pkg_resources")
        return sum(f.stat().st_size for f in site.rglob("*") if f.is_file()
                   and not f.relative_to(site).parts[0].startswith(tools))


def _install(wheel: Path, base: Path, extra: str) -> Env:
    """A fresh virtual environment with ``cityedge[extra]`` installed by pip from the
    package index. The environment is made without a pip of its own (``--without-pip``:
    seeding one took about 8 s of the install's 12 to 25) and this pip installs into it
    (``pip --python``): the same resolver and installer, the same files in site-packages
    (whose size leaves pip out anyway)."""
    root = base / ("venv-" + extra)
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    env = Env(root)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(env.bin / "python"),
                        "install", "-q", "--disable-pip-version-check",
                        "%s[%s]" % (wheel, extra)],
                       capture_output=True, text=True, timeout=300, env=_clean_environ())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not env.has("pip")  # nothing of this pip went into the environment
    return env


@pytest.fixture(scope="module")
def sizes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    got: dict[str, int] = {}
    yield got
    path = tmp_path_factory.getbasetemp() / "sizes.json"
    path.write_text(json.dumps(got, indent=1))
    print("\ninstalled sizes (site-packages, bytes): %s" % got)


def test_the_gateway_installs_alone_and_checks_a_configuration(
        wheel: Path, tmp_path: Path, sizes: dict[str, int]) -> None:
    env = _install(wheel, tmp_path, "gateway")
    sizes["gateway"] = env.size()
    for module in HEAVY:
        assert not env.has(module), "the gateway's install holds %s" % module
    assert env.has("aiomqtt") and env.has("serial") and env.has("prometheus_client")
    r = env.run("cityedge", "--version")
    assert r.returncode == 0 and r.stdout.startswith("cityedge "), r.stderr
    # a real configuration checked by the installed command
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from support.mosquitto import TestPKI

    pki = TestPKI(tmp_path / "pki")
    dev = "urn:dev:mac:b827ebfffe0000cc"
    creds = pki.issue_client(dev, key=ec.generate_private_key(ec.SECP256R1()))
    key = tmp_path / "gw.key"
    key.write_bytes(creds.key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    key.chmod(0o600)
    (tmp_path / "state").mkdir()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\ndevice = "%s"\nkey_file = "%s"\n[store]\npath = "%s"\n'
                   '[broker]\nhost = "127.0.0.1"\nport = 8883\nca_file = "%s"\n'
                   'cert_file = "%s"\nkey_file = "%s"\n'
                   % (dev, key, tmp_path / "state" / "buf.sqlite", pki.ca_pem,
                      creds.cert_pem, key))
    r = env.run("cityedge", "gateway", "run", "--check", "--config", str(cfg))
    assert r.returncode == 0 and "ready" in r.stdout, r.stdout + r.stderr
    # a part this install left out says what to install, once, without a traceback
    r = env.run("cityedge", "fleet", "serve")
    assert r.returncode == 1 and "pip install 'cityedge[fleet]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_fleet_installs_alone_and_makes_its_database(
        wheel: Path, tmp_path: Path, sizes: dict[str, int]) -> None:
    env = _install(wheel, tmp_path, "fleet")
    sizes["fleet"] = env.size()
    assert not env.has("PIL") and not env.has("serial")
    settings = {"CITYEDGE_MODE": "development",
                "CITYEDGE_DATABASE_URL": "sqlite:///%s" % (tmp_path / "fleet.sqlite3"),
                "CITYEDGE_CA_DIR": str(tmp_path / "ca")}
    r = env.run("cityedge", "ca", "init", "--root-dir", str(tmp_path / "root"), "--out-dir",
                str(tmp_path / "ca"), env=settings, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = env.run("cityedge", "fleet", "init-db", env=settings, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = env.run("cityedge", "fleet", "create-token", "--name", "ops", "--role", "admin",
                env=settings, cwd=tmp_path)
    assert r.returncode == 0 and len(r.stdout.strip()) >= 43, r.stderr
    r = env.run("cityedge", "audit", "verify", env=settings, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("extra", "command"), [
    ("provisioning", ("provision", "--help")),
    ("hardware", ("hw", "--help")),
])
def test_the_tools_install_alone_and_run(wheel: Path, tmp_path: Path, sizes: dict[str, int],
                                         extra: str, command: tuple[str, ...]) -> None:
    env = _install(wheel, tmp_path, extra)
    sizes[extra] = env.size()
    assert not env.has("fastapi") and not env.has("sqlalchemy")
    r = env.run("cityedge", *command)
    assert r.returncode == 0 and "Usage" in r.stdout, r.stdout + r.stderr
    if extra == "hardware":
        # the vendor's checker runs; sending a report to the fleet needs the fleet's stack
        r = env.run("cityedge", "hw", "image", "--help")
        assert r.returncode == 0, r.stderr
        r = env.run("cityedge", "hw", "upload", "--report", "r.json")
        assert r.returncode == 1 and "pip install 'cityedge[fleet]'" in r.stderr
        assert "Traceback" not in r.stderr
