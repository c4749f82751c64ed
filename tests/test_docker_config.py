"""Deployment files: docker/docker-compose.yml, docker/Dockerfile, docker/.env.example, .dockerignore.

No Docker engine runs in CI, so these tests parse the files and check what the
deployment relies on, feeding the container's command lines to the real CLI
parser. The compose file uses the long syntax for ports and volumes (a
`${VAR:?message}` holds colons, which the short syntax splits on).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.specifiers import SpecifierSet

from vggt_cache.service.cli import build_parser
from vggt_cache.service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
PORT = 8600
STATE_DIR = "/var/lib/vggt-cache"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
ASSIGNMENT_RE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


# --- .env.example --------------------------------------------------------------------------------


def env_example() -> list[tuple[str, str, bool, str]]:
    """(name, value, active, comment line above) for every assignment, commented out or not."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = ASSIGNMENT_RE.match(line)
        if m:
            above = lines[i - 1] if i else ""
            comment = above if above.startswith("#") and not ASSIGNMENT_RE.match(above) else ""
            out.append((m.group(2), m.group(3), m.group(1) is None, comment))
    return out


def example_values() -> dict[str, str]:
    return {name: value for name, value, active, _ in env_example() if active}


# --- docker-compose.yml --------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service() -> dict:
    return compose()["services"]["vggt-cache"]


def interpolate(value: object, env: dict[str, str]) -> str:
    """Compose's substitution for the forms VAR_RE knows; a `?` variable must be set."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("?"):
            assert not unset, f"{name} is required by the compose file but has no value in .env.example"
        return arg if unset and op and op.endswith("-") else (value or "")

    return VAR_RE.sub(sub, str(value))


def strings(node: object) -> Iterator[str]:
    """Every scalar value of a parsed YAML tree (Compose interpolates values, not keys)."""
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif node is not None:
        yield str(node)


def serve_args(argv: list[str]):
    """The real `vggt-cache serve` parser's reading of argv (argparse exits on an unknown flag)."""
    try:
        return build_parser().parse_args(["serve", *argv])
    except SystemExit as e:
        pytest.fail(f"vggt-cache serve rejects {argv}: exit {e.code}")


def command_args():
    cmd = service()["command"]
    assert isinstance(cmd, list), "command must be a list (exec form): no shell to split it"
    return serve_args([interpolate(a, example_values()) for a in cmd])


def mounts(kind: str) -> list[dict]:
    volumes = service()["volumes"]
    assert all(isinstance(v, dict) for v in volumes), "use the long volume syntax"
    return [v for v in volumes if v["type"] == kind]


def test_compose_has_no_obsolete_version_key():
    assert "version" not in compose()


def test_service_is_built_from_the_dockerfile_with_the_repo_as_context():
    build = service()["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert set(build.get("args", {})) <= set(dockerfile_args())


def test_gpus_reserved_through_the_nvidia_driver():
    devices = service()["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert len(nvidia) == 1
    dev = nvidia[0]
    assert dev["capabilities"] == ["gpu"]
    assert ("count" in dev) != ("device_ids" in dev), "count and device_ids exclude each other"
    if "count" in dev:
        count = interpolate(dev["count"], example_values())
        assert count == "all" or count.isdigit()


def test_data_root_is_mounted_at_the_same_path_and_is_the_only_allowed_root():
    binds = [m for m in mounts("bind") if "DATA_ROOT" in str(m["source"])]
    assert len(binds) == 1
    data = binds[0]
    # Identical expressions, not just equal example values: the sibling paths the
    # training nodes send must name the same files inside the container.
    assert data["source"] == data["target"]
    assert not data.get("read_only", False), "the service writes cache files next to the images"
    root = interpolate(data["target"], example_values())
    assert root.startswith("/")
    assert command_args().allowed_roots == [root]


def test_model_weights_mounted_read_only_where_model_points():
    model = command_args().model
    at_model = [m for m in mounts("bind") if m["target"] == model]
    assert len(at_model) == 1, f"no bind mount at --model {model}"
    assert at_model[0]["read_only"] is True
    assert "VGGT_MODEL_DIR" in str(at_model[0]["source"])


def test_state_dir_lives_on_a_declared_named_volume():
    state_dir = command_args().state_dir
    assert state_dir == STATE_DIR
    volumes = [m for m in mounts("volume") if m["target"] == state_dir]
    assert len(volumes) == 1
    assert volumes[0]["source"] in (compose().get("volumes") or {})


def test_listens_on_all_interfaces_at_8600_and_publishes_it():
    args = command_args()
    assert (args.host, args.port) == ("0.0.0.0", PORT)
    ports = service()["ports"]
    assert len(ports) == 1 and isinstance(ports[0], dict), "use the long port syntax"
    assert ports[0]["target"] == PORT
    assert interpolate(ports[0]["published"], {}) == str(PORT), "the published port defaults to 8600"
    assert str(PORT) in dockerfile_instructions()["EXPOSE"][-1].split()


def test_api_token_comes_from_the_env_file_only():
    env_file = service()["env_file"]
    assert ".env" in ([env_file] if isinstance(env_file, str) else env_file)
    env = service().get("environment") or {}
    names = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
    assert "VGGT_CACHE_API_TOKEN" not in names
    assert not any("token" in s.lower() for s in strings(compose())), "no token (nor --api-token) in the compose file"
    assert command_args().api_token is None
    assert example_values()["VGGT_CACHE_API_TOKEN"] == "", "the example must not ship a usable token"
    # ... nor one that silently turns auth off: left empty, the service refuses to start.
    with pytest.raises(ValueError, match="set but empty"):
        ServiceSettings(api_token=example_values()["VGGT_CACHE_API_TOKEN"]).check()


def test_restarts_unless_stopped():
    assert service()["restart"] == "unless-stopped"


def test_compose_healthcheck_probes_healthz_on_the_served_port():
    check = service()["healthcheck"]
    assert check["test"][0] == "CMD"
    probe = " ".join(check["test"][1:])
    assert f"127.0.0.1:{command_args().port}/healthz" in probe
    assert "curl" not in probe and "wget" not in probe, "the image has neither"
    assert int(str(check["retries"])) >= 1


def test_pytorch_friendly_limits_and_bounded_logs():
    svc = service()
    assert re.fullmatch(r"\d+[gm]b?", str(svc["shm_size"]).lower())
    assert svc["ulimits"]["memlock"] == -1
    logging = svc["logging"]
    assert logging["driver"] == "json-file"
    assert re.fullmatch(r"\d+[kmg]", logging["options"]["max-size"])
    assert int(logging["options"]["max-file"]) >= 1


def test_every_compose_variable_is_documented_in_env_example():
    used = {m.group(1) for s in strings(compose()) for m in VAR_RE.finditer(s)}
    assert {"DATA_ROOT", "VGGT_MODEL_DIR", "VGGT_PORT"} <= used
    documented = {name: comment for name, _, _, comment in env_example()}
    assert used <= set(documented), f"undocumented: {sorted(used - set(documented))}"
    for name in used:
        assert documented[name], f"{name} in .env.example has no comment line above it"


def test_env_example_service_settings_are_real_serve_flags_with_valid_values():
    settings = [(n, v, c) for n, v, _, c in env_example() if n.startswith("VGGT_CACHE_")]
    assert "VGGT_CACHE_API_TOKEN" in [n for n, _, _ in settings]
    for name, value, comment in settings:
        assert comment, f"{name} in .env.example has no comment line above it"
        flag = "--" + name[len("VGGT_CACHE_") :].lower().replace("_", "-")
        serve_args([f"{flag}={value}", "--allowed-root", "/data"])  # serve requires a root


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> dict[str, list[str]]:
    """Instruction keyword -> its argument strings in order (continuations joined, comments dropped)."""
    out: dict[str, list[str]] = {}
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, rest = logical.strip().partition(" ")
            out.setdefault(keyword.upper(), []).append(rest.strip())
        logical = ""
    return out


def dockerfile_args() -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in dockerfile_instructions()["ARG"])


def dockerfile_env() -> dict[str, str]:
    env = {}
    for line in dockerfile_instructions()["ENV"]:
        env.update(kv.split("=", 1) for kv in shlex.split(line))
    return env


def copy_sources() -> list[str]:
    sources = []
    for line in dockerfile_instructions()["COPY"]:
        parts = [p for p in shlex.split(line) if not p.startswith("--")]
        sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


def pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def test_base_image_is_cuda_pytorch_within_the_project_torch_range():
    base = dockerfile_instructions()["FROM"][0]
    if base.startswith("${"):
        base = dockerfile_args()[base.strip("${}")]
    repo, _, tag = base.partition(":")
    assert repo == "pytorch/pytorch"
    torch_version, _, flavour = tag.partition("-")
    assert "cuda" in flavour and flavour.endswith("runtime")
    spec = re.search(r'"torch\s*([<>=!~][^"]*)"', pyproject()).group(1)
    assert torch_version in SpecifierSet(spec), f"base torch {torch_version} outside {spec}"


def test_installs_the_project_from_its_own_files_without_replacing_torch():
    sources = copy_sources()
    assert "." not in sources, "copy only what the package build needs"
    readme = re.search(r'readme\s*=\s*"([^"]+)"', pyproject()).group(1)
    folders = tomllib.loads(pyproject())["tool"]["setuptools"]["package-dir"].values()
    assert {"pyproject.toml", readme, *folders} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
    text = DOCKERFILE.read_text()
    install = next(r for r in dockerfile_instructions()["RUN"] if "pip install" in r)
    assert "'.[service]'" in install and "--no-cache-dir" in install
    assert "--constraint" in install and "torch==" in install, "torch must stay the base image's"
    assert text.index("COPY pyproject.toml") < text.index("pip install")


def test_runs_as_a_fixed_non_root_user():
    users = dockerfile_instructions()["USER"]
    user = users[-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    create = next(r for r in dockerfile_instructions()["RUN"] if "useradd" in r)
    assert re.search(r'useradd [^&]*--uid "\$\{APP_UID\}"[^&]* ' + re.escape(user) + r"(\s|$)", create)
    assert dockerfile_args()["APP_UID"] == "1000"
    chowned = next(r for r in dockerfile_instructions()["RUN"] if "chown" in r)
    assert STATE_DIR in chowned, "an empty named volume takes the ownership of the image's folder"


def test_dockerfile_healthcheck_probes_healthz_with_python():
    check = dockerfile_instructions()["HEALTHCHECK"][-1]
    options, _, cmd = check.partition("CMD")
    assert "--start-period" in options
    argv = json.loads(cmd)
    assert argv[0] == "python"
    assert f"127.0.0.1:{PORT}/healthz" in argv[-1] and "urllib" in argv[-1]


def test_entrypoint_and_default_cmd_are_a_valid_serve_command():
    ins = dockerfile_instructions()
    assert json.loads(ins["ENTRYPOINT"][-1]) == ["vggt-cache", "serve"]
    args = serve_args([*json.loads(ins["CMD"][-1]), "--allowed-root", "/data"])  # the root: compose's to give
    assert (args.host, args.port, args.state_dir) == ("0.0.0.0", PORT, STATE_DIR)


def test_dockerfile_environment():
    env = dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HF_HOME"].startswith("/home/app/")


def test_compile_works_in_the_image_for_any_user():
    # Triton builds its launcher with a C compiler, which a -runtime base lacks; its caches must be
    # writable whatever --user the container runs as.
    env = dockerfile_env()
    install = next(r for r in dockerfile_instructions()["RUN"] if "apt-get install" in r)
    assert re.search(r"\bgcc\b", install) and "libc6-dev" in install
    cache = "/var/cache/vggt-cache-compile"
    assert env["TRITON_CACHE_DIR"].startswith(cache + "/") and env["TORCHINDUCTOR_CACHE_DIR"].startswith(cache + "/")
    assert f"chmod 1777 {cache}" in install
    text = DOCKERFILE.read_text()
    assert text.index("apt-get install") < text.index("USER app"), "installed as root, before the user switch"


def test_cuda_allocator_uses_expandable_segments():
    # Varying batch shapes and the out-of-memory halving fragment the caching allocator otherwise.
    assert "expandable_segments:True" in dockerfile_env()["PYTORCH_CUDA_ALLOC_CONF"].split(",")


# --- .dockerignore -------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern:
    pieces = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
    return re.compile("".join(pieces.get(p, re.escape(p)) for p in parts))


def dockerignored(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for p in patterns:
        regex = _pattern(p.lstrip("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not p.startswith("!")
    return excluded


@pytest.mark.parametrize(
    "rel",
    [
        ".venv/bin/python",
        ".venv-ci/bin/python",
        ".git/HEAD",
        "tests/fixtures/vggt_tiny/config.json",
        "tests/test_docker_config.py",
        ".env",
        "docker/.env",
        "service/.env",
        "a.jpg.vggt_cache.pt",
        "training/scripts/frames/0001.jpg.vggt_cache.pt",
        "service/__pycache__/cli.cpython-311.pyc",
    ],
)
def test_dockerignore_keeps_out(rel):
    assert dockerignored(rel)


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    files = []
    for src in copy_sources():
        path = ROOT / src
        found = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        files += [f.relative_to(ROOT).as_posix() for f in found if "__pycache__" not in f.parts]
    assert "service/cli.py" in files and "pyproject.toml" in files
    assert [f for f in files if dockerignored(f)] == []


def test_every_folder_of_the_import_package_is_listed_in_pyproject():
    """A subpackage missing from `packages` would be absent from the wheel (an editable install still finds it)."""
    setup = tomllib.loads(pyproject())["tool"]["setuptools"]
    found = set()
    for package, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == set(setup["packages"])
