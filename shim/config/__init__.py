"""``configuration.toml``: where it is looked up, its schema, and the typed ``Config``.

- ``shim.config.loader``: lookup, validation and host adjustments (re-exported here);
- ``shim.config.schema``: ``Key`` and the validation of one section;
- ``shim.config.hypervisor_keys``: the keys every ``[hypervisor.<name>]`` shares.
"""

from shim.config.loader import (
    AGENT_KEYS,
    ETC_CONFIG,
    FACTORY_KEYS,
    RUNTIME_KEYS,
    TRANSPORTS,
    AgentConfig,
    Config,
    FactoryConfig,
    RuntimeConfig,
    load,
    locate,
    packaged_default,
    parse,
    to_toml,
)

__all__ = [
    "AGENT_KEYS",
    "ETC_CONFIG",
    "FACTORY_KEYS",
    "RUNTIME_KEYS",
    "TRANSPORTS",
    "AgentConfig",
    "Config",
    "FactoryConfig",
    "RuntimeConfig",
    "load",
    "locate",
    "packaged_default",
    "parse",
    "to_toml",
]
