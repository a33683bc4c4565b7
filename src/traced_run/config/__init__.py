"""The settings: the one declarative table (``settings``), where values come from
(``sources``: YAML, environment, options), the generated reference (``reference``)
and the supported version ranges (``compat``). Uses only ``flags`` and ``report``."""
