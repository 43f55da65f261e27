"""The model deployments a gateway fronts, as `--model NAME=DECODERS[@ENCODERS]` gives them.

`DECODERS` and `ENCODERS` take the forms of `--decoder` / `--encoder` (host:port, a comma list of
ip:port, dns:///name:port); without `@ENCODERS` the model uses the `--encoder` target. The first
`--model` is the default: gRPC requests with an empty `model` field go to it. Without any `--model`
the gateway fronts one model, `--decoder` + `--encoder`, named `--served-model-name` or, if unset,
by its decoder's checkpoint name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Names go in URLs (/v1/models/NAME) and metric labels: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # "" = learned from the decoder (the single-model form only)
    decoder_target: str
    encoder_target: str


def parse_model_specs(values: Sequence[str], default_encoder: str) -> tuple[ModelSpec, ...]:
    """`--model` values, checked; raises ValueError saying what to fix."""
    specs: list[ModelSpec] = []
    for value in values:
        name, sep, targets = value.partition("=")
        name = name.strip()
        if not sep or not targets.strip():
            raise ValueError(f"--model {value!r}: expected NAME=DECODERS[@ENCODERS], e.g. "
                             "small=10.0.0.5:50053,10.0.0.6:50053@10.0.0.9:50052")
        if not _NAME.fullmatch(name):
            raise ValueError(f"--model {value!r}: the name must be 1-128 of letters, digits and . _ : / - "
                             "(starting with a letter or digit)")
        decoders, _, encoders = targets.partition("@")
        if not decoders.strip():
            raise ValueError(f"--model {value!r}: no decoder target before '@'")
        specs.append(ModelSpec(name, decoders.strip(), encoders.strip() or default_encoder))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--model names must differ; repeated: {', '.join(duplicates)}")
    return tuple(specs)
