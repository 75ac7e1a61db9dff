"""Loading ``configuration.toml`` into a typed ``Config``.

The file is looked up, in order: an explicit path, ``$HUSK_CONFIG``,
``/etc/husk/configuration.toml``, and the default packaged with husk. Sections
follow Kata's names: ``[runtime]``, ``[agent.husk]`` and one
``[hypervisor.<name>]`` per plugin; each plugin owns its section (keys,
defaults, host adjustments) through the registry.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from shim import registry
from shim.config import hypervisor_keys
from shim.config.schema import Key, format_value, validate_section
from shim.errors import ConfigError
from shim.host import HostFacts

ETC_CONFIG = Path("/etc/husk/configuration.toml")
TRANSPORTS = ("auto", "vsock", "hybrid-vsock", "virtio-serial")

RUNTIME_KEYS: tuple[Key, ...] = (
    Key("hypervisor", str, "qemu", "registry name of the hypervisor plugin to use"),
    Key("state_dir", str, "/run/husk", "where each sandbox keeps its sockets and records"),
    Key("image_dir", str, "/var/lib/husk/images", "where `husk image build` puts the guest"),
    Key(
        "log_level",
        str,
        "info",
        "shim log level (containerd's -debug makes it debug)",
        choices=("debug", "info", "warning", "error"),
    ),
    Key(
        "sandbox_model",
        str,
        "pod",
        "one VM per pod (CRI annotations) or per container",
        choices=("pod", "container"),
    ),
    Key(
        "internetworking_model",
        str,
        "tcfilter",
        "how the pod's veth reaches the VM's NIC",
        choices=("tcfilter", "none"),
    ),
    Key(
        "max_parallel_boots",
        int,
        0,
        "VM boots that run at once on this host (0: one per CPU); the rest queue",
        minimum=0,
    ),
)

FACTORY_KEYS: tuple[Key, ...] = (
    Key("enable_template", bool, False, "start sandboxes as clones of a booted VM template"),
    Key("template_path", str, "/run/husk-template", "where the template's files live (a tmpfs)"),
    Key(
        "vm_cache_number",
        int,
        0,
        "booted, exercised VMs `husk factory init` keeps ready (0: no pool)",
        minimum=0,
        maximum=64,
    ),
    Key(
        "vm_cache_endpoint",
        str,
        "/run/husk-vm-cache.sock",
        "the pool daemon's socket, where shims claim its VMs",
    ),
)

AGENT_KEYS: tuple[Key, ...] = (
    Key("transport", str, "auto", "shim-to-agent channel", choices=TRANSPORTS),
    Key("dial_timeout", float, 30.0, "seconds to wait for the agent after boot", minimum=0.1),
    Key("request_timeout", float, 60.0, "seconds for one agent request", minimum=0.1),
    Key("enable_debug", bool, False, "agent logs at debug level to the console"),
    Key("debug_console", bool, False, "a root shell in the guest for `husk exec`"),
)


@dataclass(frozen=True)
class RuntimeConfig:
    """The ``[runtime]`` section."""

    hypervisor: str
    state_dir: Path
    image_dir: Path
    log_level: str
    sandbox_model: str
    internetworking_model: str
    max_parallel_boots: int


@dataclass(frozen=True)
class FactoryConfig:
    """The ``[factory]`` section (Kata's name): VM templates and the VM pool."""

    enable_template: bool
    template_path: Path
    #: VMs the pool daemon keeps ready (0: no pool)
    vm_cache_number: int
    vm_cache_endpoint: Path


@dataclass(frozen=True)
class AgentConfig:
    """The ``[agent.husk]`` section, with ``transport`` resolved for this host."""

    transport: str
    dial_timeout: float
    request_timeout: float
    enable_debug: bool
    debug_console: bool


@dataclass(frozen=True)
class Config:
    """The effective configuration: file values, defaults and host adjustments."""

    source: Path
    runtime: RuntimeConfig
    agent: AgentConfig
    hypervisors: Mapping[str, Mapping[str, Any]]
    factory: FactoryConfig = FactoryConfig(
        False, Path("/run/husk-template"), 0, Path("/run/husk-vm-cache.sock")
    )

    @property
    def hypervisor(self) -> Mapping[str, Any]:
        """The section of the hypervisor ``[runtime] hypervisor`` selects."""
        return self.hypervisors[self.runtime.hypervisor]

    def as_dict(self) -> dict[str, Any]:
        """The config as nested plain values, in the file's section layout."""
        runtime = {k.name: _plain(getattr(self.runtime, k.name)) for k in RUNTIME_KEYS}
        agent = {k.name: _plain(getattr(self.agent, k.name)) for k in AGENT_KEYS}
        factory = {k.name: _plain(getattr(self.factory, k.name)) for k in FACTORY_KEYS}
        return {
            "runtime": runtime,
            "factory": factory,
            "agent": {"husk": agent},
            "hypervisor": {n: dict(v) for n, v in self.hypervisors.items()},
        }


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def packaged_default() -> Path:
    """The default configuration.toml shipped inside the ``shim.config`` package."""
    return Path(str(resources.files("shim.config").joinpath("configuration.toml")))


def locate(path: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Pick the config file: explicit path, $HUSK_CONFIG, /etc/husk, packaged default."""
    env = os.environ if env is None else env
    if path is not None:
        return path
    if env.get("HUSK_CONFIG"):
        return Path(env["HUSK_CONFIG"])
    if ETC_CONFIG.exists():
        return ETC_CONFIG
    return packaged_default()


def load(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    host: HostFacts | None = None,
) -> Config:
    """Load, validate and adjust the configuration; raise ``ConfigError`` in one line."""
    source = locate(path, env)
    try:
        with source.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: configuration file not found") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read configuration: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return parse(raw, source=source, host=host or HostFacts.probe())


def parse(raw: Mapping[str, Any], *, source: Path, host: HostFacts) -> Config:
    """Validate an already-decoded TOML document."""
    src = str(source)
    for name in raw:
        if name not in ("runtime", "factory", "agent", "hypervisor"):
            raise ConfigError(
                f"{src}: unknown section [{name}] (expected [runtime], [factory], "
                "[agent.husk], [hypervisor.<name>])"
            )
    runtime_values = validate_section(src, "runtime", _table(raw, "runtime", src), RUNTIME_KEYS)
    hypervisors = _hypervisor_sections(raw, src, host)
    selected = runtime_values["hypervisor"]
    plugin = registry.lookup(selected, context=f"{src}: [runtime] hypervisor")
    if selected not in hypervisors:
        hypervisors[selected] = _plugin_section(plugin, {}, src, host)
    agent_values = validate_section(src, "agent.husk", _agent_table(raw, src), AGENT_KEYS)
    agent_values["transport"] = _resolve_transport(agent_values["transport"], plugin, host, src)
    runtime = RuntimeConfig(
        hypervisor=selected,
        state_dir=Path(runtime_values["state_dir"]),
        image_dir=Path(runtime_values["image_dir"]),
        log_level=runtime_values["log_level"],
        sandbox_model=runtime_values["sandbox_model"],
        internetworking_model=runtime_values["internetworking_model"],
        max_parallel_boots=runtime_values["max_parallel_boots"],
    )
    factory_values = validate_section(src, "factory", _table(raw, "factory", src), FACTORY_KEYS)
    factory = FactoryConfig(
        enable_template=factory_values["enable_template"],
        template_path=Path(factory_values["template_path"]),
        vm_cache_number=factory_values["vm_cache_number"],
        vm_cache_endpoint=Path(factory_values["vm_cache_endpoint"]),
    )
    return Config(source, runtime, AgentConfig(**agent_values), hypervisors, factory)


def _table(raw: Mapping[str, Any], name: str, src: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{src}: [{name}] must be a table, not {format_value(value)}")
    return value


def _agent_table(raw: Mapping[str, Any], src: str) -> Mapping[str, Any]:
    agents = _table(raw, "agent", src)
    for name in agents:
        if name != "husk":
            raise ConfigError(f"{src}: unknown section [agent.{name}] (expected [agent.husk])")
    return _table(agents, "husk", src)


def _hypervisor_sections(
    raw: Mapping[str, Any], src: str, host: HostFacts
) -> dict[str, Mapping[str, Any]]:
    sections: dict[str, Mapping[str, Any]] = {}
    for name, table in _table(raw, "hypervisor", src).items():
        plugin = registry.lookup(name, context=f"{src}: [hypervisor.{name}]")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{src}: [hypervisor.{name}] must be a table")
        sections[name] = _plugin_section(plugin, table, src, host)
    return sections


def _plugin_section(
    plugin: registry.HypervisorPlugin, table: Mapping[str, Any], src: str, host: HostFacts
) -> Mapping[str, Any]:
    section = f"hypervisor.{plugin.name}"
    values = validate_section(src, section, table, plugin.keys)
    for key, problem in hypervisor_keys.validate_common(values):
        raise ConfigError(f"{src}: [{section}] {key} = {format_value(values.get(key))}: {problem}")
    values = hypervisor_keys.adjust_common(plugin.adjust(values, host), host)
    for key, problem in plugin.validate(values, host):
        raise ConfigError(f"{src}: [{section}] {key} = {format_value(values.get(key))}: {problem}")
    return values


def _resolve_transport(
    wanted: str, plugin: registry.HypervisorPlugin, host: HostFacts, src: str
) -> str:
    offered = list(plugin.agent_transports(host))
    if wanted == "auto":
        return offered[0]
    if wanted not in offered:
        why = "" if host.vhost_vsock else " (this host has no /dev/vhost-vsock)"
        raise ConfigError(
            f"{src}: [agent.husk] transport = \"{wanted}\": hypervisor '{plugin.name}' offers "
            + ", ".join(f'"{t}"' for t in offered)
            + f" on this host{why}"
        )
    return wanted


def to_toml(config: Config) -> str:
    """Render the effective config as TOML, for ``husk config show``."""
    lines = [f"# effective configuration, from {config.source}"]

    def table(header: str, values: Mapping[str, Any]) -> None:
        lines.append("")
        lines.append(f"[{header}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")

    data = config.as_dict()
    table("runtime", data["runtime"])
    table("factory", data["factory"])
    table("agent.husk", data["agent"]["husk"])
    for name, values in data["hypervisor"].items():
        table(f"hypervisor.{name}", values)
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
