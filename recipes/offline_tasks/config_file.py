"""Command lines of the recipes: ``HfArgumentParser`` flags, with an optional YAML/JSON file of defaults first."""

from __future__ import annotations

import json
from pathlib import Path


def parse_args_with_config_file(parser, argv: list[str]):
    """Parse ``argv`` into ``parser``'s dataclasses; a leading .yaml/.yml/.json file supplies defaults.

    Flags after the file override it; a key of the file that is not a flag of ``parser`` is an error.
    """
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv.pop(0))
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            import yaml

            values = yaml.safe_load(path.read_text())
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid keys are the flags of this script (see --help)")
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)
