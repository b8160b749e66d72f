"""docker-compose.yml, checked statically (Docker does not run on our development machines): services,
pinned images, mounts, health checks, start order, and the environment the DAGs read. No database needed.

The file is read as compose reads it: YAML (merge keys resolved by yaml.safe_load), then `${VAR}`,
`${VAR:-default}`, `${VAR:?message}` and `$$` substituted from an environment the test chooses.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from warehouse_gdpr.engine.crypto import Keys, generate_extra
from warehouse_gdpr.engine.policy import load_policy
from warehouse_gdpr_demo import compose_seed
from warehouse_gdpr_demo import services as demo_services

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
RAW_TEXT = COMPOSE_FILE.read_text()
RAW = yaml.safe_load(RAW_TEXT)
SERVICES: dict[str, dict[str, Any]] = RAW["services"]

AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer"]
AIRFLOW_COMMANDS = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                    "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
EXPECTED_SERVICES = {*AIRFLOW_SERVICES, "postgres", "warehouse", "warehouse-init", "downstream"}
ONE_OFF = {name for name in SERVICES if name.endswith("-init")}  # run to completion; the rest keep running
LONG_RUNNING = set(SERVICES) - ONE_OFF
AIRFLOW_UID_USER = "${AIRFLOW_UID:-50000}:0"
REQUIRED_ENV = {"GDPR_KEYS_EXTRA": json.dumps(generate_extra())}


# -- compose's variable substitution ---------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*)|(.?))", re.S)


class MissingVariable(LookupError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` with every string substituted as compose does (the subset of the syntax compose files use)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name, operator, argument, bare, invalid = match.groups()
        if escaped:
            return "$"
        if invalid is not None:  # compose refuses the whole file: "Invalid template"
            raise ValueError(f"invalid template: a lone $ before {invalid!r} in {value!r} (write $$)")
        name = name or bare
        current = env.get(name)
        if operator in (":-", "-"):
            return argument if (current is None or (operator == ":-" and current == "")) else current
        if operator in (":?", "?"):
            if current is None or (operator == ":?" and current == ""):
                raise MissingVariable(f"{name}: {argument}")
            return current
        return current or ""

    return _VARIABLE.sub(substitute, value)


def services(env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return interpolate(SERVICES, {**REQUIRED_ENV, **(env or {})})


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def connection(service: dict[str, Any], conn_id: str) -> dict[str, Any]:
    return json.loads(environment(service)[f"AIRFLOW_CONN_{conn_id.upper()}"])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """{container path: source} of the service's volumes (short syntax; a trailing :ro dropped)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a container path of a bind mount (./x) lives in the repository; None if not bind-mounted."""
    for target, source in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
        if source.startswith("./") and (container_path == target or container_path.startswith(target + "/")):
            return ROOT / source[2:] / container_path[len(target):].lstrip("/")
    return None


def policy_connection_ids() -> set[str]:
    """Every connection id the demo policy names (airflow.*, erasure targets, opt-out share targets, and
    whatever else ends in `connection_id`)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("connection_id") and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(load_policy(ROOT / "include" / "policy.yaml").model_dump())
    return found


def constraint(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package.lower():
            return version.strip()
    raise LookupError(package)


# -- services, images ------------------------------------------------------------------------------

def test_the_stack_has_every_service_it_needs() -> None:
    assert set(SERVICES) == EXPECTED_SERVICES
    for name, command in AIRFLOW_COMMANDS.items():
        assert SERVICES[name]["command"] == command, name
    assert not {name for name in SERVICES if "redis" in name or "worker" in name}  # LocalExecutor: no broker


def test_every_image_is_pinned_and_airflow_is_the_tested_version() -> None:
    airflow = constraint("apache-airflow")
    for name, service in services().items():
        image = service.get("image")
        assert image, f"{name} has no image (builds are not part of this stack)"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?([-.][\w.]+)?", tag), f"{name}: {image} is not pinned to a version"
        if name.startswith("airflow-") or name in ("warehouse-init", "downstream"):
            assert image == f"apache/airflow:{airflow}", f"{name}: {image} (constraints.txt has Airflow {airflow})"
    assert SERVICES["postgres"]["image"] == SERVICES["warehouse"]["image"]
    assert SERVICES["warehouse"]["image"].startswith("postgres:18.")


def test_postgresql_18_data_lives_where_the_image_keeps_it() -> None:
    """postgres:18 images keep PGDATA under /var/lib/postgresql/18/...: a volume on .../data is refused."""
    for name in ("postgres", "warehouse"):
        volumes = mounts(SERVICES[name])
        assert "/var/lib/postgresql" in volumes and not volumes["/var/lib/postgresql"].startswith("./"), name
        assert volumes["/var/lib/postgresql"] in RAW["volumes"]
    assert mounts(SERVICES["postgres"])["/var/lib/postgresql"] != mounts(SERVICES["warehouse"])["/var/lib/postgresql"]


def test_metadata_db_and_warehouse_are_separate_servers() -> None:
    for name in AIRFLOW_SERVICES:
        service = services()[name]
        env = environment(service)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", name
        metadata_host = re.match(r"postgresql(\+\w+)?://[^@]*@([^/:]+)", env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert metadata_host and metadata_host.group(2) == "postgres", name
        assert connection(service, "warehouse")["host"] == "warehouse", name
    assert environment(SERVICES["warehouse-init"])["PGHOST"] == "warehouse"


def test_nothing_is_pip_installed_at_start_unless_pinned_as_tested() -> None:
    """The image has the providers, psycopg 3, cryptography and pydantic; anything added must be pinned
    to constraints.txt (the entrypoint reinstalls it at every start)."""
    for name, service in services().items():
        extra = environment(service).get("_PIP_ADDITIONAL_REQUIREMENTS", "").split()
        for requirement in extra:
            package, _, version = requirement.partition("==")
            assert version == constraint(package), f"{name}: {requirement} is not pinned as in constraints.txt"


def test_the_init_check_passes_with_the_tested_packages(tmp_path: Path) -> None:
    """airflow-init verifies the image has what the engine imports (and that the postgres hook uses
    psycopg 3); the same check passes with constraints.txt, so it fails only on a wrong image."""
    script = SERVICES["airflow-init"]["command"][1]
    check = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
    assert check, "airflow-init lost its image check"
    # The policy the container reads ($WAREHOUSE_GDPR_POLICY, a bind mount): there is no default path.
    policy = host_path(SERVICES["airflow-init"], environment(SERVICES["airflow-init"])["WAREHOUSE_GDPR_POLICY"])
    assert policy is not None and policy.is_file()
    out = subprocess.run([sys.executable, "-"], input=check.group(1), capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin",
                              "AIRFLOW_HOME": str(tmp_path), "WAREHOUSE_GDPR_POLICY": str(policy)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "psycopg 3." in out.stdout and "gdpr_subject_erasure" in out.stdout


# -- mounts and the paths the code reads ------------------------------------------------------------

@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_dags_plugins_and_include_are_mounted_where_the_code_reads_them(name: str) -> None:
    service = services()[name]
    env = environment(service)
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/dags"  # the image's default, stated
    assert host_path(service, env["AIRFLOW__CORE__DAGS_FOLDER"]) == ROOT / "dags"
    assert host_path(service, env["AIRFLOW__CORE__PLUGINS_FOLDER"]) == ROOT / "plugins"
    assert host_path(service, env["PYTHONPATH"]) == ROOT / "plugins"
    assert (host_path(service, env["PYTHONPATH"]) / "warehouse_gdpr" / "dags.py").is_file()
    policy = host_path(service, env["WAREHOUSE_GDPR_POLICY"])
    assert policy == ROOT / "include" / "policy.yaml" and policy.is_file()
    sql_dir = host_path(service, env["WAREHOUSE_GDPR_SQL_DIR"])
    assert sql_dir is not None and (sql_dir / "gdpr_schema.sql").is_file()
    for source in mounts(service).values():
        if source.startswith("./"):
            assert any(v.endswith(":ro") for v in service["volumes"] if v.startswith(source + ":")), (
                f"{name}: {source} should be mounted read-only")
        else:
            assert source in RAW["volumes"], f"{name}: {source} is not a declared volume"
    assert set(mounts(service)) >= {"/opt/airflow/config", "/opt/airflow/logs"}
    assert env["AIRFLOW_CONFIG"].startswith("/opt/airflow/config/")  # shared JWT secret and Fernet key


def test_warehouse_init_and_downstream_run_modules_that_exist_with_valid_arguments() -> None:
    parsers = {"warehouse_gdpr_demo.compose_seed": compose_seed.build_parser,
               "warehouse_gdpr_demo.services": demo_services.build_parser}
    for name in ("warehouse-init", "downstream"):
        service = services()[name]
        command = [str(part) for part in service["command"]]
        assert command[:2] == ["python", "-m"], name
        module = command[2]
        paths = [host_path(service, p) for p in environment(service)["PYTHONPATH"].split(":")]
        assert any(p is not None and (p / (module.replace(".", "/") + ".py")).is_file() for p in paths), module
        assert ROOT / "plugins" in paths  # the engine the demo module imports
        parsers[module]().parse_args(command[3:])  # exits (SystemExit) on an unknown or missing option
        assert environment(service)["CONNECTION_CHECK_MAX_COUNT"] == "0"  # no metadata DB to wait for
    downstream = demo_services.build_parser().parse_args([str(p) for p in SERVICES["downstream"]["command"][3:]])
    assert downstream.host == "0.0.0.0"  # reachable from the other containers
    sql_dir = host_path(SERVICES["warehouse-init"], environment(SERVICES["warehouse-init"])["WAREHOUSE_GDPR_SQL_DIR"])
    assert sql_dir is not None and (sql_dir / "gdpr_schema.sql").is_file()  # the control schema it installs


# -- health checks and start order ------------------------------------------------------------------

def test_every_long_running_service_has_a_health_check_and_restarts() -> None:
    for name in LONG_RUNNING:
        check = SERVICES[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert SERVICES[name].get("restart") in ("always", "unless-stopped"), name
    for name in ONE_OFF:
        assert SERVICES[name].get("restart", "no") == "no", f"{name} runs once"


def test_postgres_health_checks_go_over_tcp() -> None:
    """During the postgres image's first-start init the server listens on its Unix socket only: a check
    over the socket would report healthy before the init scripts and the final restart are done."""
    for name in ("postgres", "warehouse"):
        test = SERVICES[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "pg_isready"], name
        host = test.index("-h") + 1 if "-h" in test else None
        assert host and test[host] == "127.0.0.1", f"{name}: pg_isready without -h 127.0.0.1"
        env = environment(services()[name])
        assert test[test.index("-U") + 1] == env["POSTGRES_USER"] and test[test.index("-d") + 1] == env["POSTGRES_DB"]


def test_start_order_waits_on_health_and_completion() -> None:
    for name, service in SERVICES.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            condition = rule.get("condition") if isinstance(rule, dict) else None
            if dependency in ONE_OFF:
                assert condition == "service_completed_successfully", f"{name} -> {dependency}: {condition}"
            else:
                assert condition == "service_healthy", f"{name} -> {dependency}: {condition}"
    for name in AIRFLOW_SERVICES:
        depends = SERVICES[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    scheduler = SERVICES["airflow-scheduler"]["depends_on"]  # it runs the tasks: the warehouse must be seeded
    assert scheduler["warehouse-init"]["condition"] == "service_completed_successfully"
    assert scheduler["downstream"]["condition"] == "service_healthy"
    assert SERVICES["warehouse-init"]["depends_on"]["warehouse"]["condition"] == "service_healthy"
    assert SERVICES["warehouse-init"]["depends_on"]["downstream"]["condition"] == "service_healthy"


def test_published_ports_stay_on_this_machine() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"
    assert "127.0.0.1:8080:8080" in SERVICES["airflow-apiserver"]["ports"]


# -- connections and secrets ------------------------------------------------------------------------

@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_every_connection_the_policy_names_is_defined(name: str) -> None:
    ids = policy_connection_ids()
    assert {"warehouse", "gdpr_keys", "emailing", "telephony", "support_desk"} <= ids
    service = services()[name]
    for conn_id in ids:
        assert f"AIRFLOW_CONN_{conn_id.upper()}" in environment(service), f"{name}: no connection {conn_id!r}"
    policy = load_policy(ROOT / "include" / "policy.yaml")
    kinds = {t.connection_id: t.kind for t in policy.erasure.targets}
    kinds.update({t.connection_id: "http" for t in policy.optout.share_targets})
    kinds[policy.airflow.warehouse_connection_id] = "sql"
    for conn_id, kind in kinds.items():
        conn = connection(service, conn_id)
        assert conn["conn_type"] == ("postgres" if kind == "sql" else "http"), conn_id
        assert conn["host"] in SERVICES, f"{conn_id}: {conn['host']} is not a service of the stack"
    keys = connection(service, policy.airflow.keys_connection_id)
    Keys.from_extra(keys["extra"])  # the extra is the generated keys, as given


def test_every_connection_value_is_json_once_substituted() -> None:
    tricky = {"GDPR_KEYS_EXTRA": json.dumps(generate_extra(), separators=(",", ":")),
              "WAREHOUSE_PASSWORD": "pw-1", "GDPR_DAG_PASSWORD": "pw-2", "DEMO_EMAILING_API_KEY": "k",
              "DEMO_TELEPHONY_TOKEN": "t", "AIRFLOW_UID": "1000"}
    for env in ({}, tricky):
        for name, service in services(env).items():
            for key, value in environment(service).items():
                assert "${" not in value, f"{name}: {key} keeps an unsubstituted variable"
                if key.startswith("AIRFLOW_CONN_"):
                    assert isinstance(json.loads(value), dict), f"{name}: {key}"


def test_demo_credentials_agree_between_services_by_default_and_when_overridden() -> None:
    for env in ({}, {"WAREHOUSE_PASSWORD": "w", "GDPR_DAG_PASSWORD": "d", "DEMO_EMAILING_API_KEY": "k",
                     "DEMO_TELEPHONY_TOKEN": "t"}):
        stack = services(env)
        airflow, seed, downstream = stack["airflow-scheduler"], environment(stack["warehouse-init"]), \
            environment(stack["downstream"])
        assert connection(airflow, "emailing")["extra"]["api-key"] == downstream["DEMO_EMAILING_API_KEY"] \
            == seed["DEMO_EMAILING_API_KEY"]
        assert connection(airflow, "telephony")["extra"]["Authorization"] == \
            f"Bearer {downstream['DEMO_TELEPHONY_TOKEN']}" == f"Bearer {seed['DEMO_TELEPHONY_TOKEN']}"
        assert connection(airflow, "warehouse")["password"] == seed["GDPR_DAG_PASSWORD"]
        assert connection(airflow, "warehouse")["login"] == compose_seed.DAG_ROLE
        warehouse = environment(stack["warehouse"])
        assert connection(airflow, "support_desk")["password"] == warehouse["POSTGRES_PASSWORD"] == seed["PGPASSWORD"]
        assert connection(airflow, "support_desk")["schema"] == "support_desk"  # compose_seed's default --desk-db
        assert connection(airflow, "warehouse")["schema"] == warehouse["POSTGRES_DB"] == seed["PGDATABASE"]


def test_downstream_ports_match_the_connections_and_the_seed() -> None:
    stack = services()
    served = demo_services.build_parser().parse_args([str(p) for p in stack["downstream"]["command"][3:]])
    seed = compose_seed.build_parser().parse_args([str(p) for p in stack["warehouse-init"]["command"][3:]])
    airflow = stack["airflow-scheduler"]
    for conn_id, port in (("emailing", served.emailing_port), ("telephony", served.telephony_port)):
        conn = connection(airflow, conn_id)
        assert (conn["host"], conn["port"]) == ("downstream", port), conn_id
        assert getattr(seed, f"{conn_id}_url") == f"http://downstream:{port}"


def test_gdpr_keys_are_required_from_the_environment_never_written_here() -> None:
    raw = environment(SERVICES["airflow-scheduler"])["AIRFLOW_CONN_GDPR_KEYS"]
    assert re.search(r"\$\{GDPR_KEYS_EXTRA:\?[^}]+\}", raw), "the keys must be required, with a message"
    with pytest.raises(MissingVariable, match="GDPR_KEYS_EXTRA"):
        interpolate(SERVICES, {})
    for word in ("hmac_pepper", "archive_keys", "hmac_key_id"):
        assert word not in RAW_TEXT, f"{word}: key material belongs in .env or a secrets backend"
    # Nothing that looks like a key (long base64 or hex) anywhere in the file.
    assert not re.search(r"[A-Za-z0-9+/]{32,}={0,2}|[0-9a-f]{32,}", RAW_TEXT)
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_demo_passwords_are_named_as_demo_values() -> None:
    defaults = re.findall(r"\$\{(\w+):-([^}]*)\}", RAW_TEXT)
    secrets = {name: default for name, default in defaults if re.search(r"PASSWORD|KEY|TOKEN", name)}
    assert secrets, "demo credentials are expected to be overridable variables"
    for name, default in secrets.items():
        assert default.startswith("demo-"), f"{name} defaults to {default!r}: name demo values as such"


# -- AIRFLOW_UID convention -------------------------------------------------------------------------

def test_no_lone_dollar_anywhere() -> None:
    """compose refuses a file with `$(` or `$ ` (not `$$`, `${VAR}` or `$VAR`) in any value."""
    interpolate(SERVICES, REQUIRED_ENV)
    with pytest.raises(ValueError, match="invalid template"):
        interpolate({"x": "echo $(id -u)"}, {})


@pytest.mark.parametrize("uid", [None, "1000"])
def test_airflow_init_warning_shows_the_command_to_copy(uid: str | None) -> None:
    """airflow-init runs as root: the hint must print `$(id -u)` itself for the user to copy, not 0."""
    script = services({} if uid is None else {"AIRFLOW_UID": uid})["airflow-init"]["command"][1]
    warning = re.search(r"^if \[\[ -z .*?^fi$", script, re.M | re.S)
    assert warning, "airflow-init lost its AIRFLOW_UID warning"
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", warning.group(0)], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    if uid is None:
        assert "On Linux start the stack with: AIRFLOW_UID=$(id -u) docker compose up\n" in out.stdout
    else:
        assert out.stdout == ""


def test_airflow_uid_convention() -> None:
    for name in AIRFLOW_SERVICES:
        expected = "0:0" if name == "airflow-init" else AIRFLOW_UID_USER
        assert SERVICES[name]["user"] == expected, name
    for name in ("warehouse-init", "downstream"):
        assert SERVICES[name]["user"] == AIRFLOW_UID_USER, name
    init = SERVICES["airflow-init"]["command"][1]
    assert 'chown -R "${AIRFLOW_UID:-50000}:0" /opt/airflow/logs /opt/airflow/config' in init
    assert "airflow db migrate" in init
    assert services({"AIRFLOW_UID": "1234"})["airflow-scheduler"]["user"] == "1234:0"
