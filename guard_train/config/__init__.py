"""Run configuration: the schema, recipes + `key=value` overrides, parameter ranges, path checks."""
